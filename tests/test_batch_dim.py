"""Issue 24, item 4: inputs and outputs whose batch is not dimension 0 (``--batch-dim``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from qtcompress import QTConfig, compress, load
from qtcompress.data.layout import BatchLayout, parse_batch_dim
from qtcompress.data.sources import InputSource
from qtcompress.errors import ConfigError
from qtcompress.examples import Split
from qtcompress.onnx.export import export_onnx
from qtcompress.pipeline import PipelineSettings, run_pipeline
from qtcompress.train.streams import StateLink, free_running_outputs
from tests.cli_helpers import assert_one_line_error
from tests.tiny_models import StreamingLSTM

FACTORY = "tests.tiny_models:StreamingLSTM"


@pytest.fixture(scope="module")
def lstm() -> StreamingLSTM:
    torch.manual_seed(0)
    return StreamingLSTM().eval()


def _chunks(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` chunks ``(n, 4, 6)`` and states ``(2, n, 8)``: h and c, batch in dimension 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 6, generator=g), torch.randn(2, n, 8, generator=g) * 0.5


def _npz(path, train: int = 48, test: int = 12):
    (x, s), (xt, st) = _chunks(train, 0), _chunks(test, 1)
    arrays = {"x_train.0": x, "x_train.1": s, "x_test.0": xt, "x_test.1": st}
    np.savez(path, **{k: v.numpy() for k, v in arrays.items()})
    return path


def _checkpoint(model: torch.nn.Module, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_batch_dims_are_parsed_and_bad_ones_refused():
    assert parse_batch_dim("1=1") == ("1", 1)
    assert parse_batch_dim("input_ids=2") == ("input_ids", 2)
    layout = BatchLayout.of(["1=1", "output.0=1"])
    assert layout == BatchLayout({"1": 1}, {"0": 1})
    assert layout.describe() == "input 1 in dim 1, output 0 in dim 1"
    assert not BatchLayout.of(None) and not BatchLayout.of({"0": 0})
    with pytest.raises(ConfigError, match="give the input and its batch dimension as NAME=DIM"):
        parse_batch_dim("state")
    with pytest.raises(ConfigError, match=r"batch_dims\['1'\] must be a dimension >= 0"):
        PipelineSettings(batch_dims={"1": -1})


def test_inputs_move_batch_first_and_back_and_a_state_output_follows_its_input():
    x, state = _chunks(5, 0)
    layout = BatchLayout.of({"1": 1})
    front = layout.to_front((x, state))
    assert front[0] is x and front[1].shape == (5, 2, 8)
    args, kwargs = layout.to_model(front, {})
    assert torch.equal(args[1], state) and kwargs == {}
    stateful = layout.with_state(1, 1)
    assert stateful.outputs == {"1": 1}
    y, s = stateful.outputs_to_front((torch.zeros(5), state))
    assert y.shape == (5,) and s.shape == (5, 2, 8)
    assert BatchLayout.of({"output.1": 2}).with_state(1, 1) == BatchLayout({}, {"1": 2})
    with pytest.raises(ConfigError, match="names input 'state', but the inputs are 0, 1"):
        BatchLayout.of({"state": 1}).to_front((x, state))
    with pytest.raises(ConfigError, match="input 0 is 5x4x6, which has no dimension 3"):
        BatchLayout.of({"0": 3}).to_front((x, state))
    with pytest.raises(ConfigError, match="the model output has no '2'"):
        BatchLayout.of({"output.2": 1}).outputs_to_front((x, state))


def test_the_student_and_teacher_take_batch_first_data_and_call_the_model_in_its_layout(lstm):
    x, state = _chunks(6, 0)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    qt = compress(lstm, QTConfig(budget=0.5))
    qt.functional.layout = BatchLayout.of({"1": 1}).with_state(1, 1)
    with torch.no_grad():
        want_y, want_state = lstm(x, state)
    got_y, got_state = qt.teacher(x, state.movedim(1, 0))
    torch.testing.assert_close(got_y, want_y)
    torch.testing.assert_close(got_state, want_state.movedim(1, 0))
    assert qt(x, state.movedim(1, 0))[1].shape == (6, 2, 8)  # the student too
    # Streams carry the state batch-first; recorded states give the teacher's own outputs.
    recorded, carried = torch.zeros(2, 6, 8), torch.zeros(2, 1, 8)
    with torch.no_grad():
        for row in range(6):
            carried = torch.zeros(2, 1, 8) if row in (0, 3) else carried
            recorded[:, row] = carried[:, 0]
            carried = lstm(x[row : row + 1], carried)[1]
    data = InputSource.of((x, recorded.movedim(1, 0))).head(6)
    free = free_running_outputs(qt.teacher, data, ids, StateLink(1, 1), None)
    torch.testing.assert_close(free, lstm(x, recorded)[0].detach())


def test_export_takes_the_batch_axis_named_batch(lstm, tmp_path):
    x, state = _chunks(3, 0)
    report = export_onnx(
        lstm,
        (x, state),
        tmp_path / "m.onnx",
        input_names=["x", "state"],
        dynamic_axes={"state": {1: "batch"}},
    )
    assert report.max_abs_diff < 1e-5  # checked at 3 and at 4 (the batch axis grown)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input]
    assert dims == [["batch", 4, 6], [2, "batch", 8]]
    with pytest.raises(ConfigError, match=r"names axes \[1, 2\] 'batch'"):
        export_onnx(
            lstm,
            (x, state),
            tmp_path / "n.onnx",
            input_names=["x", "state"],
            dynamic_axes={"state": {1: "batch", 2: "batch"}},
        )


def test_npz_with_the_batch_in_dimension_1_is_refused_naming_the_option(lstm, tmp_path, cli):
    ckpt = _checkpoint(lstm, tmp_path / "m.safetensors")
    out = tmp_path / "out"

    def compress_cli(data, *more):
        return cli("compress", ckpt, "--factory", FACTORY, "--data", data, "-o", out, *more)

    data = _npz(tmp_path / "d.npz")
    result = compress_cli(data)
    assert_one_line_error(result)
    assert "input 1 has shape [2, 48, 8] in x_train.1" in result.stderr
    assert "pass --batch-dim 1=1." in result.stderr
    # Train and test of the same size pass the shape check: the sizes along dim 0 still differ.
    result = compress_cli(_npz(tmp_path / "same.npz", train=12, test=12))
    assert_one_line_error(result)
    assert "input 1 has shape [2, 12, 8]" in result.stderr and "--batch-dim 1=1" in result.stderr
    # One input whose train and test differ only past dim 0: the option is offered.
    x = np.zeros((2, 10, 3), np.float32)
    np.savez(tmp_path / "one.npz", x_train=x, x_test=x[:, :4])
    result = compress_cli(tmp_path / "one.npz")
    assert_one_line_error(result)
    assert "if that is the batch, pass --batch-dim 0=1" in result.stderr
    # A name the .npz does not hold.
    result = compress_cli(data, "--batch-dim", "state=1")
    assert_one_line_error(result)
    assert "--batch-dim state=1 names input 'state', but" in result.stderr
    assert not out.exists()  # nothing fitted, nothing written


def test_in_memory_inputs_with_the_batch_in_dimension_1_name_the_option(lstm, tmp_path):
    (x, s), (xt, st) = _chunks(16, 0), _chunks(4, 1)
    with pytest.raises(ConfigError, match=r"input 1 \(2x16x8 float32\) has the batch of 16"):
        InputSource.of((x, s))
    empty = torch.empty(0, dtype=torch.int64)
    split = Split((x, s), empty, (xt, st), empty)
    with pytest.raises(ConfigError, match=r"pass --batch-dim 1=1 \(batch_dims=\{'1': 1\}\)"):
        run_pipeline(lstm, QTConfig(), split, tmp_path / "out")


@pytest.mark.slow
def test_cli_streaming_lstm_with_batch_dim_end_to_end_then_onnx_in_the_users_layout(
    lstm, tmp_path, cli
):
    ckpt = _checkpoint(lstm, tmp_path / "lstm.safetensors")
    out = tmp_path / "out"
    result = cli(
        "compress",
        ckpt,
        "--factory",
        FACTORY,
        "--data",
        _npz(tmp_path / "d.npz"),
        "-o",
        out,
        "--batch-dim",
        "1=1",
        "--fit-steps",
        "2",
        "--finetune-steps",
        "5",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "output kind                                probability" in result.stdout
    assert "output 1 -> input 1" in result.stdout  # the state link, detected in its layout
    verify = cli("verify", out / "lstm.qtc.safetensors", "--factory", FACTORY)
    assert verify.returncode == 0, verify.stderr
    session = ort.InferenceSession(str(out / "lstm.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "state"]
    assert session.get_inputs()[1].shape == [2, "batch", 8]
    student = load(out / "lstm.qtc.safetensors").load_into(StreamingLSTM()).eval()
    for batch in (1, 5):  # the state as the model takes it: (2, batch, 8)
        x, state = _chunks(batch, 7)
        got = session.run(None, {"x": x.numpy(), "state": state.numpy()})
        with torch.no_grad():
            want = student(x, state)
        assert got[1].shape == (2, batch, 8)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w.numpy(), atol=1e-5)


def test_the_api_takes_batch_dims_for_training_evaluation_and_the_saved_graph(lstm, tmp_path):
    x, state = _chunks(48, 0)  # state (2, 48, 8): the model's own layout
    xt, st = _chunks(12, 1)
    with pytest.raises(ConfigError, match="batch_dims\\['1'\\] must be a dimension >= 0"):
        compress(lstm, QTConfig(budget=0.5), batch_dims={"1": -1})
    qt = compress(lstm, QTConfig(budget=0.5), batch_dims={"1": 1, "output.1": 1})
    before = qt.evaluate((xt, st))
    qt.finetune((x, state), steps=30, batch_size=16, progress=False)
    after = qt.evaluate((xt, st))
    assert before.n == after.n == 12  # examples counted along the batch, not the layers
    assert after.correlation > before.correlation
    path = qt.save(tmp_path / "g.qtc.safetensors", example_inputs=(xt[:3], st[:, :3]))
    gen = load(path)
    gen.to_onnx(tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[1].shape == [2, "batch", 8]
    student = gen.load_into(StreamingLSTM()).eval()
    xb, sb = _chunks(5, 7)
    got = session.run(None, {"x": xb.numpy(), "state": sb.numpy()})
    with torch.no_grad():
        want = student(xb, sb)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5)
