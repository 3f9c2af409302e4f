"""Mapping networks: (basis-state bits, its probability) -> that state's block of weights.

Each basis state ``i`` yields ``chunk`` consecutive weights ``[i * chunk, (i + 1) * chunk)`` of
the flat generated vector (the paper is ``chunk=1``; QPA-style chunking lets a model of millions
of weights use ~20 qubits). A mapping sees only the state's bits (encoded +-1, qubit 0 first) and
one scalar feature of its probability, so the QNN is the only source of per-state freedom beyond
a fixed function of the index.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qtcompress.constants import ACTIVATION_NAMES, PROB_TRANSFORMS
from qtcompress.errors import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = dict(
    zip(ACTIVATION_NAMES, (nn.Tanh, nn.GELU, nn.ReLU, nn.SiLU), strict=True)
)


def transform_probs(probs: torch.Tensor, n_qubits: int, kind: str = "scaled") -> torch.Tensor:
    """Turn basis-state probabilities into an O(1) mapping input.

    Raw probabilities are ~2**-n, far too small for a network input, so they are rescaled by
    the number of states.

    Args:
        probs: Shape ``(2**n,)``.
        n_qubits: n.
        kind: ``"scaled"``: ``2**n * p - 1`` (mean exactly 0; a Haar-random state gives an
            Exp(1)-distributed ``2**n * p``). ``"paper"``: ``(0.8 * tanh(0.1 * 2**(n-1) * p))**0.3``
            minus its mean (arXiv 2405.11304). ``"log"``: ``log(2**n * p + 1e-3)`` standardised.
            ``"none"``: zeros, i.e. the QNN is cut off: a classical control.

    Returns:
        Shape ``(2**n,)`` float32.
    """
    scaled = probs * float(2**n_qubits)
    if kind == "scaled":
        return scaled - 1.0
    if kind == "paper":
        # Clamp before the 0.3 power: its derivative is infinite at 0.
        x = (0.8 * torch.tanh(0.05 * scaled)).clamp_min(1e-6) ** 0.3
        return x - x.mean()
    if kind == "log":
        x = torch.log(scaled + 1e-3)
        return (x - x.mean()) / x.std().clamp_min(1e-6)
    if kind == "none":
        return torch.zeros_like(probs)
    raise ConfigError(f"Unknown prob_transform {kind!r}; choose from {', '.join(PROB_TRANSFORMS)}.")


def signed_bits(n_qubits: int, start: int, stop: int) -> torch.Tensor:
    """Bits of basis states ``start .. stop-1`` as +-1 floats, shape ``(stop-start, n)``.

    Bit value 0 maps to +1 and 1 to -1 (the Z eigenvalue); qubit 0 is the most significant bit,
    as in :func:`qtcompress.qnn.bit_matrix`.
    """
    idx = torch.arange(start, stop, dtype=torch.int64)[:, None]
    shifts = torch.arange(n_qubits - 1, -1, -1, dtype=torch.int64)[None, :]
    return 1.0 - 2.0 * ((idx >> shifts) & 1).to(torch.float32)


class Mapping(nn.Module):
    """Base class: ``forward(bits (S, n), x (S,)) -> (S, chunk)`` weights (before scaling)."""

    n_qubits: int
    chunk: int

    def forward(self, bits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Map a batch of states to their weight blocks."""
        raise NotImplementedError


class MLPMapping(Mapping):
    """The paper's mapping: an MLP on ``[bits, x]`` followed by a shared ``Linear(hidden, chunk)``.

    Args:
        n_qubits: n (input has n + 1 features).
        chunk: Weights emitted per basis state.
        hidden: Hidden layer widths (at least one).
        activation: ``"tanh"`` (default), ``"gelu"``, ``"relu"`` or ``"silu"``. The paper's
            official code uses none, which makes the whole mapping affine in its inputs.
        seed: Seeds the initial weights.
    """

    def __init__(
        self,
        n_qubits: int,
        chunk: int = 1,
        hidden: tuple[int, ...] = (16, 16),
        activation: str = "tanh",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if chunk < 1 or n_qubits < 1:
            raise ConfigError(f"chunk and n_qubits must be >= 1, got {chunk}, {n_qubits}.")
        if not hidden or any(int(h) < 1 for h in hidden):
            raise ConfigError(f"hidden must list at least one positive width, got {hidden!r}.")
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"Unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}."
            )
        self.n_qubits, self.chunk = n_qubits, chunk
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            width = n_qubits + 1
            for h in hidden:
                layers += [nn.Linear(width, int(h)), ACTIVATIONS[activation]()]
                width = int(h)
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(width, chunk)
            # Unit-variance outputs at init: the per-tensor scale, not the head, sets magnitudes.
            nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(width))
            nn.init.zeros_(self.head.bias)

    def forward(self, bits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Map states to weights.

        Args:
            bits: ``(S, n)`` +-1.
            x: ``(S,)`` transformed probabilities.

        Returns:
            ``(S, chunk)``.
        """
        return self.head(self.body(torch.cat([bits, x[:, None]], dim=1)))
