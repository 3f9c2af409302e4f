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

import heapq
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qtcompress.errors import ConfigError, NonFiniteError
from qtcompress.experimental.mps import MPSMapping
from qtcompress.lowrank import LowRankWeight
from qtcompress.mapping import Mapping, MLPMapping, signed_bits, transform_probs
from qtcompress.qnn import QNN, Ansatz
from qtcompress.targets import Layout

if TYPE_CHECKING:
    from qtcompress.config import QTConfig

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


def check_target(target: torch.Tensor, total: int) -> None:
    """The pretrained weights a generator is fitted to: a finite ``(total,)`` vector."""
    if target.shape != (total,):
        raise ConfigError(f"Expected target of shape ({total},), got {tuple(target.shape)}.")
    if not all_finite(target):
        raise NonFiniteError("The pretrained weights hold NaN or Inf.")


def qubits_for(total: int, chunk: int) -> int:
    """Qubits needed so that ``2**n * chunk >= total`` (at least 1)."""
    states = math.ceil(total / chunk)
    return max(1, math.ceil(math.log2(states))) if states > 1 else 1


def _qnn_for(
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


class QTGenerator(nn.Module):
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
        per_tensor_affine: Train a scale and offset per tensor (else fixed at their init).
        standardize: Standardise each tensor's raw outputs before the affine (see module doc).
        block_states: Basis states mapped per streamed block (``None``: about 2**18 weights).
        seed: Seeds the QNN angles and the mapping.
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
        per_tensor_affine: bool = True,
        standardize: bool = True,
        block_states: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if chunk < 1:
            raise ConfigError(f"chunk must be >= 1, got {chunk}.")
        self.layout = layout
        self.total = layout.total
        self.chunk = int(chunk)
        self.n_states = math.ceil(self.total / self.chunk)
        self.prob_transform = prob_transform
        self.qnn = _qnn_for(
            self.n_states,
            n_qubits,
            n_layers,
            prob_transform,
            backend,
            seed,
            f"x chunk {chunk} < M={self.total}",
            "or a larger chunk",
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
        self.scale = nn.Parameter(torch.ones(t), requires_grad=per_tensor_affine)
        self.offset = nn.Parameter(torch.zeros(t), requires_grad=per_tensor_affine)
        if block_states is None:
            block_states = max(1, DEFAULT_BLOCK_WEIGHTS // self.chunk)
        if block_states < 1:
            raise ConfigError(f"block_states must be >= 1, got {block_states}.")
        self.block_states = int(block_states)
        self.standardize = bool(standardize)
        ends = torch.tensor([s.offset + s.numel for s in layout.specs], dtype=torch.int64)
        self.register_buffer("_ends", ends, persistent=False)

    @classmethod
    def from_config(
        cls, layout: Layout, config: QTConfig, target: torch.Tensor | None = None
    ) -> QTGenerator | RowGenerator:
        """The generator that ``config`` describes for ``layout`` (the one place that maps them).

        Args:
            layout: The generated tensors.
            config: A :class:`~qtcompress.config.QTConfig`; sizes left automatic (``budget``,
                ``chunk=None``) are resolved for ``layout`` (see :meth:`QTConfig.resolve`).
            target: Flat pretrained weights, used to allocate per-tensor ranks to a budget.
        """
        config = config.resolve(layout, target)
        if config.scheme == "rows":
            return RowGenerator(
                layout,
                ranks=config.ranks or (),
                n_layers=config.n_layers,
                n_qubits=config.n_qubits,
                hidden=tuple(config.hidden or ()),
                activation=config.activation,
                prob_transform=config.prob_transform,
                backend=config.backend,
                seed=config.seed,
            )
        return cls(
            layout,
            chunk=config.resolve_chunk(layout.total),
            n_layers=config.n_layers,
            n_qubits=config.n_qubits,
            mapping=config.mapping,
            hidden=tuple(config.hidden or ()),
            activation=config.activation,
            bond_dim=config.bond_dim,
            prob_transform=config.prob_transform,
            backend=config.backend,
            per_tensor_affine=config.per_tensor_affine,
            standardize=config.standardize,
            block_states=config.block_states,
            seed=config.seed,
        )

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def n_qubits(self) -> int:
        """Number of qubits of the QNN."""
        return self.qnn.n_qubits

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
    @torch.no_grad()
    def init_affine(self, target: torch.Tensor) -> None:
        """Set each tensor's offset to its target mean and scale to its target std.

        The mapping then only has to produce zero-mean, unit-variance outputs; a constant
        tensor (std 0) is reproduced exactly from its offset.

        Args:
            target: Flat ``(M,)`` pretrained weights.
        """
        check_target(target, self.total)
        for i, s in enumerate(self.layout.specs):
            part = target[s.offset : s.offset + s.numel].double()
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

    def tensors(
        self, flat: torch.Tensor | None = None, *, factored: bool = False
    ) -> dict[str, torch.Tensor]:
        """Generated tensors by name (aliases included), cast to each parameter's dtype.

        Args:
            flat: A vector from :meth:`generate`; generated now if ``None``.
            factored: Ignored: flat chunks have no low-rank factors (see
                :meth:`RowGenerator.tensors`).
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


def row_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(rows, columns)`` matrix view of a tensor used by :class:`RowGenerator`.

    The first dimension indexes rows (output features, filters, vocabulary entries, LSTM gates)
    and everything else is a row. A vector or scalar is a single row, held exactly by its
    head's bias. (Generating the longer side instead, with the head on the shorter one, is
    cheaper per rank but measured far worse: the fine-tuned 420K CNN collapsed to 10%
    agreement. The free head must carry the long side.)
    """
    if len(shape) <= 1:
        return 1, int(math.prod(shape))
    return int(shape[0]), int(math.prod(shape[1:]))


def max_rank(shape: tuple[int, ...]) -> int:
    """The largest useful rank of a tensor: ``rows - 1`` (the bias adds one) or ``columns``."""
    rows, cols = row_view(shape)
    return 0 if rows == 1 else min(rows - 1, cols)


def row_generator_size(
    layout: Layout,
    ranks: Sequence[int],
    n_layers: int,
    hidden: tuple[int, ...],
    n_qubits: int | None = None,
) -> int:
    """Trainable parameters of a :class:`RowGenerator` with these per-tensor ranks."""
    views = [row_view(s.shape) for s in layout.specs]
    states = max(1, sum(r for (r, _), k in zip(views, ranks, strict=True) if k > 0))
    n = n_qubits or qubits_for(states, 1)
    widths = (n + 1, *hidden, max(1, *ranks))
    body = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:], strict=True))
    heads = sum((k + 1) * c for (_, c), k in zip(views, ranks, strict=True))
    return n * n_layers + body + heads


