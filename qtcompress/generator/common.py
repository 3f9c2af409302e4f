"""What both generator schemes share: the QNN, the mapping by name, weight checks."""

from __future__ import annotations

import math

import torch

from qtcompress.errors import ConfigError, NonFiniteError
from qtcompress.experimental.mps import MPSMapping
from qtcompress.mapping import Mapping, MLPMapping, transform_probs
from qtcompress.qnn import QNN, Ansatz

# Weights produced per streamed block by default (bounds mapping activations, not the output).
DEFAULT_BLOCK_WEIGHTS = 1 << 18
# Least-squares heads take tensors above this many weights in column blocks (bounded memory).
FIT_BLOCK = 1 << 22


def all_finite(t: torch.Tensor, block: int = 1 << 22) -> bool:
    """``torch.isfinite(t).all()`` in blocks: its temporaries took 1.7x a 1e8-vector's bytes."""
    flat = t.reshape(-1)
    return all(
        bool(torch.isfinite(flat[i : i + block]).all()) for i in range(0, flat.numel(), block)
    )


def check_pretrained(pretrained: torch.Tensor, total: int) -> None:
    """The pretrained weights a generator is fitted to: a finite ``(total,)`` vector."""
    if pretrained.shape != (total,):
        shape = tuple(pretrained.shape)
        raise ConfigError(f"Expected pretrained weights of shape ({total},), got {shape}.")
    if not all_finite(pretrained):
        raise NonFiniteError("The pretrained weights hold NaN or Inf.")


def qubits_for(total: int, chunk: int) -> int:
    """Qubits needed so that ``2**n * chunk >= total`` (at least 1)."""
    states = math.ceil(total / chunk)
    return max(1, math.ceil(math.log2(states))) if states > 1 else 1


def qnn_for(
    n_states: int,
    n_qubits: int | None,
    n_layers: int,
    prob_transform: str,
    backend: str,
    seed: int,
    shortfall: str,
    remedy: str,
) -> QNN:
    """The paper-ansatz QNN with enough basis states for ``n_states`` (both schemes).

    ``shortfall`` and ``remedy`` complete the error message for too few qubits.
    """
    needed = qubits_for(n_states, 1)
    n = needed if n_qubits is None else int(n_qubits)
    if n < needed:
        raise ConfigError(
            f"{n} qubits give {2**n} states {shortfall}; need at least {needed} "
            f"qubits{' ' + remedy if remedy else ''}."
        )
    transform_probs(torch.zeros(2), 1, prob_transform)  # validates the name early
    return QNN(Ansatz.paper(n, n_layers), backend=backend, seed=seed)


def make_mapping(
    kind: str,
    n_qubits: int,
    chunk: int,
    *,
    hidden: tuple[int, ...] = (16, 16),
    activation: str = "tanh",
    bond_dim: int = 4,
    seed: int = 0,
) -> Mapping:
    """Build a mapping by name: ``"mlp"`` (:class:`MLPMapping`) or ``"mps"``.

    ``"mps"`` is :class:`qtcompress.experimental.mps.MPSMapping` (arXiv 2409.06992 style).
    """
    # The factory lives here, not in mapping.py: experimental/mps.py builds on mapping.Mapping,
    # so mapping.py importing it back was an import circle.
    if kind == "mlp":
        return MLPMapping(n_qubits, chunk, tuple(hidden), activation, seed)
    if kind == "mps":
        return MPSMapping(n_qubits, chunk, bond_dim, seed)
    raise ConfigError(f"Unknown mapping {kind!r}; choose 'mlp' or 'mps'.")
