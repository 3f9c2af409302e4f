"""Phase 1's losses: how far generated weights are from the pretrained ones.

The loss is each tensor's squared error over its own variance, so every tensor counts alike
whatever its magnitude; big models stream it tensor by tensor. Each scheme's
``weight_fit_objective`` builds its phase-1 loss from these (the flat scheme
:func:`weight_loss`, the rows scheme :func:`row_weight_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from qtcompress.generator.rows import RowGenerator


def tensor_normalisers(generator: Any, pretrained: torch.Tensor) -> torch.Tensor:
    """Per-weight factors that make the squared error a mean over tensors of relative MSEs.

    Tensor ``t`` contributes ``mean((w - w*)^2) / var(w*_t)`` with equal weight, so a 16-element
    BatchNorm scale counts as much as a 10^5-element conv kernel, and a near-constant tensor is
    judged against a floor of ``1e-4 * mean(w*_t^2)`` rather than its (near-zero) variance.
    """
    layout = generator.layout
    factors = torch.empty(layout.total, device=pretrained.device)
    for s, scale in zip(layout.specs, tensor_scales(generator, pretrained), strict=True):
        factors[s.offset : s.offset + s.numel] = scale
    return factors


def tensor_scales(generator: Any, pretrained: torch.Tensor) -> list[float]:
    """One factor per tensor (see :func:`tensor_normalisers`), without an M-sized vector."""
    layout = generator.layout
    out = []
    for s in layout.specs:
        var, mean_sq = _moments(pretrained[s.offset : s.offset + s.numel])
        denom = max(var, 1e-4 * mean_sq, 1e-12)
        out.append(1.0 / (denom * s.numel * len(layout.specs)))
    return out


# Tensors above this many weights get their moments in float64 blocks: the whole-tensor float64
# copies (and their squares) took 1.5x the weights' bytes at 1e8 weights, phase 1's peak.
MOMENT_BLOCK = 1 << 22


def _moments(part: torch.Tensor) -> tuple[float, float]:
    """``(variance, mean of squares)`` of a 1-D tensor, accumulated in float64.

    Up to :data:`MOMENT_BLOCK` weights in one piece (bit-identical to before); above it, two
    passes over float64 blocks (mean, then squared deviations), so memory stays one block.
    """
    n = part.numel()
    if n <= MOMENT_BLOCK:
        whole = part.double()
        return float(whole.var(unbiased=False)), float((whole**2).mean())
    blocks = range(0, n, MOMENT_BLOCK)
    total = sum(float(part[i : i + MOMENT_BLOCK].double().sum()) for i in blocks)
    mean = total / n
    dev_sq = sq = 0.0
    for i in blocks:
        block = part[i : i + MOMENT_BLOCK].double()
        dev_sq += float(((block - mean) ** 2).sum())
        sq += float((block**2).sum())
    return dev_sq / n, sq / n


# Above this many weights, phase 1 recomputes each tensor in the backward pass instead of
# keeping its difference from the pretrained: extra memory is then one tensor, not all of M.
STREAM_WEIGHTS = 1 << 24
STREAM_BLOCK = 1 << 22  # weights per recomputed block (16 MiB of float32)


def row_weight_loss(
    generator: RowGenerator, pretrained: torch.Tensor, scales: Sequence[float]
) -> torch.Tensor:
    """Phase-1 loss of the rows scheme, tensor by tensor (same value as :func:`weight_loss`).

    Each tensor is generated from the shared features and compared with its slice of
    ``pretrained`` (a view): no M-sized concatenation, factor vector or gradient is made. Above
    :data:`STREAM_WEIGHTS` weights each tensor's term is checkpointed, so at most one generated
    tensor is alive at a time (at the cost of generating it again in the backward pass).
    """
    h = generator.features()  # (S, rank)
    stream = generator.total >= STREAM_WEIGHTS
    loss = h.new_zeros(())
    for i, s in enumerate(generator.layout.specs):
        goal = generator._as_view(pretrained[s.offset : s.offset + s.numel], i)  # (rows, cols) view
        if not stream:  # the whole tensor as one block, kept for the backward pass
            loss = loss + generator.row_block_error(h, i, 0, goal) * scales[i]
            continue
        # Row blocks of at most STREAM_BLOCK weights, each recomputed in the backward pass.
        step = max(1, STREAM_BLOCK // goal.shape[1])
        for r in range(0, goal.shape[0], step):
            part = checkpoint(
                generator.row_block_error, h, i, r, goal[r : r + step], use_reentrant=False
            )
            loss = loss + part * scales[i]
    return loss


def weight_loss(
    generated: torch.Tensor, pretrained: torch.Tensor, factors: torch.Tensor
) -> torch.Tensor:
    """Phase-1 loss: per-tensor normalised MSE averaged over tensors.

    See :func:`tensor_normalisers` for the normalisation.
    """
    return ((generated - pretrained) ** 2 * factors).sum()
