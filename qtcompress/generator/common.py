"""What both generator schemes share: the regenerating API, the QNN, the mapping, weight checks.

Every weight comes out of one of three methods of :class:`Generator`, by what the caller needs:

- :meth:`~Generator.generate`: one flat ``(M,)`` float32 vector, differentiable (weight fit);
- :meth:`~Generator.generate_named`: tensors by parameter name, differentiable (a training
  step's student);
- :meth:`~Generator.generate_detached`: tensors by canonical name, no gradients, streamed block
  by block (save, load, export: bit-identical between them).

:meth:`~Generator.iter_blocks` is the stream under the last one, and
:meth:`qtcompress.QTModel.materialize` writes the same stream into a copy of the model.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qtcompress.errors import ConfigError, NonFiniteError
from qtcompress.experimental.mps import MPSMapping
from qtcompress.mapping import Mapping, MLPMapping, transform_probs
from qtcompress.plugins import Registry
from qtcompress.qnn import QNN, Ansatz
from qtcompress.qnn.ansatz import DEFAULT_ANSATZ, make_ansatz
from qtcompress.targets import Layout, TensorSpec

if TYPE_CHECKING:
    from qtcompress.config import QTConfig

# Weights produced per streamed block by default (bounds mapping activations, not the output).
DEFAULT_BLOCK_WEIGHTS = 1 << 18
# Least-squares heads take tensors above this many weights in column blocks (bounded memory).
FIT_BLOCK = 1 << 22


class Generator(nn.Module):
    """The interface every scheme implements (registered in :mod:`~qtcompress.generator.registry`).

    Regenerating (see the module docstring): :meth:`generate`, :meth:`generate_named`,
    :meth:`iter_blocks`. Sizes: :meth:`parameter_counts`, :attr:`n_qubits`, :attr:`chunk`,
    :attr:`ansatz` (what a generator file records). Fitting, called by
    :func:`~qtcompress.api.compress` and the two phases without knowing the scheme:
    :meth:`init_from_pretrained`, :meth:`weight_fit_objective`, :meth:`weight_fit_done`,
    :meth:`revive`.
    """

    layout: Layout
    total: int
    scheme: str = ""

    @property
    def ansatz(self) -> Ansatz:
        """The QNN's circuit description (what a generator file records)."""
        qnn = getattr(self, "qnn", None)
        if not isinstance(qnn, QNN):
            raise NotImplementedError
        return qnn.ansatz

    @property
    def n_qubits(self) -> int:
        """Qubits of the QNN."""
        return self.ansatz.n_qubits

    chunk: int  # weights per basis state (the most, for schemes where it varies)

    # Whether QTConfig.budget sizes this scheme (the flat scheme is sized by its chunk).
    sized_by_budget: bool = True

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters by part (``qnn``, ``mapping``, ``affine``) and ``total``."""
        raise NotImplementedError

    def describe_shape(self) -> str:
        """The generator's shape in a few words (logs, the summary's ``generator`` line)."""
        return f"chunk {self.chunk}"

    def basis_state_text(self) -> str:
        """What one of the QNN's basis states stands for (the summary and ``inspect``)."""
        return f"up to {self.chunk} weights per basis state"

    def file_description(self, config: QTConfig) -> dict[str, Any]:
        """The ``mapping`` entry of a generator file: saving writes it, loading compares it.

        Args:
            config: The config the generator was built from (sizes may be unresolved).
        """
        raise NotImplementedError

    def init_from_pretrained(self, pretrained: torch.Tensor) -> None:
        """Start from the pretrained weights (flat ``(M,)``), before phase 1."""
        raise NotImplementedError

    def weight_fit_objective(
        self, pretrained: torch.Tensor, *, freeze_scale: bool = True
    ) -> Callable[[int], torch.Tensor]:
        """Phase 1's loss for a step, as a closure over the (float32) pretrained weights.

        Args:
            pretrained: Flat ``(M,)`` float32 pretrained weights.
            freeze_scale: Keep per-tensor scales at their pretrained values while fitting
                (schemes with trainable scales; :meth:`weight_fit_done` releases them).
        """
        raise NotImplementedError

    def weight_fit_done(self, pretrained: torch.Tensor) -> None:
        """Called once phase 1's loop has ended (closed-form parts, frozen parts released)."""

    def revive(self, pretrained: torch.Tensor) -> list[str]:
        """Restore the spread of tensors that left the student dead; names what changed."""
        del pretrained
        return []

    def generate(self) -> torch.Tensor:
        """All generated weights, shape ``(M,)`` float32, in layout order (differentiable)."""
        raise NotImplementedError

    def generate_named(
        self, flat: torch.Tensor | None = None, *, factored: bool = False
    ) -> dict[str, torch.Tensor]:
        """Generated tensors by parameter name (aliases included), differentiable."""
        raise NotImplementedError

    def iter_blocks(self, block_states: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Stream the weights without gradients: ``(flat start, weights)`` in layout order."""
        raise NotImplementedError

    def _by_name(
        self, flat: torch.Tensor | None, generated: Callable[[], list[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Tensors by parameter name (aliases included), cast to each parameter's dtype.

        From ``flat`` (a :meth:`generate` vector) when given, else from ``generated()``: the
        tensors in layout order.
        """
        if flat is not None:
            parts = self.layout.split(flat)
            by_spec = [parts[s.name] for s in self.layout.specs]
        else:
            by_spec = generated()
        out: dict[str, torch.Tensor] = {}
        for s, t in zip(self.layout.specs, by_spec, strict=True):
            t = t if t.dtype == s.dtype else t.to(s.dtype)
            for n in s.names:
                out[n] = t
        return out

    @torch.no_grad()
    def generate_detached(self) -> dict[str, torch.Tensor]:
        """Every generated tensor by canonical name, without gradients, cast to its dtype.

        Streamed block by block into one tensor per parameter (no ``(M,)`` staging copy). Save
        and load both use this one path, so the same generator gives bit-identical weights.
        """
        specs = self.layout.specs
        parts = [torch.empty(s.numel, dtype=torch.float32) for s in specs]
        scatter_blocks(self.iter_blocks(), specs, parts)
        return {s.name: p.view(s.shape).to(s.dtype) for s, p in zip(specs, parts, strict=True)}


def scatter_blocks(
    blocks: Iterable[tuple[int, torch.Tensor]],
    specs: Sequence[TensorSpec],
    destinations: Sequence[torch.Tensor],
) -> None:
    """Copy a flat stream of ``(start, block)`` into one flat destination per spec.

    Args:
        blocks: From :meth:`Generator.iter_blocks`, in increasing ``start``.
        specs: The layout's specs, in offset order.
        destinations: One 1-D tensor of ``spec.numel`` per spec (a parameter's view, say).
    """
    offsets = [s.offset for s in specs]
    for start, block in blocks:
        stop = start + block.shape[0]
        i = max(0, bisect.bisect_right(offsets, start) - 1)
        while i < len(specs) and specs[i].offset < stop:
            s = specs[i]
            lo, hi = max(start, s.offset), min(stop, s.offset + s.numel)
            if lo < hi:
                destinations[i][lo - s.offset : hi - s.offset] = block[lo - start : hi - start]
            i += 1


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
    ansatz: str = DEFAULT_ANSATZ,
) -> QNN:
    """The QNN (a registered ansatz) with enough basis states for ``n_states``.

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
    return QNN(make_ansatz(ansatz, n, n_layers), backend=backend, seed=seed)


# name -> builder(n_qubits, chunk, hidden, activation, bond_dim, seed): the flat scheme's
# mapping networks. The factory lives here, not in mapping.py: experimental/mps.py builds on
# mapping.Mapping, so mapping.py importing it back was an import circle.
MappingBuilder = Callable[[int, int, tuple[int, ...], str, int, int], Mapping]
_MAPPINGS: Registry[MappingBuilder] = Registry("mapping")


def register_mapping(name: str, builder: MappingBuilder) -> None:
    """Register ``builder(n_qubits, chunk, hidden, activation, bond_dim, seed)`` as a mapping.

    Raises:
        ConfigError: A mapping of that name is already registered.
    """
    _MAPPINGS.add(name, builder)


def mapping_names() -> tuple[str, ...]:
    """Registered mappings, in registration order."""
    return _MAPPINGS.names()


def check_mapping(name: str) -> str:
    """Validate a mapping name (a :class:`ConfigError` naming the registered ones)."""
    return _MAPPINGS.check(name)


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
    """Build a registered mapping by name: ``"mlp"`` (:class:`MLPMapping`) or ``"mps"``.

    ``"mps"`` is :class:`qtcompress.experimental.mps.MPSMapping` (arXiv 2409.06992 style).
    """
    builder = _MAPPINGS[kind]
    return builder(n_qubits, chunk, tuple(hidden), activation, bond_dim, seed)


register_mapping(
    "mlp", lambda n, chunk, hidden, act, _bond, seed: MLPMapping(n, chunk, hidden, act, seed)
)
register_mapping(
    "mps", lambda n, chunk, _hidden, _act, bond, seed: MPSMapping(n, chunk, bond, seed)
)
