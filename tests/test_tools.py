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


@pytest.fixture(scope="module")
def bench_suite():
    return load_tool("bench_suite")


@pytest.mark.parametrize("student", ["LowRankStudent", "PrunedStudent"])
def test_bench_suite_students_fit_the_budget(bench_suite, student):
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    built = getattr(bench_suite, student)(model, 1500)
    assert bench_suite.count(built) <= 1500
    shapes = {n: t.shape for n, t in built.tensors().items()}
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
