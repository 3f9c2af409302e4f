"""Issue 24: valid or careless user input never ends in exit 3 (internal error). A fixed-batch
``torch.export`` program, a checkpoint holding NaN, a generator file whose ONNX graph reads
external data, and a user model whose own operations give a non-finite gradient: each gets a
typed error naming the problem and the fix (exit 1), or, for the gradient, a skipped step."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from qtcompress.api import compress
from qtcompress.data.batch import batch_indices
from qtcompress.errors import ConfigError, FormatError, NonFiniteError
from qtcompress.generator_file.load import load_generator
from qtcompress.io.model_source import load_model
from qtcompress.train.loop import MAX_SKIPPED_SHARE, SKIP_GRACE_STEPS
from tests.cli_helpers import assert_one_line_error
from tests.test_hostile_files import GOLDEN, external_data_file
from tests.tiny_models import TinyMLP, example_input

FAST = ["--fit-steps", "2", "--finetune-steps", "2", "--no-progress"]


class NormNet(nn.Module):
    """Its forward takes the square root of a squared norm that is exactly 0 on a zero row.

    ``fc1`` has no bias, so a zero input row gives ``h == 0`` whatever the weights, and the
    gradient of ``sqrt`` there is infinite: NaN reaches every weight before it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8, bias=False)
        self.fc2 = nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 6)
        h = self.fc1(x)
        norm = torch.sqrt(h.pow(2).sum(-1, keepdim=True))
        return self.fc2(torch.cat([torch.tanh(h), norm], -1))


def _data(tmp_path, features=13, zero_rows=()):
    x = torch.randn(200, features, generator=torch.Generator().manual_seed(0))
    x[list(zero_rows)] = 0.0
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x.numpy(), x_test=x[:40].numpy())
    return x, path


# -- 1. a torch.export program exported with a fixed batch ----------------------------------
def test_fixed_batch_export_is_refused_with_the_dynamic_shapes_fix(tmp_path, cli):
    model = TinyMLP().eval()
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(model, (example_input(model, batch=4),)), path)
    fix = 'dynamic_shapes={"x": {0: torch.export.Dim("batch")}}'
    with pytest.raises(ConfigError, match=r"exported with a fixed batch of 4 \(input 'x'") as info:
        load_model(path)
    assert fix in str(info.value)
    _, data = _data(tmp_path)
    result = cli("compress", path, "--data", data, "-o", tmp_path / "o", *FAST)
    assert_one_line_error(result)
    assert "fixed batch of 4" in result.stderr and fix in result.stderr
    # The fix the message gives works: the same model exported with it loads and runs at 7.
    torch.export.save(
        torch.export.export(
            model,
            (example_input(model, batch=4),),
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        ),
        path,
    )
    assert load_model(path)(example_input(model, batch=7)).shape == (7, 3)


def test_fixed_batch_with_two_inputs_names_both(tmp_path):
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * mask

    path = tmp_path / "two.pt2"
    torch.export.save(
        torch.export.export(Masked().eval(), (torch.randn(3, 5), torch.ones(3, 2))), path
    )
    with pytest.raises(ConfigError, match=r"fixed batch of 3 .*\"x\": \{0: batch\}, \"mask\""):
        load_model(path)


# -- 2. a checkpoint holding NaN or Inf -----------------------------------------------------
def test_non_finite_weights_are_named_with_counts_before_any_svd(tmp_path, cli):
    torch.manual_seed(0)
    model = TinyMLP().eval()
    with torch.no_grad():
        model.net[0].weight[0, :2] = torch.tensor([math.nan, math.inf])
    with pytest.raises(
        NonFiniteError, match=r"weights hold NaN or Inf: net\.0\.weight \(2 of 208 values\);"
    ):
        compress(model)
    with torch.no_grad():
        model.net[3].bias[1] = math.nan
    with pytest.raises(
        NonFiniteError, match=r"net\.0\.weight \(2 of 208 values\), net\.3\.bias \(1 of 3 values\)"
    ):
        compress(model, scheme="flat")
    # The command line: the same one line, exit 1 (was exit 3, linalg.svd's error).
    torch.save(model.state_dict(), tmp_path / "nan.pt")
    _, data = _data(tmp_path)
    factory = ["--factory", "tests.tiny_models:TinyMLP"]
    result = cli(
        "compress", tmp_path / "nan.pt", *factory, "--data", data, "-o", tmp_path / "o", *FAST
    )
    assert_one_line_error(result)
    assert "net.0.weight (2 of 208 values), net.3.bias (1 of 3 values)" in result.stderr