def uniform_ranks(layout: Layout, rank: int) -> tuple[int, ...]:
    """``rank`` for every matrix (capped at its :func:`max_rank`), 0 for vectors."""
    return tuple(min(rank, max_rank(s.shape)) for s in layout.specs)


# Above this many weights, a tensor whose needed singular values are few gets them from a
# randomised SVD: exact svdvals of a 7,000 x 7,000 layer took most of compress() at 1e8 weights.
EXACT_SPECTRUM_WEIGHTS = 1 << 22


def spectrum_gains(flat: torch.Tensor, shape: tuple[int, ...], need: int) -> torch.Tensor:
    """Each rank's share of a tensor's variance: ``sigma_r^2 / sum(sigma^2)``, ``r = 0..need``.

    The tensor is its column-centred ``(rows, cols)`` view (the head's bias holds the column
    means). Entries past ``need`` are zeros. Big tensors that need few values get them from
    ``torch.svd_lowrank`` (seeded, 4 power iterations; the total comes from the Frobenius norm,
    exactly): an estimate, close for the leading values that the allocation compares.

    Args:
        flat: The tensor's pretrained values, flat.
        shape: Its shape.
        need: The largest rank index read.
    """
    w = flat.double().reshape(row_view(shape))
    w = w - w.mean(0, keepdim=True)
    total = w.square().sum().clamp_min(1e-30)
    out = torch.zeros(max_rank(shape) + 1, dtype=torch.float64)
    q = need + 1 + 10  # oversampled
    if w.numel() > EXACT_SPECTRUM_WEIGHTS and 4 * q < min(w.shape):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            sigma = torch.svd_lowrank(w, q=q, niter=4)[1][: need + 1]
    else:
        sigma = torch.linalg.svdvals(w)
    energy = (sigma**2 / total)[: out.numel()]
    out[: energy.numel()] = energy
    return out


