"""Pick the fine-tune's peak learning rate by short trial runs, not by hand.

The best rate differs by model at the same scheme and budget (measured, hashed generator, 300
steps: the streaming LSTM is best at 3e-3, the two-input encoder at 1e-2, and 3e-2 ruins the
LSTM). :func:`probe_learning_rate` runs a short fit of the same recipe (warm-up and cosine
decay over ``steps``, the run's first batches) at each candidate rate from the same starting
state, scores each on the fine-tune's monitor (the probe batch's fidelity), puts the
generator back exactly as it was and returns the best rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from qtcompress.errors import NonFiniteError
from qtcompress.generator import AnyGenerator
from qtcompress.train.loop import LoopConfig, copy_state, restore_state, train_loop

# Candidate rates as multiples of the scheme's default, and each trial's share of the run.
LR_FACTORS: tuple[float, ...] = (0.3, 1.0, 3.0)
TRIAL_SHARE = 0.05
MIN_TRIAL_STEPS = 20


@dataclass
class ProbeResult:
    """What the learning-rate probe tried.

    Attributes:
        lr: The rate chosen.
        tried: ``(rate, monitored value)`` per candidate (lower is better; ``inf``: the
            trial's loss or parameters went NaN/Inf).
        steps: Steps of each trial.
    """

    lr: float
    tried: list[tuple[float, float]] = field(default_factory=list)
    steps: int = 0


def trial_steps(total: int) -> int:
    """Steps of one trial for a fine-tune of ``total`` steps (5%, at least 20)."""
    return max(MIN_TRIAL_STEPS, round(TRIAL_SHARE * total))


def probe_learning_rate(
    generator: AnyGenerator,
    loss_at: Callable[[int], torch.Tensor],
    cfg: LoopConfig,
    monitor: Callable[[], float],
    *,
    factors: Sequence[float] = LR_FACTORS,
    extra_state: Mapping[str, torch.Tensor] | None = None,
    reset: Callable[[], None] | None = None,
) -> ProbeResult:
    """The best of ``cfg.lr * factors`` after a short trial fit each.

    Args:
        generator: Trained in place during each trial, then restored exactly.
        loss_at: The fine-tune's ``step -> loss``.
        cfg: The fine-tune's loop settings (its rate is the one ``factors`` multiply).
        monitor: The fine-tune's monitored value (lower is better).
        factors: Multiples of ``cfg.lr`` to try.
        extra_state: Tensors the loss updates in place (BatchNorm statistics): restored too.
        reset: Called after each trial (clears what the loss cached from the trial's student).

    Returns:
        A :class:`ProbeResult`; ties go to the earlier factor. With one factor, no trial runs.
    """
    if len(factors) < 2:
        return ProbeResult(cfg.lr * (factors[0] if factors else 1.0))
    steps = trial_steps(cfg.steps)
    trial_cfg = replace(
        cfg,
        steps=steps,
        warmup=min(cfg.warmup, steps // 10),
        eval_every=steps,
        patience=None,
        restore_best=False,
    )
    extra = extra_state or {}
    start = copy_state(generator, extra)
    tried: list[tuple[float, float]] = []
    for factor in factors:
        lr = cfg.lr * factor
        try:
            train_loop(
                generator,
                loss_at,
                replace(trial_cfg, lr=lr),
                progress=False,
                extra_state=extra_state,
            )
            value = monitor()
        except NonFiniteError:  # this rate blew up: it is not the one
            value = math.inf
        tried.append((lr, value if math.isfinite(value) else math.inf))
        restore_state(generator, extra, start)
        if reset is not None:
            reset()
    best = min(range(len(tried)), key=lambda i: tried[i][1])
    return ProbeResult(tried[best][0], tried, steps)
