"""Phase 1: fit the generator so that it reproduces the pretrained weights.

Each scheme gives its loss (:mod:`qtcompress.generator.weight_loss`); this runs the loop.
"""

from __future__ import annotations

from typing import Any

import torch

from qtcompress.errors import ConfigError, NonFiniteError
from qtcompress.generator import AnyGenerator, all_finite
from qtcompress.train.loop import FitResult, LoopConfig, train_loop


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

    The scheme gives the loss (:meth:`~qtcompress.generator.common.Generator.weight_fit_objective`)
    and closes the fit (:meth:`~qtcompress.generator.common.Generator.weight_fit_done`: the rows
    scheme's least-squares heads, so every tensor's relative error is at most 1; the hashed
    scheme's spreads; the flat scheme's scales released), whatever way the loop ends.

    Args:
        generator: Trained in place.
        pretrained: ``(M,)`` pretrained weights.
        cfg: Loop settings.
        freeze_scale: Flat scheme: keep the per-tensor scales (the pretrained stds) fixed. When
            the generator is much smaller than M it cannot match a large tensor, and the
            MSE-optimal scale then shrinks that tensor towards its mean: the rebuilt model
            collapses to a constant output with dead ReLUs, from which fine-tuning may never
            recover. Frozen, the fit maximises each tensor's correlation with its pretrained.
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
    objective = generator.weight_fit_objective(pretrained, freeze_scale=freeze_scale)
    try:
        return train_loop(generator, objective, cfg, desc=desc, **loop_kwargs)
    finally:
        generator.weight_fit_done(pretrained)
