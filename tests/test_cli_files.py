"""`inspect`, `reconstruct` and `verify` end to end on the golden file: reconstruct and verify
once each in a subprocess (the console script), the rest in-process."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from safetensors.torch import load_file

from qtcompress.errors import MissingFileError
from tests.cli_helpers import ROOT, assert_one_line_error, run

GOLDEN = ROOT / "tests" / "data" / "golden_mlp.qtc.safetensors"


@pytest.fixture()
def gen_file(tmp_path):
    path = tmp_path / "mlp.qtc.safetensors"
    shutil.copy(GOLDEN, path)
    return path


def test_inspect_json(gen_file, cli):
    result = cli("inspect", gen_file, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["generated_weights"] == 307 and info["qubits"] == 7 and info["layers"] == 2
    assert [t["name"] for t in info["targets"]][:2] == ["net.0.weight", "net.0.bias"]
    assert info["onnx_graph"] is True and info["file_bytes"] == gen_file.stat().st_size


@pytest.mark.slow  # a fresh interpreter: about 3 s of imports first
def test_reconstruct_writes_onnx_and_state_dict(gen_file, tmp_path):
    onnx_path, sd_path = tmp_path / "m.onnx", tmp_path / "m.safetensors"
    result = run(
        "reconstruct",
        str(gen_file),
        "--onnx",
        str(onnx_path),
        "--state-dict",
        str(sd_path),
        "--json",
    )
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


@pytest.mark.slow  # a fresh interpreter: about 3 s of imports first
def test_verify_with_factory(gen_file):
    result = run("verify", str(gen_file), "--factory", "tests.tiny_models:TinyMLP", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["torch_vs_recorded_max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("command", ["inspect", "reconstruct", "verify"])
@pytest.mark.parametrize("name", ["truncated.qtc.safetensors", "missing.qtc.safetensors"])
def test_bad_files_exit_1_with_one_line(gen_file, tmp_path, cli, command, name):
    (tmp_path / "truncated.qtc.safetensors").write_bytes(gen_file.read_bytes()[:1000])
    extra = ["--onnx", tmp_path / "o.onnx"] if command == "reconstruct" else []
    result = cli(command, tmp_path / name, *extra)
    assert_one_line_error(result)
    assert name in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_reconstruct_usage_errors_exit_2(gen_file, cli):
    result = cli("reconstruct", gen_file)
    assert_one_line_error(result, code=2)
    assert "needs --onnx" in result.stderr
    result = cli("reconstruct", gen_file, "--atol", "abc")
    assert_one_line_error(result, code=2)
    assert "--atol: invalid float value: 'abc'" in result.stderr


def test_reconstruct_into_a_missing_folder_exit_1(gen_file, tmp_path, cli):
    result = cli("reconstruct", gen_file, "--onnx", tmp_path / "no" / "m.onnx")
    assert_one_line_error(result)
    assert "does not exist" in result.stderr
    assert not (tmp_path / "no").exists()


def test_verify_with_a_factory_that_does_not_fit_exit_1(gen_file, cli):
    result = cli("verify", gen_file, "--factory", "tests.tiny_models:TinyCNN")
    assert_one_line_error(result)
    assert "does not fit" in result.stderr


@pytest.mark.slow  # a fresh interpreter: about 3 s of imports first
def test_subprocess_error_is_one_line(tmp_path):
    result = run("inspect", str(tmp_path / "missing.qtc.safetensors"))
    assert_one_line_error(result)


def test_debug_flag_lets_the_traceback_through(tmp_path):
    from qtcompress.cli import main

    missing = tmp_path / "missing.qtc.safetensors"
    with pytest.raises(MissingFileError, match=r"missing\.qtc\.safetensors' does not exist"):
        main(["--debug", "inspect", str(missing)])
