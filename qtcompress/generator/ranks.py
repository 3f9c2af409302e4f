"""Ranks of the rows scheme: matrix views, generator size, and a budget spent by spectra.

Each tensor is a ``(rows, columns)`` matrix; its rank sets its head's size. The budget is spent
where the pretrained weights' singular values say it buys the most.
"""

from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from qtcompress.errors import ConfigError
from qtcompress.generator.common import qubits_for
from qtcompress.qnn.ansatz import angles_per_layer
from qtcompress.targets import Layout

if TYPE_CHECKING:
    from qtcompress.config import QTConfig


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
    ansatz: str = "paper",
) -> int:
    """Trainable parameters of a :class:`RowGenerator` with these per-tensor ranks."""
    views = [row_view(s.shape) for s in layout.specs]
    states = max(1, sum(r for (r, _), k in zip(views, ranks, strict=True) if k > 0))
    n = n_qubits or qubits_for(states, 1)
    widths = (n + 1, *hidden, max(1, *ranks))
    body = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:], strict=True))
    heads = sum((k + 1) * c for (_, c), k in zip(views, ranks, strict=True))
    return angles_per_layer(ansatz, n) * n_layers + body + heads


def uniform_ranks(layout: Layout, rank: int) -> tuple[int, ...]:
    """``rank`` for every matrix (capped at its :func:`max_rank`), 0 for vectors."""
    return tuple(min(rank, max_rank(s.shape)) for s in layout.specs)


# Above this many weights, a tensor whose needed singular values are few gets them from a
# randomised SVD: exact svdvals of a 7,000 x 7,000 layer took most of compress() at 1e8 weights.
EXACT_SPECTRUM_WEIGHTS = 1 << 22
# Weights per float64 block in the randomised path's moments and last projection.
_PROJECTION_BLOCK = 1 << 22


def spectrum_gains(flat: torch.Tensor, shape: tuple[int, ...], need: int) -> torch.Tensor:
    """Each rank's share of a tensor's variance: ``sigma_r^2 / sum(sigma^2)``, ``r = 0..need``.

    The tensor is its column-centred ``(rows, cols)`` view (the head's bias holds the column
    means). Entries past ``need`` are zeros. Big tensors that need few values get them from
    :func:`_leading_singular_values` (seeded, 4 power iterations, no copy of the tensor; the
    total comes from the Frobenius norm, exactly): an estimate, close for the leading values
    that the allocation compares.

    Args:
        flat: The tensor's pretrained values, flat.
        shape: Its shape.
        need: The largest rank index read.
    """
    rows, cols = row_view(shape)
    out = torch.zeros(max_rank(shape) + 1, dtype=torch.float64)
    q = need + 1 + 10  # oversampled
    if flat.numel() > EXACT_SPECTRUM_WEIGHTS and 4 * q < min(rows, cols):
        w = flat.reshape(rows, cols)
        mean, total = _column_moments(w)
        sigma = _leading_singular_values(w, mean, q)[: need + 1]
    else:
        wd = flat.double().reshape(rows, cols)
        wd = wd - wd.mean(0, keepdim=True)
        total = wd.square().sum()
        sigma = torch.linalg.svdvals(wd)
    energy = (sigma**2 / total.clamp_min(1e-30))[: out.numel()]
    out[: energy.numel()] = energy
    return out


