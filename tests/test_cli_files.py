"""`inspect`, `reconstruct` and `verify` end to end in subprocesses, on the golden file."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from safetensors.torch import load_file

from tests.cli_helpers import ROOT, assert_one_line_error, main_result, run

GOLDEN = ROOT / "tests" / "data" / "golden_mlp.qtc.safetensors"


@pytest.fixture()
def gen_file(tmp_path):
    path = tmp_path / "mlp.qtc.safetensors"
    shutil.copy(GOLDEN, path)
    return path


def test_inspect_json(gen_file):
    result = run("inspect", str(gen_file), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["generated_weights"] == 307 and info["qubits"] == 7 and info["layers"] == 2
    assert [t["name"] for t in info["targets"]][:2] == ["net.0.weight", "net.0.bias"]
    assert info["onnx_graph"] is True and info["file_bytes"] == gen_file.stat().st_size


def test_reconstruct_writes_onnx_and_state_dict(gen_file, tmp_path):
    onnx_path, sd_path = tmp_path / "m.onnx", tmp_path / "m.safetensors"
    result = run("reconstruct", str(gen_file), "--onnx", str(onnx_path),
                 "--state-dict", str(sd_path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["weights_identical"] or report["weights_equivalent"]
    assert report["onnx_max_abs_diff"] <= 1e-5
    state = load_file(str(sd_path))
    reference = load_file(str(ROOT / "tests" / "data" / "golden_mlp.weights.safetensors"))
    assert set(state) == set(reference)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(5, 13)).astype(np.float32)
    w = {k: v.numpy().astype(np.float64) for k, v in state.items()}
    # the MLP by hand: Linear -> LayerNorm -> ReLU -> Linear
    h = x @ w["net.0.weight"].T + w["net.0.bias"]
    h = (h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, keepdims=True) + 1e-5)
    h = np.maximum(h * w["net.1.weight"] + w["net.1.bias"], 0)
    expected = h @ w["net.3.weight"].T + w["net.3.bias"]
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_verify_with_factory(gen_file):
    result = run("verify", str(gen_file), "--factory", "tests.tiny_models:TinyMLP", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["torch_vs_recorded_max_abs_diff"] <= 1e-5


def test_bad_inputs_exit_non_zero_with_one_line(gen_file, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    truncated = tmp_path / "t.qtc.safetensors"
    truncated.write_bytes(gen_file.read_bytes()[:1000])
    for command in ("inspect", "reconstruct", "verify"):
        extra = ["--onnx", str(tmp_path / "o.onnx")] if command == "reconstruct" else []
        for path in (truncated, tmp_path / "missing.qtc.safetensors"):
            code, err = main_result(capsys, command, str(path), *extra)
            assert code == 1 and len(err.strip().splitlines()) == 1, err
            assert path.name in err
    assert not (tmp_path / "o.onnx").exists()
    code, err = main_result(capsys, "reconstruct", str(gen_file))
    assert code == 2 and "needs --onnx" in err
    assert main_result(capsys, "reconstruct", str(gen_file), "--atol", "abc")[0] == 2
    code, err = main_result(capsys, "reconstruct", str(gen_file), "--onnx",
                            str(tmp_path / "no" / "m.onnx"))
    assert code == 1 and "does not exist" in err
    code, err = main_result(capsys, "verify", str(gen_file), "--factory",
                            "tests.tiny_models:TinyCNN")
    assert code == 1 and "does not fit" in err and len(err.strip().splitlines()) == 1


def test_subprocess_error_is_one_line(tmp_path):
    result = run("inspect", str(tmp_path / "missing.qtc.safetensors"))
    assert_one_line_error(result)


def test_debug_flag_shows_traceback(tmp_path):
    result = run("--debug", "inspect", str(tmp_path / "missing.qtc.safetensors"))
    assert result.returncode != 0 and "Traceback" in result.stderr
