"""Small simulations stay off qsim's OpenMP team unless a count is asked for (issue 12)."""

from __future__ import annotations

import numpy as np
import pytest

from qtcompress.qnn import Ansatz, QsimBackend, simulate
from qtcompress.qnn.backends import SMALL_SIMULATION_QUBITS, usable_cpu_count


@pytest.mark.parametrize(
    ("threads", "n_qubits", "expected"),
    [
        (None, 4, 1),
        (None, SMALL_SIMULATION_QUBITS, 1),
        (None, SMALL_SIMULATION_QUBITS + 1, usable_cpu_count()),
        (2, 4, 2),  # a count given to the backend is honoured at every size
        (2, SMALL_SIMULATION_QUBITS + 1, 2),
    ],
)
def test_threads_for(threads: int | None, n_qubits: int, expected: int) -> None:
    assert QsimBackend(threads=threads).threads_for(n_qubits) == expected


def test_thread_count_does_not_change_the_state() -> None:
    ansatz = Ansatz(n_qubits=6, n_layers=3)
    angles = np.linspace(0.1, 2.0, ansatz.num_params)
    one = simulate(QsimBackend(), ansatz.program(), angles)
    two = simulate(QsimBackend(threads=2), ansatz.program(), angles)
    np.testing.assert_allclose(one, two, atol=1e-6)
