"""Run the command line in a subprocess (the real console entry) or in-process (fast), and load
the scripts under tools/ as modules.

Both ways of running the CLI return a :class:`subprocess.CompletedProcess` (exit code, stdout,
stderr), so a test asserts the same things whichever way it runs. Use the subprocess only where
a fresh process matters: start-up, import side effects, the console script's exit code, or
loading a file in a process that did not write it.
"""

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


def run_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """The CLI in-process: the same code path as the console script, without the start-up.

    ``main`` returns the exit code; argparse's usage errors and ``--help`` exit with
    ``SystemExit``, whose code is the exit code too. Earlier captured output is discarded.
    """
    from qtcompress.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
        code = 0 if exc.code is None else int(exc.code)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["qtcompress", *args], code, out, err)


def main_result(capsys, *args: str) -> tuple[int, str]:
    """The CLI in-process: its exit code and stderr."""
    result = run_in_process(capsys, *args)
    return result.returncode, result.stderr


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
    if str(ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(ROOT / "tools"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module