def _column_step(w: torch.Tensor) -> int:
    """Columns per block, so that a float64 block holds about ``_PROJECTION_BLOCK`` weights."""
    return max(1, _PROJECTION_BLOCK // max(1, w.shape[0]))


def _column_moments(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column means ``(cols,)`` and the centred sum of squares, float64, in column blocks."""
    step = _column_step(w)
    means, total = [], torch.zeros((), dtype=torch.float64)
    for c in range(0, w.shape[1], step):
        block = w[:, c : c + step].double()
        m = block.mean(0)
        means.append(m)
        total += (block - m).square().sum()
    return torch.cat(means), total


def _leading_singular_values(w: torch.Tensor, mean: torch.Tensor, q: int) -> torch.Tensor:
    """The ``q`` leading singular values of ``w - 1 mean^T`` (float64, descending).

    Halko et al. (2009), algorithm 4.4, with the centring as a rank-one correction, so no
    centred or float64 copy of ``w`` is made (``torch.svd_lowrank`` on the centred float64
    matrix held three such copies of a 47M-weight layer: 3.4x the model's bytes at 1e8
    weights). The power iterations run in ``w``'s float32; the last projection, which gives
    the values, is float64 in column blocks, so they are float64-accurate for the subspace.

    Args:
        w: ``(rows, cols)`` float32, not centred.
        mean: ``(cols,)`` float64 column means.
        q: Values wanted (columns of the random test matrix).
    """
    w32 = w.float()
    m32 = mean.float()

    def times(x: torch.Tensor) -> torch.Tensor:  # (w - 1 m^T) @ x: (rows, q)
        return w32 @ x - (m32 @ x)  # the (q,) row m^T x, subtracted from every row

    def times_t(y: torch.Tensor) -> torch.Tensor:  # (w - 1 m^T)^T @ y: (cols, q)
        return w32.T @ y - torch.outer(m32, y.sum(0))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        probe = torch.randn(w.shape[1], q)
    basis = torch.linalg.qr(times(probe)).Q  # (rows, q)
    for _ in range(4):
        basis = torch.linalg.qr(times(torch.linalg.qr(times_t(basis)).Q)).Q
    basis64 = basis.double()
    colsum = basis64.sum(0)  # 1^T Q
    step = _column_step(w)
    projected = torch.cat(  # (w - 1 m^T)^T Q, (cols, q), float64
        [
            w[:, c : c + step].double().T @ basis64 - torch.outer(mean[c : c + step], colsum)
            for c in range(0, w.shape[1], step)
        ]
    )
    return torch.linalg.svdvals(projected)


def allocate_ranks(
    layout: Layout,
    pretrained: torch.Tensor | None,
    allowed: int,
    n_layers: int,
    hidden: tuple[int, ...],
    n_qubits: int | None = None,
    ansatz: str = "paper",
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
        pretrained: Flat ``(M,)`` pretrained weights; ``None``: spend the leftover by cost alone.
        allowed: Parameter budget.
        n_layers: QNN layers.
        hidden: Mapping body hidden widths.
        n_qubits: Qubits, if fixed.
        ansatz: The QNN's registered circuit (its angles per layer count in the budget).

    Returns:
        One rank per tensor, in layout order (the minimum even if it exceeds ``allowed``).
    """

    def size_of(rank: int) -> int:
        return row_generator_size(
            layout, uniform_ranks(layout, rank), n_layers, hidden, n_qubits, ansatz
        )

    low, high = 1, 2
    while size_of(high) <= allowed and high < 1 << 20:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if size_of(mid) <= allowed else (low, mid)
    ranks = list(uniform_ranks(layout, low))
    size = row_generator_size(layout, ranks, n_layers, hidden, n_qubits, ansatz)
    gains: list[torch.Tensor] = []
    for s, rank in zip(layout.specs, ranks, strict=True):
        if max_rank(s.shape) == 0 or pretrained is None:
            # No spectrum without weights: every gain is 0, so the leftover goes by cost alone.
            gains.append(torch.zeros(max_rank(s.shape) + 1))
            continue
        # The leftover can buy this tensor at most this many more ranks: later singular values
        # are never read.
        need = min(max_rank(s.shape), rank + max(0, allowed - size) // row_view(s.shape)[1])
        gains.append(spectrum_gains(pretrained[s.offset : s.offset + s.numel], s.shape, need))
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


def resolve_rows(config: QTConfig, layout: Layout, pretrained: torch.Tensor | None) -> QTConfig:
    """The rows scheme's sizes: one rank per tensor, spent to the budget.

    With the pretrained weights (``pretrained``), ranks go where the weights' spectra need them
    (:func:`allocate_ranks`); without, or with ``rank`` given, every matrix gets the same rank.
    Without a budget the budget is the scheme's default (5% of M), or the smallest generator
    (rank 1 everywhere) where that is larger (models of a few thousand weights). An explicit budget
    below the smallest rows generator switches to the hashed scheme, which reaches 0.05% of M,
    with a warning that says so.

    Raises:
        ConfigError: ``ranks`` does not list one rank per tensor, or the budget is below the
            smallest hashed generator too.
    """
    from qtcompress.config import DEFAULT_HIDDEN, DEFAULT_LAYERS, QTConfig
    from qtcompress.generator.hashed import resolve_hashed

    hidden = config.hidden if config.hidden is not None else DEFAULT_HIDDEN["rows"]
    layers = config.n_layers or DEFAULT_LAYERS
    if config.ranks is not None:
        if len(config.ranks) != len(layout.specs):
            raise ConfigError(
                f"ranks lists {len(config.ranks)} tensors, the model has "
                f"{len(layout.specs)} generated tensors."
            )
        return replace(config, hidden=hidden, n_layers=layers)
    if config.rank is not None:
        ranks = uniform_ranks(layout, config.rank)
        return replace(config, hidden=hidden, n_layers=layers, ranks=ranks)
    allowed = config.budget_params(layout.total)

    def size(ranks: tuple[int, ...]) -> int:
        return row_generator_size(layout, ranks, layers, hidden, config.n_qubits, config.ansatz)

    smallest = size(uniform_ranks(layout, 1))
    if smallest > allowed and config.budget is None:
        allowed = smallest  # small models: the default means "the smallest generator"
    if smallest > allowed:
        default = QTConfig()
        if (config.hidden, config.n_layers, config.n_qubits) != (
            default.hidden,
            default.n_layers,
            default.n_qubits,
        ):
            raise ConfigError(
                f"A budget of {allowed:,} parameters is below the smallest rows generator for "
                f"this model ({smallest:,} = {smallest / layout.total:.2%} of M); raise "
                "--budget, use --scheme hashed, or leave the largest tensors classical with "
                "--exclude."
            )
        warnings.warn(
            f"A budget of {allowed:,} parameters is below the smallest rows generator for this "
            f"model ({smallest:,} = {smallest / layout.total:.2%} of M): using the hashed "
            "scheme (--scheme hashed).",
            stacklevel=2,
        )
        return resolve_hashed(replace(config, scheme="hashed"), layout, pretrained)
    ranks = allocate_ranks(
        layout, pretrained, allowed, layers, hidden, config.n_qubits, config.ansatz
    )
    return replace(config, hidden=hidden, n_layers=layers, ranks=ranks)
