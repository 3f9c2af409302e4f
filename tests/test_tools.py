"""Smoke tests of the benchmark tools: they run and write their section, nothing timed here."""

import json

import pytest
from torch import nn

from tests.cli_helpers import load_tool


def test_bench_qnn_writes_its_section_and_keeps_others(tmp_path):
    bench = load_tool("bench_qnn")
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n<!-- other:start -->\nkeep me\n<!-- other:end -->\n")
    assert (
        bench.main(
            ["--qubits", "4", "--layers", "1", "2", "--shift-limit", "5", "--output", str(out)]
        )
        == 0
    )
    text = out.read_text()
    assert "keep me" in text
    rows = [line for line in text.splitlines() if line.startswith("| 4 |")]
    assert len(rows) == 2
    # run again: the section is replaced, not appended
    bench.main(["--qubits", "4", "--layers", "1", "--output", str(out)])
    text = out.read_text()
    assert text.count("<!-- bench_qnn:start -->") == 1
    assert len([line for line in text.splitlines() if line.startswith("| 4 |")]) == 1


def test_bench_qnn_pennylane_runs_the_same_circuit():
    # Optional comparison (pip install -e .[bench]): the PennyLane circuit must give qtcompress's
    # probabilities and adjoint gradient, and the check must reject a qubit-order mix-up.
    pytest.importorskip("pennylane")
    bench = load_tool("bench_qnn")
    frameworks, notes = bench.load_frameworks(["pennylane"], 8.0)
    if not frameworks:
        pytest.skip(notes[0])
    pennylane = frameworks[0]
    err_p, err_g = bench.check_equivalence(pennylane, n_qubits=3, n_layers=1)
    assert err_p < 1e-5 and err_g < 1e-5

    class BitsReversed(bench.Framework):
        label = "PennyLane, qubit order reversed"

        def build(self, program, angles, g):
            forward, forward_grad = pennylane.build(program, angles, g)
            n = program.n_qubits
            return lambda: forward().reshape([2] * n).transpose().reshape(-1), forward_grad

    with pytest.raises(RuntimeError, match="not simulate the same circuit"):
        bench.check_equivalence(BitsReversed(), n_qubits=3, n_layers=1)


@pytest.fixture(scope="module")
def bench_suite():
    return load_tool("bench_suite")


@pytest.mark.parametrize("student", ["LowRankStudent", "PrunedStudent"])
def test_bench_suite_students_fit_the_budget(bench_suite, student):
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    built = getattr(bench_suite, student)(model, 1500)
    assert bench_suite.count(built) <= 1500
    shapes = {n: t.shape for n, t in built.generate_named().items()}
    assert shapes == {n: p.shape for n, p in model.named_parameters()}


def test_bench_suite_rows_resume(bench_suite, tmp_path, capsys):
    # Finished runs are kept in --rows; --write-only makes the table without measuring.
    row = bench_suite.Row(
        "cnn",
        0.05,
        "qt",
        0,
        100,
        2000,
        0.9,
        0.1,
        0.97,
        "agreement",
        0.96,
        0.97,
        False,
        1000,
        20000,
        12.0,
    )
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(row.__dict__) + "\n")
    assert bench_suite.main(["--rows", str(rows), "--write-only", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "| cnn | 5% | qt | 100 (5.00%) | 0.900 | 10.00% | agreement 97.00% |" in out
    assert "(20.0x smaller)" in out


@pytest.mark.slow
def test_bench_export_counts_one_export_for_the_pipeline_and_two_without_sharing(capsys):
    bench = load_tool("bench_export")
    result = bench.rounds(1)
    assert result["once"]["exports"] == 1 and result["once"]["passes"] == 1
    assert result["twice"]["exports"] == 2 and result["twice"]["passes"] == 2
    assert result["once"]["export_s"] > 0 and result["twice"]["export_s"] > 0
    text = bench.to_markdown(result, None)
    assert "| once (the pipeline now) |" in text and "`torch.onnx.export` calls" in text
