"""Every ```python block of README.md runs as written, each in a fresh interpreter.

A block runs in a temporary folder (the files it writes stay there) in which ``models/`` points
at the repository's shipped checkpoints, so that paths relative to the repository root resolve.
"""

import os
import re
import subprocess
import sys

import pytest

from tests.cli_helpers import ROOT

README = ROOT / "README.md"


def python_blocks() -> list[tuple[int, str]]:
    """(line of the opening fence, code) for every ```python block of the README."""
    text = README.read_text()
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    ]


def test_the_readme_has_python_blocks():
    firsts = [code.splitlines()[0] for _, code in python_blocks()]
    assert len(firsts) >= 3, firsts


@pytest.mark.slow
@pytest.mark.parametrize(
    "code",
    [code for _, code in python_blocks()],
    ids=[f"README.md:{line}" for line, _ in python_blocks()],
)
def test_readme_python_block_runs(code, tmp_path):
    (tmp_path / "models").symlink_to(ROOT / "models")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
