"""`qtcompress predict` end to end in a subprocess: real ONNX file, real onnxruntime."""

import numpy as np
import torch

from qtcompress.onnx_export import export_onnx
from tests.cli_helpers import run
from tests.tiny_models import TinyMLP


def test_predict_writes_outputs_equal_to_torch(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP().eval()
    x = torch.randn(5, 13)
    export_onnx(model, (x[:2],), tmp_path / "mlp.onnx")
    np.save(tmp_path / "x.npy", x.numpy())
    result = run("predict", str(tmp_path / "mlp.onnx"), str(tmp_path / "x.npy"),
                 "-o", str(tmp_path / "y.npy"))
    assert result.returncode == 0, result.stderr
    got = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-5)


def test_predict_bad_inputs_exit_1_with_one_line(tmp_path):
    missing = run("predict", str(tmp_path / "nope.onnx"), str(tmp_path / "x.npy"),
                  "-o", str(tmp_path / "y.npy"))
    assert missing.returncode == 1
    assert "nope.onnx" in missing.stderr and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    model = TinyMLP().eval()
    export_onnx(model, (torch.randn(2, 13),), tmp_path / "mlp.onnx")
    np.save(tmp_path / "wrong.npy", np.zeros((3, 7), dtype=np.float32))
    wrong = run("predict", str(tmp_path / "mlp.onnx"), str(tmp_path / "wrong.npy"),
                "-o", str(tmp_path / "y.npy"))
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert not (tmp_path / "y.npy").exists()

    usage = run("predict", str(tmp_path / "mlp.onnx"))
    assert usage.returncode == 2
