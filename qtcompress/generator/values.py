"""Shared-value sources of the hashed scheme: where the ``B`` bucket values come from.

The hashed generator (:mod:`qtcompress.generator.hashed`) gives every weight a signed, scaled
copy of one of ``B`` shared values. This module makes those values, one registered source per
kind, so that QT and its controls differ in nothing else:

- ``"qnn"`` (Quantum-Train): ``v_b = B * p_b - 1``, ``p`` the probabilities of an n-qubit
  paper-ansatz circuit simulated by qsim, ``B = 2**n``; the circuit's angles are trained.
- ``"mps"``: the same read-out of a real matrix-product-state Born machine over the n index
  bits with about the QNN's parameter count (the classical twin of a 2**n probability vector).
- ``"table"``: a free trainable table of ``B`` values (HashedNets inside the same structure).
- ``"frozen"``: a probability vector drawn once (``|g|**2`` normalised, the statistics of a
  deep random circuit) and never trained.
- ``"zeros"``: the probability channel removed (``p = 0``, every value ``-1``).

Every source's values are a deterministic function of its parameters and its seed, so a
generator file rebuilds them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from qtcompress.plugins import Registry
from qtcompress.qnn import QNN
from qtcompress.qnn.ansatz import make_ansatz


class ValueSource(nn.Module):
    """``forward() -> (n_values,)`` float32 shared values (differentiable in the parameters)."""

    n_values: int
    n_qubits: int = 0
    n_layers: int = 0

    def count(self) -> int:
        """Trainable parameters of the source."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class QNNValues(ValueSource):
    """The QNN's basis-state probabilities, centred: ``v = 2**n * p - 1`` (mean exactly 0)."""

    def __init__(
        self,
        n_qubits: int,
        n_layers: int,
        *,
        backend: str = "qsim",
        seed: int = 0,
        ansatz: str = "paper",
    ) -> None:
        super().__init__()
        self.qnn = QNN(make_ansatz(ansatz, n_qubits, n_layers), backend=backend, seed=seed)
        self.n_qubits, self.n_layers, self.n_values = n_qubits, n_layers, 2**n_qubits

    def forward(self) -> torch.Tensor:
        """The shared values, ``(n_values,)`` float32."""
        return self.qnn() * float(self.n_values) - 1.0  # (2^n,)


class MPSValues(ValueSource):
    """A real MPS Born machine over the n index bits, read out as the QNN is.

    ``psi_b = l^T A_1[b_1] ... A_n[b_n] r`` with ``(chi, chi)`` matrices per site and bit,
    ``p = psi**2 / sum(psi**2)``, ``v = 2**n * p - 1``.
    """

    def __init__(self, n_qubits: int, bond_dim: int, *, seed: int = 0) -> None:
        super().__init__()
        self.n_qubits, self.n_values, self.bond_dim = n_qubits, 2**n_qubits, bond_dim
        g = torch.Generator().manual_seed(seed)
        chi = bond_dim
        # Near-identity cores: the initial distribution is smooth, not concentrated on a state.
        eye = torch.eye(chi).expand(n_qubits, 2, chi, chi)
        self.cores = nn.Parameter(eye + torch.randn(n_qubits, 2, chi, chi, generator=g) / chi)
        self.left = nn.Parameter(torch.randn(chi, generator=g) / math.sqrt(chi))

    def forward(self) -> torch.Tensor:
        """The shared values, ``(n_values,)`` float32."""
        amp = self.left[None, :]  # (1, chi): amplitudes of every prefix so far
        for k in range(self.n_qubits):
            # (2^k, chi) x (2, chi, chi) -> (2^k, 2, chi): bit k is the next, less significant bit.
            amp = torch.einsum("sc,bcd->sbd", amp, self.cores[k]).reshape(-1, self.bond_dim)
        psi = amp.sum(1)  # (2^n,): the right boundary is all ones
        p = psi**2 / (psi**2).sum().clamp_min(1e-30)
        return p * float(self.n_values) - 1.0


class TableValues(ValueSource):
    """A free trainable table of ``n_values`` values (HashedNets' shared weights)."""

    def __init__(self, n_values: int, *, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.n_values = n_values
        self.n_qubits = max(1, math.ceil(math.log2(n_values)))  # index bits, for descriptions
        self.table = nn.Parameter(torch.randn(n_values, generator=g))

    def forward(self) -> torch.Tensor:
        """The shared values, ``(n_values,)`` float32."""
        return self.table


class FrozenValues(ValueSource):
    """A probability vector drawn once from the seed and never trained (a QNN control)."""

    def __init__(self, n_qubits: int, *, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.n_qubits, self.n_values = n_qubits, 2**n_qubits
        p = torch.randn(self.n_values, generator=g) ** 2
        self.register_buffer("_values", p / p.sum() * float(self.n_values) - 1.0, persistent=False)

    def forward(self) -> torch.Tensor:
        """The shared values, ``(n_values,)`` float32."""
        values: torch.Tensor = self._values  # type: ignore[assignment]
        return values


class ZeroValues(ValueSource):
    """No probability channel: ``p = 0``, so every value is ``-1`` (a QNN control)."""

    def __init__(self, n_qubits: int) -> None:
        super().__init__()
        self.n_qubits, self.n_values = n_qubits, 2**n_qubits
        self.register_buffer("_values", -torch.ones(self.n_values), persistent=False)

    def forward(self) -> torch.Tensor:
        """The shared values, ``(n_values,)`` float32."""
        values: torch.Tensor = self._values  # type: ignore[assignment]
        return values


# Bond dimension of the MPS control for a parameter allowance: n sites x 2 bits x chi^2.
def mps_bond_dim(n_qubits: int, allowance: int) -> int:
    """The largest bond dimension whose MPS fits ``allowance`` parameters (at least 1)."""
    return max(1, int(math.sqrt(max(1, allowance - 1) / (2 * n_qubits))))


# name -> builder(n_qubits, n_layers, allowance, backend, seed, ansatz)
SourceBuilder = Callable[[int, int, int, str, int, str], ValueSource]
VALUE_SOURCES: Registry[SourceBuilder] = Registry("value source", sort_names=True)


def register_values(name: str, builder: SourceBuilder) -> None:
    """Register a shared-value source for ``QTConfig(scheme="hashed", values=name)``."""
    VALUE_SOURCES.add(name, builder)


register_values(
    "qnn",
    lambda n, layers, _a, backend, seed, ansatz: QNNValues(
        n, layers, backend=backend, seed=seed, ansatz=ansatz
    ),
)
register_values(
    "mps",
    lambda n, _l, allowance, _b, seed, _an: MPSValues(n, mps_bond_dim(n, allowance), seed=seed),
)
register_values("table", lambda _n, _l, allowance, _b, seed, _an: TableValues(allowance, seed=seed))
register_values("frozen", lambda n, _l, _a, _b, seed, _an: FrozenValues(n, seed=seed))
register_values("zeros", lambda n, _l, _a, _b, _s, _an: ZeroValues(n))


def check_values(kind: str) -> str:
    """Validate a value source name (a :class:`ConfigError` naming the registered ones)."""
    return VALUE_SOURCES.check(kind)


def make_values(
    kind: str,
    n_qubits: int,
    n_layers: int,
    allowance: int,
    backend: str,
    seed: int,
    ansatz: str = "paper",
) -> ValueSource:
    """Build a registered source by name (see the module docstring)."""
    return VALUE_SOURCES[kind](n_qubits, n_layers, allowance, backend, seed, ansatz)
