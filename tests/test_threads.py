"""One thread setting for torch and qsim (issue 12)."""

import subprocess
import sys

import pytest
import torch

from qtcompress.errors import ConfigError
from qtcompress.qnn.backends import QsimBackend, set_threads, usable_cpu_count
from tests.cli_helpers import ROOT, assert_one_line_error


def test_set_threads_sets_torch_and_qsim_defaults():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        assert QsimBackend().threads == 1
        assert QsimBackend(threads=2).threads == 2  # an explicit count wins
        set_threads(None)
        assert QsimBackend().threads == usable_cpu_count()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads must be a positive integer"):
        set_threads(0)


@pytest.mark.slow  # fresh interpreters: about 3 s of imports each
@pytest.mark.parametrize(
    ("user_env", "expected"),
    [
        ({}, "None 1000 1"),  # the CLI's default: a short spin
        ({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None 1"),  # the user's own setting wins
    ],
)
def test_cli_threads_option_and_wait_policy(user_env, expected):
    # libgomp reads its wait settings once, when torch loads: only a new process shows them.
    code = (
        "import os, qtcompress.cli as c; c.main(['--threads', '1', 'qnn', '--qubits', '4', "
        "'--layers', '1', '--json']); import torch; "
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), "
        "torch.get_num_threads())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **user_env},
        check=True,
    ).stdout
    assert out.strip().endswith(expected)


def test_cli_threads_must_be_positive(cli):
    result = cli("--threads", "0", "qnn")
    assert_one_line_error(result, code=2)
    assert "--threads: expected a positive integer, got 0" in result.stderr
