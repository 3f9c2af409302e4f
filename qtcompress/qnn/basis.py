"""The mapping between basis-state index and bit string.

qtcompress uses Cirq's big-endian convention everywhere: for qubits ``q0 ... q_{n-1}`` the basis
state with bits ``b0 b1 ... b_{n-1}`` (``b0`` the value of ``q0``) has index
``sum_k b_k * 2 ** (n - 1 - k)``, so ``q0`` is the most significant bit. qsim numbers qubits in
the reverse order internally; the qsim backend maps Cirq qubit ``k`` to qsim qubit ``n - 1 - k`` so
that its probability vector is indexed exactly as Cirq's.
"""

from __future__ import annotations

import numpy as np

from qtcompress.errors import ConfigError


def index_to_bits(index: int, n_qubits: int) -> str:
    """Return the bit string of a basis-state index, qubit 0 first (most significant).

    Args:
        index: Basis-state index in ``[0, 2**n_qubits)``.
        n_qubits: Number of qubits.

    Returns:
        A string of ``n_qubits`` characters ``'0'``/``'1'``.
    """
    if not 0 <= index < (1 << n_qubits):
        raise ConfigError(f"Index {index} is out of range for {n_qubits} qubits.")
    return format(index, f"0{n_qubits}b")


def bits_to_index(bits: str) -> int:
    """Inverse of :func:`index_to_bits`."""
    if not bits or set(bits) - {"0", "1"}:
        raise ConfigError(f"Expected a non-empty string of 0/1, got {bits!r}.")
    return int(bits, 2)


def bit_matrix(n_qubits: int, count: int | None = None) -> np.ndarray:
    """Bits of the first ``count`` basis states as a ``(count, n_qubits)`` uint8 array.

    Row ``i`` holds the bits of index ``i``, qubit 0 (the most significant bit) first.
    """
    count = (1 << n_qubits) if count is None else count
    idx = np.arange(count, dtype=np.int64)[:, None]  # (count, 1)
    shifts = np.arange(n_qubits - 1, -1, -1, dtype=np.int64)[None, :]  # (1, n)
    return ((idx >> shifts) & 1).astype(np.uint8)


def z_expectations(probs: np.ndarray, n_qubits: int) -> np.ndarray:
    """<Z_k> for every qubit k from a probability vector, in two passes over the vector.

    ``<Z_k> = sum_x p(x) * (1 - 2 * b_k(x))``. Rather than one reduction per qubit (n passes), the
    vector is folded once into row sums (marginal of the high qubits) and column sums (marginal of
    the low qubits), each of which is small.

    Args:
        probs: Shape ``(2**n_qubits,)``, non-negative (need not be normalised).
        n_qubits: Number of qubits.

    Returns:
        Shape ``(n_qubits,)`` float64 array.
    """
    high = n_qubits // 2
    table = probs.reshape(1 << high, 1 << (n_qubits - high))  # (2^high, 2^low)
    rows = table.sum(axis=1, dtype=np.float64)  # marginal over qubits 0..high-1
    cols = table.sum(axis=0, dtype=np.float64)  # marginal over qubits high..n-1
    out = np.empty(n_qubits, dtype=np.float64)
    for marginal, first, count in ((rows, 0, high), (cols, high, n_qubits - high)):
        cube = marginal.reshape((2,) * count) if count else marginal
        for k in range(count):
            axes = tuple(a for a in range(count) if a != k)
            pair = cube.sum(axis=axes) if axes else cube  # (2,): P(b_k=0), P(b_k=1)
            out[first + k] = pair[0] - pair[1]
    return out
