"""`qtcompress compress` and `qtcompress demo` end to end (real qsim, real onnxruntime, real
files), on a small config so that the suite stays fast: one run of each in a subprocess (the
console script), the rest in-process."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from qtcompress.examples import TabularMLP, load_dataset
from qtcompress.generator_file.load import load_generator
from tests.cli_helpers import ROOT, assert_one_line_error, run

FAST = [
    "--fit-steps",
    "10",
    "--finetune-steps",
    "10",
    "--no-progress",
]
CKPT = ROOT / "models" / "wine_mlp.safetensors"
WINE = ["--factory", "qtcompress.examples:TabularMLP", "--data", "wine"]


@pytest.mark.slow
def test_compress_writes_verified_files(tmp_path):
    result = run("compress", str(CKPT), *WINE, "-o", str(tmp_path / "out"), "--json", *FAST)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["generated_weights"] == 1603 == summary["original_params"]
    assert summary["checkpoint_bytes"] == CKPT.stat().st_size
    assert 0 <= summary["accuracy_finetuned"] <= 1 and summary["accuracy_original"] > 0.9
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "summary.json",
        "wine_mlp.onnx",
        "wine_mlp.qtc.safetensors",
    ]
    assert (
        json.loads((out / "summary.json").read_text())["generator_params"]
        == summary["generator_params"]
    )
    # the ONNX file runs in onnxruntime and matches the network rebuilt from the generator file
    gen = load_generator(out / "wine_mlp.qtc.safetensors")
    assert gen.verify_weights().identical
    model = gen.load_into(TabularMLP()).eval()
    x = load_dataset("wine").x_test
    sess = ort.InferenceSession(str(out / "wine_mlp.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-5)


@pytest.mark.slow
def test_demo_runs_the_shipped_example(tmp_path):
    result = run("demo", *FAST, "-o", "demo-out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for label in (
        "original parameters",
        "generator parameters",
        "compression ratio",
        "checkpoint file",
        "generator file",
        "ONNX file",
        "accuracy: original",
        "fidelity: phase 1",
        "fidelity: fine-tuned",
        "ONNX vs torch",
        "latency batch 1",
    ):
        assert label in result.stdout
    assert "97.21%" in result.stdout  # the shipped checkpoint's recorded test accuracy
    assert (tmp_path / "demo-out" / "digits_cnn28.qtc.safetensors").is_file()


def test_compress_report_writes_pictures(tmp_path, cli):
    pytest.importorskip("matplotlib")
    result = cli("compress", CKPT, *WINE, "-o", tmp_path / "o", "--report", *FAST)
    assert result.returncode == 0, result.stderr
    report = tmp_path / "o" / "report"
    assert {p.name for p in report.iterdir()} == {"losses.png", "weights.png", "report.md"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["{tmp}/nope.pt", "-o", "{tmp}/o", *WINE], "nope.pt"),
        (["{ckpt}", "-o", "{tmp}/a/b", *WINE], "does not exist"),
        (["{ckpt}", "-o", "{tmp}/o", *WINE[:2], "--data", "{tmp}/missing.npz"], "missing.npz"),
        (
            [
                "{ckpt}",
                "-o",
                "{tmp}/o",
                "--factory",
                "qtcompress.examples:DigitsCNN",
                "--data",
                "wine",
            ],
            "does not fit",
        ),
        (["{tmp}/whole.pt", "-o", "{tmp}/o", "--data", "wine"], "--trust-pickle"),
    ],
    ids=[
        "missing-checkpoint",
        "missing-output-parent",
        "missing-data",
        "wrong-factory",
        "pickled-model",
    ],
)
def test_compress_bad_inputs_exit_1_with_one_line(tmp_path, cli, args, needle):
    torch.save(TabularMLP(), tmp_path / "whole.pt")
    args = [a.format(tmp=tmp_path, ckpt=CKPT) for a in args]
    result = cli("compress", *args, *FAST)
    assert_one_line_error(result)
    assert needle in result.stderr
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--chunk", "0"], "--chunk: expected a positive integer"),
        (["--mode", "magic"], "--mode: invalid choice: 'magic'"),
    ],
)
def test_compress_bad_flag_values_are_usage_errors(tmp_path, cli, flags, match):
    result = cli("compress", CKPT, "-o", tmp_path / "o", *WINE, *FAST, *flags)
    assert_one_line_error(result, code=2)
    assert match in result.stderr
    assert not (tmp_path / "o").exists()


def test_subprocess_usage_error_exit_2(tmp_path):
    result = run("compress", "x.pt", "-o", str(tmp_path), "--data", "wine", "--chunk", "0")
    assert_one_line_error(result, code=2)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--chunk", "4"], "--chunk: only with --scheme flat"),
        (["--mapping", "mps"], "--mapping mps: only with --scheme flat"),
        (
            ["--scheme", "flat", "--budget", "5%"],
            "--rank and --budget size the rows and hashed schemes",
        ),
    ],
)
def test_scheme_specific_flags_are_refused_with_the_fix(cli, flags, match):
    result = cli("compress", CKPT, *WINE, "-o", "unused", *flags)
    assert result.returncode == 2 and match in result.stderr


def test_out_names_the_output_folder_where_it_was_an_ambiguous_prefix():
    from qtcompress.cli.parser import build_parser

    parser = build_parser()
    args = parser.parse_args(["compress", "m.pt", "--data", "d.npz", "--out", "dir"])
    assert args.output == "dir"
    assert parser.parse_args(["demo", "--out", "d2"]).output == "d2"
    args = parser.parse_args(["predict", "f.onnx", "x.npz", "--out", "p.npy"])
    assert args.output == "p.npy"
