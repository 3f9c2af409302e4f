"""Shared fixtures, test isolation and the rules of the ``slow`` marker.

``slow`` (declared in pyproject.toml) marks every test whose call takes more than
``SLOW_SECONDS`` on a 2-core machine (end-to-end CLI runs, real fits), and every test that runs
the package in a fresh interpreter (about 3 s of imports before it does anything: the console
script's smoke tests, fresh-process loading). CI runs the whole suite, slow tests included
(``python -m pytest -q``); locally, ``python -m pytest -q -m "not slow"`` runs the rest in under
half the time. A run lists, at the end, the unmarked tests that went over ``SLOW_SECONDS``, so
that the marker keeps up with the suite.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from tests.cli_helpers import ROOT, run_in_process
from tests.tiny_models import TinyMLP, example_input

SLOW_SECONDS = 5.0
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_over_budget: list[tuple[str, float]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.duration > SLOW_SECONDS and "slow" not in report.keywords:
        _over_budget.append((report.nodeid, report.duration))


def pytest_terminal_summary(terminalreporter) -> None:
    if _over_budget:
        terminalreporter.section(f"tests over {SLOW_SECONDS:g} s without @pytest.mark.slow")
        for nodeid, seconds in sorted(_over_budget, key=lambda item: -item[1]):
            terminalreporter.write_line(f"{seconds:6.2f}s {nodeid}")


@pytest.fixture(autouse=True)
def _isolated_global_state():
    """Every test starts from torch seed 0 and leaves threads and warning format as it found them.

    The library seeds torch's global RNG when it builds generators, and the in-process CLI may set
    thread counts and swap ``warnings.formatwarning``: without this, a test's random numbers and
    thread count would depend on the tests that ran before it.
    """
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    env = {k: os.environ.get(k) for k in _THREAD_VARS}
    formatwarning = warnings.formatwarning
    yield
    torch.set_num_threads(threads)
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    warnings.formatwarning = formatwarning


@pytest.fixture()
def cli(capsys, monkeypatch):
    """The command line in-process: ``cli("inspect", path)`` -> a ``CompletedProcess``.

    The same result as :func:`tests.cli_helpers.run` (exit code, stdout, stderr) without a new
    interpreter; ``tests.*`` factories resolve as they do with the subprocess's PYTHONPATH.
    """
    monkeypatch.syspath_prepend(str(ROOT))

    def run(*args: str):
        return run_in_process(capsys, *[str(a) for a in args])

    return run


@pytest.fixture(scope="session")
def mlp_onnx(tmp_path_factory):
    """A seeded TinyMLP (13 features, 3 classes) and its ONNX file (dynamic batch)."""
    from qtcompress.onnx.export import export_onnx

    torch.manual_seed(0)
    model = TinyMLP().eval()
    path = tmp_path_factory.mktemp("mlp_onnx") / "mlp.onnx"
    export_onnx(model, example_input(model), path)
    return model, path
