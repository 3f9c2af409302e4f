"""The project's set-up promises: README commands and CI stay in sync, the CLI is installed."""

import json
import re
import subprocess
import sys

import pytest

from tests.cli_helpers import CLI, ROOT, assert_one_line_error


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    marker = next(i for i, line in enumerate(ci) if line.startswith("# README test command"))
    command = ci[marker + 1].strip()
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    assert any(command == block.strip() for block in blocks), command


def test_torch_is_pinned_for_the_install_step():
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    readme = (ROOT / "README.md").read_text()
    assert readme.count("-c constraints.txt") >= 2


def test_cli_help_and_exit_codes(cli):
    ok = cli("--help")
    assert ok.returncode == 0 and "qnn" in ok.stdout
    usage = cli("qnn", "--qubits", "zero")
    assert_one_line_error(usage, code=2)
    assert "expected a positive integer" in usage.stderr
    error = cli("qnn", "--qubits", "31")
    assert_one_line_error(error)
    assert "exceeds the limit of 30 qubits" in error.stderr


@pytest.mark.slow  # a fresh interpreter: about 3 s of imports first
def test_cli_qnn_json_output():
    """The `qnn` command through the console script, in a fresh interpreter."""
    out = subprocess.run(
        [*CLI, "qnn", "--qubits", "4", "--layers", "2", "--top", "3", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout)
    assert result["num_params"] == 8 and result["num_states"] == 16
    probs = [row["p"] for row in result["top_states"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_top_level_verbs_are_the_real_objects():
    import qtcompress
    from qtcompress.api import QTModel, compress, load
    from qtcompress.config import QTConfig

    assert qtcompress.compress is compress and qtcompress.QTConfig is QTConfig
    assert qtcompress.load is load and qtcompress.QTModel is QTModel
    # One save/load surface: QTModel.save and load (the file functions are not top-level).
    with pytest.raises(AttributeError, match="has no attribute 'save_generator'"):
        qtcompress.save_generator  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
        qtcompress.no_such_thing  # noqa: B018


def test_config_imports_nothing_heavy():
    code = (
        "import sys, qtcompress.config; "
        "print(sorted(m for m in ('torch', 'cirq', 'qsimcirq', 'onnx', 'onnxruntime') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert out.strip() == "[]"


def test_readme_layout_names_every_module_and_no_missing_one():
    """The README's Layout section matches the package tree (it is how newcomers find code)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout\n", 1)[1].split("\n## ", 1)[0]
    modules = {
        p.relative_to(ROOT / "qtcompress")
        for p in (ROOT / "qtcompress").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    named = set(re.findall(r"`(?:[\w/]+/)?(\w+\.py)`", section))
    unnamed = sorted(str(m) for m in modules if m.name not in named)
    assert not unnamed, f"modules missing from the README's Layout section: {unnamed}"
    exists = {m.name for m in modules} | {"__init__.py", "baselines.py"}  # baselines: tools/
    stale = sorted(named - exists)
    assert not stale, f"the README's Layout section names modules that do not exist: {stale}"
    for package in sorted({m.parts[0] for m in modules if len(m.parts) > 1} - {"experimental"}):
        assert f"`qtcompress/{package}/`" in section, f"package {package}/ not in the Layout"
