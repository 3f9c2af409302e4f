"""Phase 1: fit the generator so that it reproduces the pretrained weights.

The loss is each tensor's squared error over its own variance, so every tensor counts alike
whatever its magnitude; big models stream it tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from qtcompress.errors import ConfigError, NonFiniteError
from qtcompress.generator import AnyGenerator, QTGenerator, RowGenerator, all_finite
from qtcompress.train.loop import FitResult, LoopConfig, train_loop


def tensor_normalisers(generator: AnyGenerator, pretrained: torch.Tensor) -> torch.Tensor:
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


def tensor_scales(generator: AnyGenerator, pretrained: torch.Tensor) -> list[float]:
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


def relative_errors(generator: AnyGenerator, pretrained: torch.Tensor) -> dict[str, float]:
    """``||w - w*|| / ||w*||`` overall (key ``"_total"``) and per tensor."""
    out: dict[str, float] = {}
    diff_sq = 0.0
    specs = {s.offset: s for s in generator.layout.specs}
    with torch.no_grad():
        # Block by block (one tensor per block for the rows scheme): no M-sized copy.
        for start, block in generator.iter_blocks():
            stop = start + block.shape[0]
            b = pretrained[start:stop]
            block_sq = float(((block - b).double() ** 2).sum())
            diff_sq += block_sq
            s = specs.get(start)
            if s is not None and s.numel == block.shape[0]:
                out[s.name] = block_sq**0.5 / float(b.double().norm().clamp_min(1e-12))
        if len(out) != len(specs):  # blocks that do not line up with tensors (flat scheme)
            w = torch.cat([b for _, b in generator.iter_blocks()])
            for s in generator.layout.specs:
                a, b = w[s.offset : s.offset + s.numel], pretrained[s.offset : s.offset + s.numel]
                out[s.name] = float((a - b).norm() / b.norm().clamp_min(1e-12))
        total = float(pretrained.double().norm().clamp_min(1e-12))
    return {"_total": diff_sq**0.5 / total, **out}


def fit_weights(
    generator: AnyGenerator,
    pretrained: torch.Tensor,
    cfg: LoopConfig,
    *,
    freeze_scale: bool = True,
    **loop_kwargs: Any,
) -> FitResult:
    """Phase 1: fit the generator so that it reproduces ``pretrained`` (flat pretrained weights).

    Args:
        generator: Trained in place (flat scheme: call :meth:`QTGenerator.init_affine` first).
            A :class:`RowGenerator` ends with least-squares heads (:meth:`RowGenerator.fit_heads`),
            so every tensor's relative error is at most 1.
        pretrained: ``(M,)`` pretrained weights.
        cfg: Loop settings.
        freeze_scale: Keep the per-tensor scales (the pretrained stds) fixed. When the
            generator is much smaller than M it cannot match a large tensor, and the MSE-optimal
            scale then shrinks that tensor towards its mean: the rebuilt model collapses to a
            constant output with dead ReLUs, from which fine-tuning may never recover.
            Frozen, the fit maximises each tensor's correlation with its pretrained instead.
        **loop_kwargs: Passed to :func:`train_loop` (checkpointing, progress, ...).
    """
    if pretrained.shape != (generator.total,):
        raise ConfigError(
            f"pretrained must have shape ({generator.total},), got {tuple(pretrained.shape)}."
        )
    if not all_finite(pretrained):
        raise NonFiniteError("The pretrained weights hold NaN or Inf.")
    pretrained = pretrained.detach().to(torch.float32)
    desc = loop_kwargs.pop("desc", "fit_weights")
    if isinstance(generator, RowGenerator):
        scales = tensor_scales(generator, pretrained)
        result = train_loop(
            generator,
            lambda _step: row_weight_loss(generator, pretrained, scales),
            cfg,
            desc=desc,
            **loop_kwargs,
        )
        # The heads' least-squares optimum for the trained features: never worse than zeros.
        generator.fit_heads(pretrained)
        return result
    if not isinstance(generator, QTGenerator):  # any other scheme: its own objective
        objective = generator.weight_fit_objective(pretrained)
        try:
            return train_loop(generator, objective, cfg, desc=desc, **loop_kwargs)
        finally:
            generator.weight_fit_done(pretrained)
    factors = tensor_normalisers(generator, pretrained)
    trainable = generator.scale.requires_grad
    if freeze_scale:
        generator.scale.requires_grad_(False)
    try:
        return train_loop(
            generator,
            lambda _step: weight_loss(generator.generate(), pretrained, factors),
            cfg,
            desc=desc,
            **loop_kwargs,
        )
    finally:
        generator.scale.requires_grad_(trainable)