def allocate_ranks(
    layout: Layout,
    target: torch.Tensor | None,
    allowed: int,
    n_layers: int,
    hidden: tuple[int, ...],
    n_qubits: int | None = None,
) -> tuple[int, ...]:
    """Per-tensor ranks that fit ``allowed`` parameters, spent where the weights need them.

    Every matrix first gets the same rank, the largest that fits (uniform ranks measured best
    for the fine-tuned network: a spectrum-only allocation starved the widest layer and its
    student agreed 81% with the teacher against 95%). The rest of the budget then buys, one
    rank at a time, the most of a tensor's variance per parameter (the next squared singular
    value of the column-centred pretrained tensor over its total, divided by the head's cost,
    its column count): small tensors such as first-layer filters are cheap and reach full rank.
    Vectors are exact (rank 0, bias only).

    Args:
        layout: The generated tensors.
        target: Flat ``(M,)`` pretrained weights; ``None``: spend the leftover by cost alone.
        allowed: Parameter budget.
        n_layers: QNN layers.
        hidden: Mapping body hidden widths.
        n_qubits: Qubits, if fixed.

    Returns:
        One rank per tensor, in layout order (the minimum even if it exceeds ``allowed``).
    """

    def size_of(rank: int) -> int:
        return row_generator_size(layout, uniform_ranks(layout, rank), n_layers, hidden, n_qubits)

    low, high = 1, 2
    while size_of(high) <= allowed and high < 1 << 20:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if size_of(mid) <= allowed else (low, mid)
    ranks = list(uniform_ranks(layout, low))
    size = row_generator_size(layout, ranks, n_layers, hidden, n_qubits)
    gains: list[torch.Tensor] = []
    for s, rank in zip(layout.specs, ranks, strict=True):
        if max_rank(s.shape) == 0 or target is None:
            # No spectrum without weights: every gain is 0, so the leftover goes by cost alone.
            gains.append(torch.zeros(max_rank(s.shape) + 1))
            continue
        # The leftover can buy this tensor at most this many more ranks: later singular values
        # are never read.
        need = min(max_rank(s.shape), rank + max(0, allowed - size) // row_view(s.shape)[1])
        gains.append(spectrum_gains(target[s.offset : s.offset + s.numel], s.shape, need))
    widest = max(1, *ranks)
    body_unit = (hidden[-1] if hidden else 0) + 1  # parameters per extra feature width
    heap = [
        (-float(gains[i][ranks[i]]) / row_view(s.shape)[1], i)
        for i, s in enumerate(layout.specs)
        if 0 < ranks[i] < max_rank(s.shape)
    ]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        cols = row_view(layout.specs[i].shape)[1]
        cost = cols + (body_unit if ranks[i] + 1 > widest else 0)
        if size + cost > allowed:
            continue  # this tensor no longer fits; cheaper ones may
        ranks[i] += 1
        size += cost
        widest = max(widest, ranks[i])
        if ranks[i] < max_rank(layout.specs[i].shape):
            heapq.heappush(heap, (-float(gains[i][ranks[i]]) / cols, i))
    return tuple(ranks)


class RowGenerator(nn.Module):
    """Row-factorised Quantum-Train generator: one basis state per tensor row.

    Every generated tensor is viewed as a ``(rows, columns)`` matrix (:func:`row_view`). Basis
    state ``i`` is row ``i`` of the concatenated rows of all matrices; its bits and transformed
    probability go through a shared MLP (the mapping body) to a feature ``h_i``, and a
    per-tensor head emits the row: ``W_t[r] = h_{i(r)}[:k_t] @ A_t + b_t``, with ``k_t`` the
    tensor's rank. This is QPA-style chunked generation with the chunk aligned to each
    tensor's rows and one output head per tensor, so a tensor is a rank-``k_t`` product whose
    left factor comes from the QNN + mapping. Rows are where trained weights carry structure
    (per-unit scale, low rank), which a flat index cut into fixed chunks cannot see: on a
    420K-weight CNN without BatchNorm the flat scheme fits nothing (relative error 1.34) and
    its distilled student collapsed; this one is below 1 after phase 1 and agrees with the
    teacher on 95% of test images after 400 steps at 4.4% of M. Vectors (biases, norm
    scales) are one row whose head is a bias only: they are held exactly.

    Args:
        layout: The generated tensors.
        ranks: One rank per tensor (:func:`allocate_ranks`, :func:`uniform_ranks`).
        n_layers: QNN layers.
        n_qubits: Qubits; ``None``: the fewest that cover all rows.
        hidden: Hidden widths of the mapping body before the feature layer.
        activation: Body activation.
        prob_transform: See :func:`~qtcompress.mapping.transform_probs`.
        backend: QNN simulator backend.
        seed: Seeds the QNN angles, the body and the heads.
    """

    scheme = "rows"

    def __init__(
        self,
        layout: Layout,
        *,
        ranks: Sequence[int],
        n_layers: int = 8,
        n_qubits: int | None = None,
        hidden: tuple[int, ...] = (32,),
        activation: str = "tanh",
        prob_transform: str = "scaled",
        backend: str = "qsim",
        seed: int = 0,
    ) -> None:
        super().__init__()
        from qtcompress.mapping import ACTIVATIONS

        if len(ranks) != len(layout.specs):
            raise ConfigError(
                f"ranks lists {len(ranks)} tensors, the layout has {len(layout.specs)}."
            )
        for k, s in zip(ranks, layout.specs, strict=True):
            if not isinstance(k, int) or not 0 <= k <= max(1, max_rank(s.shape)):
                raise ConfigError(
                    f"rank {k!r} for {s.name} {s.shape} is outside 0..{max(1, max_rank(s.shape))}."
                )
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"Unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}."
            )
        self.layout = layout
        self.total = layout.total
        self.ranks = tuple(int(k) for k in ranks)
        self.views = [row_view(s.shape) for s in layout.specs]
        starts = [0]
        for (rows, _), k in zip(self.views, self.ranks, strict=True):
            starts.append(starts[-1] + (rows if k > 0 else 0))
        self.row_starts = starts
        self.n_states = max(1, starts[-1])
        self.prob_transform = prob_transform
        self.chunk = max(c for _, c in self.views)  # the longest row: weights per basis state
        self.qnn = _qnn_for(
            self.n_states,
            n_qubits,
            n_layers,
            prob_transform,
            backend,
            seed,
            f"< {self.n_states} rows",
            "",
        )
        n = self.qnn.n_qubits
        width_out = max(1, *self.ranks)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            width = n + 1
            for h in (*hidden, width_out):
                layers += [nn.Linear(width, int(h)), ACTIVATIONS[activation]()]
                width = int(h)
            self.body = nn.Sequential(*layers)
            # One head per tensor: (rank, columns) weights and a (columns,) bias.
            self.heads = nn.ParameterList(
                [
                    nn.Parameter(torch.randn(k, c) / math.sqrt(max(1, k)))
                    for (_, c), k in zip(self.views, self.ranks, strict=True)
                ]
            )
            self.biases = nn.ParameterList([nn.Parameter(torch.zeros(c)) for _, c in self.views])
        self.register_buffer("_bits", signed_bits(n, 0, self.n_states), persistent=False)

    @property
    def n_qubits(self) -> int:
        """Number of qubits of the QNN."""
        return self.qnn.n_qubits

    @property
    def rank(self) -> int:
        """The widest per-tensor rank (the mapping body's feature width)."""
        return max(1, *self.ranks)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters by part and ``total``.

        ``mapping``: the body and the heads' weights; ``affine``: the heads' biases (per-column
        offsets, and the exact values of vectors).
        """

        def count(ps: Iterator[nn.Parameter]) -> int:
            return sum(p.numel() for p in ps if p.requires_grad)

        counts = {
            "qnn": count(self.qnn.parameters()),
            "mapping": count(self.body.parameters()) + count(self.heads.parameters()),
            "affine": count(self.biases.parameters()),
        }
        counts["total"] = sum(counts.values())
        return counts

    def features(self) -> torch.Tensor:
        """Per-row features ``h``, shape ``(n_states, rank)`` (differentiable)."""
        probs = self.qnn()  # (2^n,)
        x = transform_probs(probs, self.n_qubits, self.prob_transform)[: self.n_states]
        bits: torch.Tensor = self._bits  # type: ignore[assignment]
        return self.body(torch.cat([bits, x[:, None]], dim=1))  # (S, rank)

    def _tensor(self, h: torch.Tensor, i: int, factored: bool = False) -> torch.Tensor:
        k, shape = self.ranks[i], self.layout.specs[i].shape
        if k == 0:
            return self.biases[i].expand(self.views[i]).reshape(shape)
        a, b = self.row_starts[i], self.row_starts[i + 1]
        if factored and len(shape) == 2:
            return LowRankWeight(h[a:b, :k], self.heads[i], self.biases[i], shape)
        w = torch.addmm(self.biases[i], h[a:b, :k], self.heads[i])  # (rows, columns)
        return w.reshape(shape)

    def row_block_error(
        self, h: torch.Tensor, i: int, start: int, goal: torch.Tensor
    ) -> torch.Tensor:
        """Squared error of some rows of tensor ``i`` against ``goal``.

        Rows ``start:start + len(goal)`` of the tensor's ``(rows, cols)`` view; phase 1 of big
        models streams these blocks (see :func:`qtcompress.fit.row_weight_loss`).
        """
        k = self.ranks[i]
        if k == 0:
            w = self.biases[i].expand(goal.shape)
        else:
            a = self.row_starts[i] + start
            w = torch.addmm(self.biases[i], h[a : a + goal.shape[0], :k], self.heads[i])
        return torch.nn.functional.mse_loss(w, goal, reduction="sum")

    def generate_tensors(self, factored: bool = False) -> list[torch.Tensor]:
        """Every generated tensor in layout order (float32, differentiable).

        Args:
            factored: Matrices as :class:`~qtcompress.lowrank.LowRankWeight` (see
                :meth:`tensors`).
        """
        h = self.features()
        return [self._tensor(h, i, factored) for i in range(len(self.views))]

    def generate(self) -> torch.Tensor:
        """All generated weights as one flat ``(M,)`` float32 vector (differentiable)."""
        return torch.cat([t.reshape(-1) for t in self.generate_tensors()])

    def tensors(
        self, flat: torch.Tensor | None = None, *, factored: bool = False
    ) -> dict[str, torch.Tensor]:
        """Generated tensors by name (aliases included), cast to each parameter's dtype.

        Args:
            flat: A vector from :meth:`generate`; generated now if ``None``.
            factored: Hand 2-D float32 tensors over as
                :class:`~qtcompress.lowrank.LowRankWeight`, so that ``nn.Linear`` layers run
                on the factors instead of materialising the matrix (a training step's fast
                path; any other use materialises it). Values equal the dense tensors' up to
                float rounding (a different order of sums).
        """
        if flat is not None:
            parts = self.layout.split(flat)
            by_spec = [parts[s.name] for s in self.layout.specs]
        else:
            by_spec = self.generate_tensors(factored)
        out: dict[str, torch.Tensor] = {}
        for s, t in zip(self.layout.specs, by_spec, strict=True):
            t = t if t.dtype == s.dtype else t.to(s.dtype)
            for n in s.names:
                out[n] = t
        return out

    @torch.no_grad()
    def iter_blocks(self, block_states: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Stream the weights without gradients, one tensor at a time: ``(start, weights)``."""
        h = self.features()
        for i, s in enumerate(self.layout.specs):
            yield s.offset, self._tensor(h, i).reshape(-1)

    @torch.no_grad()
    def fit_heads(self, target: torch.Tensor) -> None:
        """Least-squares heads for the current features: the best this body can do per tensor.

        With the bias column, each tensor's fit is a projection of the target, so its relative
        error is at most 1 (never worse than all-zero weights); vectors are reproduced exactly.
        A projection shrinks what it cannot reproduce: without BatchNorm the shrinkage compounds
        through the layers, and the network can come out nearly constant. Fine-tuning then
        starts from :meth:`match_spread` (see :meth:`qtcompress.api.QTModel.finetune`).

        Args:
            target: Flat ``(M,)`` pretrained weights.
        """
        check_target(target, self.total)
        h = self.features().double()
        for i, s in enumerate(self.layout.specs):
            flat = target[s.offset : s.offset + s.numel].to(h.device)
            rows = self.views[i][0]
            k = self.ranks[i]
            if k == 0:
                self.biases[i].copy_(self._as_view(flat.double(), i).mean(0).float())
                continue
            a, b = self.row_starts[i], self.row_starts[i + 1]
            design = torch.cat([h[a:b, :k], h.new_ones(rows, 1)], dim=1)
            # Ridge-regularised normal equations: stable when features are nearly collinear.
            gram = design.T @ design
            gram += (
                1e-6
                * (gram.diagonal().mean() + 1e-12)
                * torch.eye(k + 1, dtype=torch.float64, device=h.device)
            )
            sol = torch.linalg.solve(gram, self._moments(design, flat, i))  # (k + 1, cols)
            self.heads[i].copy_(sol[:-1].float())
            self.biases[i].copy_(sol[-1].float())

    def _moments(self, design: torch.Tensor, flat: torch.Tensor, i: int) -> torch.Tensor:
        """``design.T @ goal`` in float64, ``goal`` being tensor ``i``'s ``(rows, cols)`` view.

        Big tensors go in column blocks of about ``FIT_BLOCK`` weights, so the float64 copy of
        the goal never exceeds one block (a 49M-weight layer's would be 390 MB).
        """
        goal = self._as_view(flat, i)  # (rows, cols), target dtype
        rows, cols = goal.shape
        if goal.numel() <= FIT_BLOCK:
            return design.T @ goal.double()
        step = max(1, FIT_BLOCK // rows)
        return torch.cat(
            [design.T @ goal[:, c : c + step].double() for c in range(0, cols, step)], dim=1
        )

    def _as_view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """A tensor's flat values as its generated ``(rows, columns)`` matrix."""
        return flat.reshape(self.views[i])

    @torch.no_grad()
    def match_spread(self, target: torch.Tensor) -> list[str]:
        """Rescale each tensor's head so its spread matches the pretrained tensor's.

        A least-squares fit shrinks a tensor it cannot reproduce towards its mean; without
        BatchNorm to re-centre, a network of shrunk tensors can be dead (constant output). This
        restores every tensor's standard deviation while keeping its direction and mean.

        Returns:
            Names of the tensors that were rescaled.
        """
        h = self.features()
        changed = []
        for i, s in enumerate(self.layout.specs):
            if self.ranks[i] == 0 or s.numel < 2:
                continue
            want = float(target[s.offset : s.offset + s.numel].std(unbiased=False))
            w = self._tensor(h, i)
            have = float(w.std(unbiased=False))
            if have > 1e-12 and want > 1.05 * have:
                mean = w.mean()
                self.heads[i].mul_(want / have)
                # Keep the tensor's mean: the bias absorbs the shift that the scaling made.
                self.biases[i].add_(mean - self._tensor(h, i).mean())
                changed.append(s.name)
        return changed

    def extra_repr(self) -> str:
        """Summary shown by ``print(module)``."""
        c = self.parameter_counts()
        return (
            f"M={self.total}, rows={self.n_states}, ranks={list(self.ranks)}, "
            f"trainable={c['total']} ({c['total'] / self.total:.1%} of M)"
        )


# Either generator scheme: both offer generate(), tensors(), iter_blocks(), parameter_counts().
AnyGenerator = QTGenerator | RowGenerator
