"""The generator: QNN probabilities + mapping network + per-tensor affine -> all M weights.

Weight ``j`` of the flat vector comes from basis state ``j // chunk`` (output ``j % chunk`` of the
mapping), then ``w_j = scale[t] * raw_j + offset[t]`` with ``t`` the tensor that holds ``j``. The
per-tensor scale and offset let one mapping serve layers whose magnitudes differ by orders of
magnitude (a BatchNorm weight near 1, a conv weight near 0.1, a bias near 0).

With ``standardize=True`` (default) the raw outputs of each tensor are first standardised to zero
mean and unit variance over that tensor, so every generated tensor has exactly the mean
(``offset``) and standard deviation (``|scale|``) it is given. Initialised from the pretrained
tensors, the generated model then keeps its layers' statistics whatever the mapping does: the
running statistics of BatchNorm stay consistent and no layer collapses to a constant (which
left a weight-space fit of a small generator with dead ReLUs and a 9% accurate model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qtcompress.errors import ConfigError
from qtcompress.generator.common import (
    DEFAULT_BLOCK_WEIGHTS,
    Generator,
    check_pretrained,
    make_mapping,
    qnn_for,
)
from qtcompress.generator.weight_loss import tensor_normalisers, weight_loss
from qtcompress.mapping import Mapping, signed_bits, transform_probs
from qtcompress.targets import Layout

if TYPE_CHECKING:
    from qtcompress.config import QTConfig


class QTGenerator(Generator):
    """The flat-scheme generator (``scheme="flat"``): the flat weight vector of a layout.

    Args:
        layout: The generated tensors (M = ``layout.total``).
        chunk: Weights per basis state (1 = the paper).
        n_layers: QNN layers.
        n_qubits: Qubits; ``None`` uses the fewest that cover M.
        mapping: ``"mlp"``, ``"mps"`` or a ready :class:`~qtcompress.mapping.Mapping`.
        hidden: MLP hidden widths.
        activation: MLP activation.
        bond_dim: MPS bond dimension.
        prob_transform: See :func:`~qtcompress.mapping.transform_probs`.
        backend: QNN simulator backend.
        train_affine: Train each tensor's scale and offset (else fixed at their init).
        standardize: Standardise each tensor's raw outputs before the affine (see module doc).
        block_states: Basis states mapped per streamed block (``None``: about 2**18 weights).
        seed: Seeds the QNN angles and the mapping.
        ansatz: The QNN's circuit (a name registered in :mod:`qtcompress.qnn.ansatz`).
    """

    scheme = "flat"

    def __init__(
        self,
        layout: Layout,
        *,
        chunk: int = 1,
        n_layers: int = 8,
        n_qubits: int | None = None,
        mapping: str | Mapping = "mlp",
        hidden: tuple[int, ...] = (16, 16),
        activation: str = "tanh",
        bond_dim: int = 4,
        prob_transform: str = "scaled",
        backend: str = "qsim",
        train_affine: bool = True,
        standardize: bool = True,
        block_states: int | None = None,
        seed: int = 0,
        ansatz: str = "paper",
    ) -> None:
        super().__init__()
        if chunk < 1:
            raise ConfigError(f"chunk must be >= 1, got {chunk}.")
        self.layout = layout
        self.total = layout.total
        self.chunk = int(chunk)
        self.n_states = math.ceil(self.total / self.chunk)
        self.prob_transform = prob_transform
        self.qnn = qnn_for(
            self.n_states,
            n_qubits,
            n_layers,
            prob_transform,
            backend,
            seed,
            f"x chunk {chunk} < M={self.total}",
            "or a larger chunk",
            ansatz,
        )
        n = self.qnn.n_qubits
        if isinstance(mapping, Mapping):
            if mapping.n_qubits != n or mapping.chunk != self.chunk:
                raise ConfigError("The given mapping's n_qubits/chunk do not match the generator.")
            self.mapping = mapping
        else:
            self.mapping = make_mapping(
                mapping,
                n,
                self.chunk,
                hidden=tuple(hidden),
                activation=activation,
                bond_dim=bond_dim,
                seed=seed,
            )
        t = len(layout.specs)
        self.scale = nn.Parameter(torch.ones(t), requires_grad=train_affine)
        self.offset = nn.Parameter(torch.zeros(t), requires_grad=train_affine)
        if block_states is None:
            block_states = max(1, DEFAULT_BLOCK_WEIGHTS // self.chunk)
        if block_states < 1:
            raise ConfigError(f"block_states must be >= 1, got {block_states}.")
        self.block_states = int(block_states)
        self.standardize = bool(standardize)
        ends = torch.tensor([s.offset + s.numel for s in layout.specs], dtype=torch.int64)
        self.register_buffer("_ends", ends, persistent=False)

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def n_qubits(self) -> int:
        """Number of qubits of the QNN."""
        return self.qnn.n_qubits

    sized_by_budget = False

    def weight_fit_objective(  # noqa: D102
        self, pretrained: torch.Tensor, *, freeze_scale: bool = True
    ) -> Callable[[int], torch.Tensor]:
        factors = tensor_normalisers(self, pretrained)
        self._scale_trainable = bool(self.scale.requires_grad)
        if freeze_scale:
            self.scale.requires_grad_(False)
        return lambda _step: weight_loss(self.generate(), pretrained, factors)

    def weight_fit_done(self, pretrained: torch.Tensor) -> None:
        """Release the scales frozen for phase 1."""
        del pretrained
        self.scale.requires_grad_(getattr(self, "_scale_trainable", True))

    def file_description(self, config: QTConfig) -> dict[str, Any]:  # noqa: D102
        hidden = config.hidden if config.hidden is not None else config.resolve(self.layout).hidden
        return {
            "kind": config.mapping,
            "chunk": int(self.chunk),
            "n_qubits": int(self.n_qubits),
            "hidden": [int(h) for h in hidden or ()],
            "activation": config.activation,
            "bond_dim": config.bond_dim,
            "prob_transform": config.prob_transform,
        }

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters by part (``qnn``, ``mapping``, ``affine``) and ``total``."""

        def count(ps: Iterator[nn.Parameter]) -> int:
            return sum(p.numel() for p in ps if p.requires_grad)

        counts = {
            "qnn": count(self.qnn.parameters()),
            "mapping": count(self.mapping.parameters()),
            "affine": count(iter([self.scale, self.offset])),
        }
        counts["total"] = sum(counts.values())
        return counts

    # -- initialisation -------------------------------------------------------------------------
    def init_from_pretrained(self, pretrained: torch.Tensor) -> None:
        """Each tensor's affine from its pretrained mean and std (:meth:`init_affine`)."""
        self.init_affine(pretrained)

    @torch.no_grad()
    def init_affine(self, pretrained: torch.Tensor) -> None:
        """Set each tensor's offset to its pretrained mean and scale to its pretrained std.

        The mapping then only has to produce zero-mean, unit-variance outputs; a constant
        tensor (std 0) is reproduced exactly from its offset.

        Args:
            pretrained: Flat ``(M,)`` pretrained weights.
        """
        check_pretrained(pretrained, self.total)
        for i, s in enumerate(self.layout.specs):
            part = pretrained[s.offset : s.offset + s.numel].double()
            self.offset[i] = part.mean()
            self.scale[i] = part.std(unbiased=False) if s.numel > 1 else 0.0

    # -- generation -----------------------------------------------------------------------------
    def features(self) -> torch.Tensor:
        """Transformed probabilities of the first ``n_states`` basis states (differentiable)."""
        probs = self.qnn()  # (2^n,)
        return transform_probs(probs, self.n_qubits, self.prob_transform)[: self.n_states]

    def _raw_block(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        bits = signed_bits(self.n_qubits, start, stop).to(x.device)  # (S_blk, n)
        return self.mapping(bits, x[start:stop]).reshape(-1)  # (S_blk * chunk,)

    def _affine(self, raw: torch.Tensor, start: int) -> torch.Tensor:
        idx = self._index(start, raw.shape[0], raw.device)
        return raw * self.scale[idx] + self.offset[idx]

    def generate(self) -> torch.Tensor:
        """All generated weights, shape ``(M,)`` float32, differentiable.

        States are mapped in blocks of ``block_states``; with gradients on and several blocks,
        each block is recomputed in backward (activation checkpointing) so that mapping
        activations stay bounded by one block.
        """
        return self.generate_from_features(self.features())

    def generate_from_features(self, x: torch.Tensor) -> torch.Tensor:
        """The mapping half of :meth:`generate`, given the transformed probabilities ``x``.

        Args:
            x: ``(n_states,)`` from :meth:`features`.

        Returns:
            ``(M,)`` weights.
        """
        blocks = []
        many = self.n_states > self.block_states and torch.is_grad_enabled()
        for a in range(0, self.n_states, self.block_states):
            b = min(a + self.block_states, self.n_states)
            if many:
                blocks.append(checkpoint(self._raw_block, x, a, b, use_reentrant=False))
            else:
                blocks.append(self._raw_block(x, a, b))
        raw = torch.cat(blocks)[: self.total]
        # Per-tensor slices rather than a gather over all M weights: the backward of a gather
        # into a handful of scale entries is a serial scatter-add that cost ~3x the rest of the
        # mapping at M = 1e6.
        parts = []
        for i, s in enumerate(self.layout.specs):
            seg = raw[s.offset : s.offset + s.numel]
            if self.standardize:
                mean = seg.mean()
                std = ((seg - mean) ** 2).mean().clamp_min(1e-12).sqrt()
                seg = (seg - mean) / std
            parts.append(seg * self.scale[i] + self.offset[i])
        return torch.cat(parts)

    def _index(self, start: int, length: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(start, start + length, device=device)
        ends: torch.Tensor = self._ends  # type: ignore[assignment]
        return torch.searchsorted(ends, pos, right=True)  # tensor of each weight

    def _block_sums(
        self, raw: torch.Tensor, start: int, mean: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor partial sums over one streamed block: (sum, sum of squared deviations)."""
        t = len(self.layout.specs)
        idx = self._index(start, raw.shape[0], raw.device)
        sums = raw.new_zeros(t).index_add(0, idx, raw)
        dev = raw.new_zeros(t).index_add(0, idx, (raw - mean[idx]) ** 2)
        return sums, dev

    @torch.no_grad()
    def iter_blocks(self, block_states: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Stream the weights without gradients: yields ``(start, weights)`` blocks in order.

        Peak memory is one block plus the probability vector, never all M weights.
        """
        step = block_states or self.block_states
        x = self.features()

        def raw_blocks() -> Iterator[tuple[int, torch.Tensor]]:
            for a in range(0, self.n_states, step):
                start = a * self.chunk
                raw = self._raw_block(x, a, min(a + step, self.n_states))
                yield start, raw[: max(0, self.total - start)]

        if self.standardize:
            # Two passes (sums, then squared deviations) so no pass holds all M weights.
            t = len(self.layout.specs)
            counts = torch.tensor([s.numel for s in self.layout.specs], dtype=torch.float32)
            total = torch.zeros(t)
            for start, raw in raw_blocks():
                total += self._block_sums(raw, start, torch.zeros(t))[0]
            mean = total / counts
            dev = torch.zeros(t)
            for start, raw in raw_blocks():
                dev += self._block_sums(raw, start, mean)[1]
            std = (dev / counts).clamp_min(1e-12).sqrt()
        for start, raw in raw_blocks():
            if self.standardize:
                idx = self._index(start, raw.shape[0], raw.device)
                raw = (raw - mean[idx]) / std[idx]
            yield start, self._affine(raw, start)

    def generate_named(
        self, flat: torch.Tensor | None = None, *, factored: bool = False
    ) -> dict[str, torch.Tensor]:
        """Generated tensors by name (aliases included), cast to each parameter's dtype.

        Args:
            flat: A vector from :meth:`generate`; generated now if ``None``.
            factored: Ignored: flat chunks have no low-rank factors (see
                :meth:`RowGenerator.generate_named`).
        """
        flat = self.generate() if flat is None else flat
        out = self.layout.split(flat)
        dtypes = {n: s.dtype for s in self.layout.specs for n in s.names}
        return {n: (t if t.dtype == dtypes[n] else t.to(dtypes[n])) for n, t in out.items()}

    def extra_repr(self) -> str:
        """Summary shown by ``print(module)``."""
        c = self.parameter_counts()
        return (
            f"M={self.total}, chunk={self.chunk}, n_states={self.n_states}, "
            f"trainable={c['total']} ({c['total'] / self.total:.1%} of M)"
        )


def resolve_flat(config: QTConfig, layout: Layout, pretrained: torch.Tensor | None) -> QTConfig:
    """The flat scheme's sizes: the chunk (``None``: from ``chunk_max_qubits``), hidden widths."""
    from qtcompress.config import DEFAULT_HIDDEN, DEFAULT_LAYERS

    del pretrained
    hidden = config.hidden if config.hidden is not None else DEFAULT_HIDDEN["flat"]
    return replace(
        config,
        hidden=hidden,
        chunk=config.resolve_chunk(layout.total),
        n_layers=config.n_layers or DEFAULT_LAYERS,
    )
