"""Smoke tests of the benchmark tools: they run and write their section, nothing timed here."""


from tests.cli_helpers import load_tool


def test_bench_qnn_writes_its_section_and_keeps_others(tmp_path):
    bench = load_tool("bench_qnn")
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n<!-- other:start -->\nkeep me\n<!-- other:end -->\n")
    assert bench.main(["--qubits", "4", "--layers", "1", "2", "--shift-limit", "5",
                       "--output", str(out)]) == 0
    text = out.read_text()
    assert "keep me" in text
    rows = [line for line in text.splitlines() if line.startswith("| 4 |")]
    assert len(rows) == 2
    # run again: the section is replaced, not appended
    bench.main(["--qubits", "4", "--layers", "1", "--output", str(out)])
    text = out.read_text()
    assert text.count("<!-- bench_qnn:start -->") == 1
    assert len([line for line in text.splitlines() if line.startswith("| 4 |")]) == 1
