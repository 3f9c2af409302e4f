"""`qtcompress predict` end to end: real ONNX file, real onnxruntime; once in a subprocess (the
console script), the bad inputs in-process."""

import numpy as np
import pytest
import torch

from tests.cli_helpers import assert_one_line_error, run


def test_predict_writes_outputs_equal_to_torch(mlp_onnx, tmp_path):
    model, onnx_path = mlp_onnx
    x = torch.randn(5, 13)
    np.save(tmp_path / "x.npy", x.numpy())
    result = run("predict", str(onnx_path), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"))
    assert result.returncode == 0, result.stderr
    got = np.load(tmp_path / "y.npy")
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("model", "inputs", "needle"),
    [
        ("{tmp}/nope.onnx", "{tmp}/x.npy", "nope.onnx"),
        ("{onnx}", "{tmp}/wrong.npy", "(3, 7)"),
    ],
    ids=["missing-model", "wrong-shape"],
)
def test_predict_bad_inputs_exit_1_with_one_line(mlp_onnx, tmp_path, cli, model, inputs, needle):
    np.save(tmp_path / "x.npy", np.zeros((3, 13), dtype=np.float32))
    np.save(tmp_path / "wrong.npy", np.zeros((3, 7), dtype=np.float32))
    model, inputs = (a.format(tmp=tmp_path, onnx=mlp_onnx[1]) for a in (model, inputs))
    result = cli("predict", model, inputs, "-o", tmp_path / "y.npy")
    assert_one_line_error(result)
    assert needle in result.stderr
    assert not (tmp_path / "y.npy").exists()


def test_predict_without_inputs_is_a_usage_error(mlp_onnx, cli):
    result = cli("predict", mlp_onnx[1])
    assert_one_line_error(result, code=2)
    assert "the following arguments are required" in result.stderr
