import numpy as np
import pytest
import torch

from qtcompress.errors import ConfigError, FormatError, MissingFileError
from qtcompress.io.arrays import load_arrays, save_arrays
from qtcompress.onnx.export import export_onnx
from qtcompress.onnx.runtime import OnnxPredictor, predict_file
from tests.tiny_models import example_input


class TwoInTwoOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x, tokens):
        return self.lin(x), tokens * 2


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi")
    torch.manual_seed(0)
    model = TwoInTwoOut().eval()
    args = (torch.randn(2, 3), torch.arange(4).reshape(2, 2))
    export_onnx(
        model, args, folder / "multi.onnx", input_names=["x", "tokens"], output_names=["y", "t2"]
    )
    return model, folder / "multi.onnx"


def test_run_single_array_matches_torch(mlp_onnx):
    model, path = mlp_onnx
    pred = OnnxPredictor(path, threads=1)
    x = example_input(model, batch=6, seed=3)
    out = pred.run(x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-5, rtol=0)
    assert pred.input_names == ("input",)
    np.testing.assert_array_equal(pred.run({"input": x.numpy()}), out)


def test_wrong_name_dtype_shape_name_expected(mlp_onnx):
    _, path = mlp_onnx
    pred = OnnxPredictor(path)
    good = np.zeros((2, 13), np.float32)
    with pytest.raises(ConfigError, match=r"missing \['input'\].*unknown \['x'\].*float32"):
        pred.run({"x": good})
    with pytest.raises(ConfigError, match=r"float64; expected float32"):
        pred.run(good.astype(np.float64))
    with pytest.raises(ConfigError, match=r"\(2, 12\).*input: float32\[batch, 13\]"):
        pred.run(np.zeros((2, 12), np.float32))
    with pytest.raises(ConfigError, match=r"\(13,\)"):
        pred.run(np.zeros(13, np.float32))
    with pytest.raises(ConfigError, match="numpy array"):
        pred.run({"input": [[0.0] * 13]})


def test_multi_input_output(multi):
    model, path = multi
    pred = OnnxPredictor(path)
    x = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)
    tokens = np.arange(6, dtype=np.int64).reshape(3, 2)
    out = pred.run({"x": x, "tokens": tokens})
    assert sorted(out) == ["t2", "y"]
    with torch.no_grad():
        ref_y, ref_t = model(torch.from_numpy(x), torch.from_numpy(tokens))
    np.testing.assert_allclose(out["y"], ref_y.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out["t2"], ref_t.numpy())
    with pytest.raises(ConfigError, match="pass a dict.*x: float32.*tokens: int64"):
        pred.run(x)


def test_predict_file_npy_roundtrip(mlp_onnx, tmp_path):
    model, path = mlp_onnx
    x = example_input(model, batch=5).numpy()
    np.save(tmp_path / "in.npy", x)
    done = predict_file(path, tmp_path / "in.npy", tmp_path / "out.npy")
    assert done.path == tmp_path / "out.npy" and done.elapsed_ms > 0
    assert list(done.output_shapes.values()) == [np.load(done.path).shape]
    with torch.no_grad():
        np.testing.assert_allclose(
            np.load(tmp_path / "out.npy"), model(torch.from_numpy(x)).numpy(), atol=1e-5, rtol=0
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy", "out.npy"]


def test_predict_file_npz_multi(multi, tmp_path):
    _, path = multi
    np.savez(tmp_path / "in.npz", x=np.ones((2, 3), np.float32), tokens=np.ones((2, 2), np.int64))
    done = predict_file(path, tmp_path / "in.npz", tmp_path / "out.npz")
    out = load_arrays(tmp_path / "out.npz")
    assert sorted(out) == ["t2", "y"] and out["y"].shape == (2, 2)
    assert done.output_shapes == {k: v.shape for k, v in out.items()}
    with pytest.raises(ConfigError, match=r"2 outputs \['t2', 'y'\].*\.npz"):
        predict_file(path, tmp_path / "in.npz", tmp_path / "bad.npy")
    assert not (tmp_path / "bad.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz", "out.npz"]


def test_bad_files(mlp_onnx, tmp_path):
    _, path = mlp_onnx
    np.save(tmp_path / "x.npy", np.zeros((2, 13), np.float32))
    full = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(full[:60])
    with pytest.raises(FormatError, match="cut.npy"):
        predict_file(path, tmp_path / "cut.npy", tmp_path / "o.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FormatError, match="obj.npy"):
        load_arrays(tmp_path / "obj.npy")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(FormatError, match="bad.onnx"):
        OnnxPredictor(tmp_path / "bad.onnx")
    with pytest.raises(MissingFileError, match="does not exist"):
        OnnxPredictor(tmp_path / "missing.onnx")
    with pytest.raises(MissingFileError, match="does not exist"):
        predict_file(path, tmp_path / "x.npy", tmp_path / "no" / "o.npy")
    with pytest.raises(ConfigError, match=r"\.npy or \.npz"):
        save_arrays(tmp_path / "o.csv", np.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "cut.npy", "obj.npy", "x.npy"]
