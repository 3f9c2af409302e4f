"""`qtcompress compress` and `qtcompress demo` end to end in subprocesses (real qsim, real
onnxruntime, real files), on a small config so that the suite stays fast."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from qtcompress.examples import TabularMLP, load_dataset
from qtcompress.generator_file import load_generator
from tests.cli_helpers import ROOT, assert_one_line_error, main_result, run

FAST = ["--fit-steps", "10", "--finetune-steps", "10", "--layers", "2",
        "--hidden", "8", "--no-progress"]


def test_compress_writes_verified_files(tmp_path):
    ckpt = ROOT / "models" / "wine_mlp.safetensors"
    result = run("compress", str(ckpt), "--factory", "qtcompress.examples:TabularMLP",
                 "--data", "wine", "-o", str(tmp_path / "out"), "--json", *FAST)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["generated_weights"] == 1603 == summary["original_params"]
    assert summary["checkpoint_bytes"] == ckpt.stat().st_size
    assert 0 <= summary["accuracy_finetuned"] <= 1 and summary["accuracy_original"] > 0.9
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "summary.json", "wine_mlp.onnx", "wine_mlp.qtc.safetensors"]
    assert json.loads((out / "summary.json").read_text())["generator_params"] == \
        summary["generator_params"]
    # the ONNX file runs in onnxruntime and matches the network rebuilt from the generator file
    gen = load_generator(out / "wine_mlp.qtc.safetensors")
    assert gen.verify_weights().identical
    model = gen.load_into(TabularMLP()).eval()
    x = load_dataset("wine").x_test
    sess = ort.InferenceSession(str(out / "wine_mlp.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-5)


def test_demo_runs_the_shipped_example(tmp_path):
    result = run("demo", *FAST, "-o", "demo-out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for label in ("original parameters", "generator parameters", "compression ratio",
                  "checkpoint file", "generator file", "ONNX file", "accuracy: original",
                  "fidelity: phase 1", "fidelity: fine-tuned", "ONNX vs torch",
                  "latency batch 1"):
        assert label in result.stdout
    assert "97.21%" in result.stdout  # the shipped checkpoint's recorded test accuracy
    assert (tmp_path / "demo-out" / "digits_cnn28.qtc.safetensors").is_file()


def test_compress_report_writes_pictures(tmp_path):
    pytest.importorskip("matplotlib")
    result = run("compress", str(ROOT / "models" / "wine_mlp.safetensors"), "--factory",
                 "qtcompress.examples:TabularMLP", "--data", "wine", "-o", str(tmp_path / "o"),
                 "--report", *FAST)
    assert result.returncode == 0, result.stderr
    report = tmp_path / "o" / "report"
    assert {p.name for p in report.iterdir()} == {"losses.png", "weights.png", "report.md"}


def test_compress_bad_inputs(tmp_path, capsys):
    base = ["--factory", "qtcompress.examples:TabularMLP", "--data", "wine", *FAST]
    ckpt = str(ROOT / "models" / "wine_mlp.safetensors")
    pickled = tmp_path / "whole.pt"
    torch.save(TabularMLP(), pickled)
    cases = [
        (["compress", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "o"), *base], "nope.pt"),
        (["compress", ckpt, "-o", str(tmp_path / "a" / "b"), *base], "does not exist"),
        (["compress", ckpt, "-o", str(tmp_path / "o"), *base[:2], "--data",
          str(tmp_path / "missing.npz"), *FAST], "missing.npz"),
        (["compress", ckpt, "-o", str(tmp_path / "o"), "--factory",
          "qtcompress.examples:DigitsCNN", "--data", "wine", *FAST], "does not fit"),
        (["compress", str(pickled), "-o", str(tmp_path / "o"), "--data", "wine", *FAST],
         "--trust-pickle"),
    ]
    for args, needle in cases:
        code, err = main_result(capsys, *args)
        assert code == 1, (args, err)
        assert needle in err and len(err.strip().splitlines()) == 1, err
    for flag in (["--chunk", "0"], ["--mode", "magic"]):
        code, err = main_result(capsys, "compress", ckpt, "-o", str(tmp_path / "o"), *base, *flag)
        assert code == 2 and "error:" in err
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_subprocess_usage_error_exit_2(tmp_path):
    result = run("compress", "x.pt", "-o", str(tmp_path), "--data", "wine", "--chunk", "0")
    assert_one_line_error(result, code=2)


@pytest.mark.parametrize(("flags", "match"), [
    (["--chunk", "4"], "--chunk: only with --scheme flat"),
    (["--mapping", "mps"], "--mapping mps: only with --scheme flat"),
    (["--scheme", "flat", "--budget", "5%"], "--rank and --budget size the rows scheme"),
])
def test_scheme_specific_flags_are_refused_with_the_fix(capsys, flags, match):
    code, err = main_result(capsys, "compress", str(ROOT / "models" / "wine_mlp.safetensors"),
                            "--factory", "qtcompress.examples:TabularMLP", "--data", "wine",
                            "-o", "unused", *flags)
    assert code == 2 and match in err