def test_float64_weight_beyond_float32_is_named(tmp_path):
    model = TinyMLP().double().eval()
    with torch.no_grad():
        model.net[3].weight[0, 0] = 1e300  # finite in float64, Inf in the fit's float32
    with pytest.raises(
        NonFiniteError, match=r"net\.3\.weight \(1 of 48 values, beyond float32's range\)"
    ):
        compress(model)


# -- 3. inspect on a generator file whose ONNX graph reads external data --------------------
def test_inspect_reports_an_external_data_graph_as_corrupt(tmp_path, cli):
    path = external_data_file(tmp_path)
    expected = r"refers to external data files \(\['ext'\]\).*corrupt or hostile"
    with pytest.raises(FormatError, match=expected):
        load_generator(path).checked_skeleton()
    for command in ("inspect", "verify"):  # inspect now agrees with verify
        result = cli(command, path)
        assert_one_line_error(result)
        assert "ext.qtc.safetensors: the stored ONNX graph refers to external data" in result.stderr
    assert cli("inspect", GOLDEN).returncode == 0


# -- 4. a user model's own non-finite gradient ----------------------------------------------
def test_non_finite_gradient_steps_are_skipped_and_counted():
    torch.manual_seed(0)
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    x[5] = 0.0  # one all-zero row: the batches holding it have an infinite sqrt slope
    qt = compress(NormNet().eval())
    states = {}

    def record(step, loss):
        states[step] = {k: v.clone() for k, v in qt.generator.state_dict().items()}

    expected = [s for s in range(50) if 5 in batch_indices(s, 200, 8, 0).tolist()]
    assert expected == [12, 32]  # 2 of 50 steps: under the share that stops a fit
    with pytest.warns(UserWarning, match=r"gradient at step 12 \(batch 12 of epoch 0: examples 5,"):
        result = qt.finetune(x, steps=50, batch_size=8, progress=False, callback=record)
    assert result.skipped_steps == 2 and result.steps == 50
    for step in expected:  # a skipped step changes nothing
        assert all(torch.equal(states[step][k], states[step + 1][k]) for k in states[step])
    assert all(torch.isfinite(p).all() for p in qt.generator.parameters())


def test_too_many_skipped_steps_stop_with_advice_on_the_model():
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    x[:40] = 0.0  # a fifth of the rows: most batches skip
    qt = compress(NormNet().eval())
    before = {k: v.clone() for k, v in qt.generator.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(NonFiniteError, match=r"of the first 20 steps.*more than 10%") as info:
            qt.finetune(x, steps=50, batch_size=8, progress=False)
    message = str(info.value)
    assert "model's own operations" in message and "torch.sqrt(s + 1e-12)" in message
    assert "learning rate, enable grad_clip" not in message  # not the advice for a diverging fit
    assert SKIP_GRACE_STEPS == 20 and MAX_SKIPPED_SHARE == 0.1
    assert any(not torch.equal(before[k], v) for k, v in qt.generator.state_dict().items())


def test_skipped_steps_are_a_summary_warning(tmp_path, cli):
    torch.manual_seed(0)
    torch.save(NormNet().state_dict(), tmp_path / "norm.pt")
    _, data = _data(tmp_path, features=6, zero_rows=[5])
    factory = ["--factory", "tests.test_careless_input:NormNet"]
    args = ["--fit-steps", "2", "--finetune-steps", "30", "--batch-size", "8", "--no-progress"]
    result = cli(
        "compress", tmp_path / "norm.pt", *factory, "--data", data, "-o", tmp_path / "o", *args
    )
    assert result.returncode == 0, result.stderr
    assert "of 30 steps skipped (non-finite gradient" in result.stdout
