"""Run the command line in a subprocess (the real console entry) or in-process (fast), and load
the scripts under tools/ as modules."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "qtcompress.cli"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, with the repo on PYTHONPATH (so tests.* factories resolve)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, cwd=cwd)


def main_result(capsys, *args: str) -> tuple[int, str]:
    """The CLI in-process: the same code path as the console script, without the start-up."""
    from qtcompress.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code)
    return code, capsys.readouterr().err


def assert_one_line_error(result: subprocess.CompletedProcess, code: int = 1) -> None:
    """Exit code as given, no traceback; errors are one line (argparse adds its usage lines)."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    if code == 1:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def load_tool(name: str) -> ModuleType:
    """A script under ``tools/`` as a module, importable as when run as ``python tools/X.py``."""
    sys.path.insert(0, str(ROOT / "tools"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module
