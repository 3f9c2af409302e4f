"""Issue 10: any model, any data: several inputs, carried state, data loaders, dynamic axes."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from qtcompress import QTConfig, compress, load
from qtcompress.errors import ConfigError, ExportError
from qtcompress.onnx.export import export_onnx
from tests.cli_helpers import ROOT, assert_one_line_error, run
from tests.tiny_models import StatefulCell, TwoInputEncoder


def _tokens(n: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (n, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TwoInputEncoder().eval()


@pytest.fixture(scope="module")
def cell():
    torch.manual_seed(0)
    return StatefulCell().eval()


def _checkpoint(model: torch.nn.Module, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _states(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 6, generator=g), torch.randn(n, 2, 10, generator=g) * 0.5


@pytest.mark.slow
def test_two_input_encoder_end_to_end_with_dynamic_sequence(encoder, tmp_path):
    train, test = _tokens(128, 12, 0), _tokens(16, 12, 1)
    qt = compress(encoder, QTConfig(budget=0.5))
    qt.fit_weights(steps=5, progress=False)
    result = qt.finetune(train, steps=30, progress=False)  # a dict: keyword inputs
    assert result.steps == 30
    fid = qt.evaluate(test)
    assert fid.kind == "embedding" and fid.cosine is not None and not fid.degenerate
    path = tmp_path / "enc.qtc.safetensors"
    example = (test["input_ids"][:2], test["attention_mask"][:2])
    axes = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
    qt.save(
        path,
        example_inputs=example,
        input_names=["input_ids", "attention_mask"],
        dynamic_axes=axes,
    )
    # A fresh process regenerates the same weights and a checked ONNX model from the file.
    code = (
        f"from qtcompress import load; g = load(r'{path}'); "
        f"assert g.verify_weights().identical; g.to_onnx(r'{tmp_path / 'enc.onnx'}')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    session = ort.InferenceSession(str(tmp_path / "enc.onnx"), providers=["CPUExecutionProvider"])
    student = load(path).load_into(TwoInputEncoder()).eval()
    for batch, length in ((3, 7), (5, 20)):  # other batch sizes and sequence lengths
        feeds = _tokens(batch, length, 2)
        got = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        with torch.no_grad():
            want = student(**feeds).numpy()
        assert got.shape == (batch, 16)
        np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, np.abs(want).max()))


def test_stateful_model_with_tuple_batches_and_a_dataloader(cell):
    x, state = _states(96, 0)
    qt = compress(cell, QTConfig(scheme="rows", rank=3))  # a 700-weight model: below any 5% budget
    qt.finetune((x, state), steps=20, progress=False)  # a tuple: positional inputs
    loader = DataLoader(TensorDataset(x, state), batch_size=16, shuffle=False)
    result = qt.finetune(loader, steps=20, progress=False)
    assert result.steps == 20
    fid = qt.evaluate(_states(40, 1))
    assert fid.kind == "probability" and fid.agreement is not None
    student = qt.materialize()
    with torch.no_grad():
        prob, new_state = student(x[:3], state[:3])
    assert prob.shape == (3,) and new_state.shape == (3, 2, 10)


def test_cli_multi_input_npz_by_name_with_dynamic_axis(encoder, tmp_path, cli):
    ckpt = _checkpoint(encoder, tmp_path / "enc.safetensors")
    train, test = _tokens(64, 10, 0), _tokens(8, 10, 1)
    np.savez(
        tmp_path / "data.npz",
        **{f"x_train.{k}": v.numpy() for k, v in train.items()},
        **{f"x_test.{k}": v.numpy() for k, v in test.items()},
    )
    result = cli(
        "compress",
        ckpt,
        "--factory",
        "tests.tiny_models:TwoInputEncoder",
        "--data",
        tmp_path / "data.npz",
        "-o",
        tmp_path / "out",
        "--budget",
        "50%",
        "--fit-steps",
        "2",
        "--finetune-steps",
        "5",
        "--dynamic-axis",
        "input_ids:1=seq",
        "--dynamic-axis",
        "attention_mask:1=seq",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "output kind                                embedding" in result.stdout
    session = ort.InferenceSession(
        str(tmp_path / "out" / "enc.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    feeds = _tokens(2, 15, 3)
    assert session.run(None, {k: v.numpy() for k, v in feeds.items()})[0].shape == (2, 16)


def test_cli_refuses_data_the_model_cannot_take_before_fitting(cell, tmp_path, cli):
    ckpt = _checkpoint(cell, tmp_path / "cell.safetensors")
    x, _ = _states(16, 0)
    np.savez(tmp_path / "data.npz", x_train=x.numpy(), x_test=x[:4].numpy())  # no state
    start = time.perf_counter()
    result = cli(
        "compress",
        ckpt,
        "--factory",
        "tests.tiny_models:StatefulCell",
        "--data",
        tmp_path / "data.npz",
        "-o",
        tmp_path / "out",
    )
    assert_one_line_error(result)
    assert "StatefulCell.forward(x, state)" in result.stderr
    assert "1 positional input" in result.stderr
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "out").exists()  # nothing fitted, nothing written


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"output_names": ["same", "same"]}, ConfigError, "distinct output names"),
        ({"input_names": ["x"], "output_names": ["x"]}, ConfigError, "both an input and an output"),
        ({"dynamic_axes": {"x": {0: "seq"}}}, ConfigError, "other than the batch axis 0"),
        ({"dynamic_axes": {"nope": {1: "seq"}}}, ConfigError, "name inputs \\['nope'\\]"),
        (
            {"dynamic_axes": {"x": {1: "seq"}}, "input_names": ["x"]},
            ExportError,
            "fixed dynamic axis 1",
        ),
    ],
)
def test_export_failures_are_typed(tmp_path, kwargs, error, match):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))  # fixed width
    kwargs.setdefault("input_names", ["x"])
    with pytest.raises(error, match=match):
        export_onnx(model, torch.randn(2, 3, 4), tmp_path / "m.onnx", **kwargs)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_cli_stateful_model_positional_npz_then_fresh_load_verify_and_onnx(cell, tmp_path, cli):
    ckpt = _checkpoint(cell, tmp_path / "cell.safetensors")
    (x, state), (xt, st) = _states(64, 0), _states(8, 1)
    np.savez(
        tmp_path / "data.npz",
        **{
            "x_train.0": x.numpy(),
            "x_train.1": state.numpy(),
            "x_test.0": xt.numpy(),
            "x_test.1": st.numpy(),
        },
    )
    out = tmp_path / "out"
    result = cli(
        "compress",
        ckpt,
        "--factory",
        "tests.tiny_models:StatefulCell",
        "--data",
        tmp_path / "data.npz",
        "-o",
        out,
        "--scheme",
        "rows",
        "--rank",
        "3",
        "--fit-steps",
        "2",
        "--finetune-steps",
        "5",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "output kind                                probability" in result.stdout
    gen_file = out / "cell.qtc.safetensors"
    verify = run("verify", str(gen_file), "--factory", "tests.tiny_models:StatefulCell")
    assert verify.returncode == 0, verify.stderr  # a fresh process: regenerate, hash, ONNX, torch
    session = ort.InferenceSession(str(out / "cell.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "state"]
    student = load(gen_file).load_into(StatefulCell()).eval()
    got = session.run(None, {"x": xt.numpy(), "state": st.numpy()})
    with torch.no_grad():
        want = student(xt, st)
    for g, w in zip(got, want, strict=True):  # the probability and the carried state
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5)
