"""Options of the two training phases: one frozen dataclass each, overridden by name.

``QTModel.fit_weights(FitOptions(steps=50))`` or ``QTModel.fit_weights(steps=50)``: keyword
overrides are applied with :func:`dataclasses.replace` after :func:`with_overrides` checked their
names, so a misspelled option is a :class:`~qtcompress.errors.ConfigError` naming the closest
one, raised before any work. The step counts, learning rates and batch size default to
:mod:`qtcompress.constants`, the values the CLI and the pipeline read too.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

import torch

from qtcompress.constants import (
    BATCH_SIZE,
    FINETUNE_STEPS,
    FIT_LR,
    FIT_STEPS,
    STATEFUL_FINETUNE_STEPS,
)
from qtcompress.errors import ConfigError
from qtcompress.train.loop import LoopConfig

# Fields of LoopConfig (the checkpoint fingerprint); the rest of an options object says how the
# run is watched and saved, or (fine-tune) what it learns from.
_LOOP_FIELDS = tuple(f.name for f in fields(LoopConfig))
_RUN_FIELDS = ("checkpoint_path", "checkpoint_every", "resume", "progress", "callback")


def check_options(given: Iterable[str], allowed: Iterable[str], what: str) -> None:
    """Refuse option names ``what`` does not take, naming the closest ones (a typo is an error).

    Raises:
        ConfigError: One line naming every unknown option.
    """
    allowed = sorted(set(allowed))
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, allowed, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{what} has no option {', '.join(hints)}.")


@dataclass(frozen=True)
class LoopOptions:
    """What both phases share: the loop's schedule and stopping, and how a run is saved.

    Attributes:
        steps: Optimisation steps (>= 1); ``None`` (phase 2 only): the default for the run
            (:func:`default_finetune_steps`).
        lr: Peak Adam learning rate.
        weight_decay: Adam (L2) weight decay.
        schedule: ``"cosine"`` or ``"constant"``.
        warmup: Linear warm-up steps.
        min_lr_ratio: Final learning rate of the cosine schedule, as a fraction of ``lr``.
        eval_every: Steps between checks of the monitored value (best state, early stopping).
        patience: Checks without improvement before stopping; ``None``: never stop early.
        min_delta: Relative improvement that counts as one.
        restore_best: End at the best monitored state.
        grad_clip: Largest global gradient norm; ``None``: no clipping.
        seed: Seeds the mini-batch order; ``None``: the generator config's seed.
        source_lr_factor: Multiplier of the rate for the hashed scheme's shared values (the
            QNN's angles); the scales and exact vectors keep the rate.
        checkpoint_path: File for periodic checkpoints (written atomically).
        checkpoint_every: Steps between checkpoints.
        resume: Continue from ``checkpoint_path`` when it exists and matches these options.
        progress: Show a progress bar.
        callback: ``callback(step, loss)`` after every completed step.
    """

    steps: int | None = FIT_STEPS
    lr: float | None = FIT_LR
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: int | None = 0
    min_lr_ratio: float = 0.01
    eval_every: int = 10
    patience: int | None = None
    min_delta: float = 1e-4
    restore_best: bool = True
    grad_clip: float | None = None
    seed: int | None = None
    source_lr_factor: float = 1.0
    checkpoint_path: str | os.PathLike[str] | None = None
    checkpoint_every: int = 50
    resume: bool = True
    progress: bool = True
    callback: Callable[[int, float], None] | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int)
        ):
            raise ConfigError(f"steps must be an integer, got {self.steps!r}.")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}.")
        # Validates at once (a step count left to the run is checked once it is known).
        self.loop_config(seed=0, lr=1.0 if self.lr is None else self.lr, steps=self.steps or 1)

    def loop_config(self, *, seed: int, lr: float, steps: int | None = None) -> LoopConfig:
        """The :class:`LoopConfig` these options describe, seed, rate and steps resolved.

        ``steps`` is the count to use where :attr:`steps` is ``None`` (left to the run).
        """
        values = {name: getattr(self, name) for name in _LOOP_FIELDS}
        values["seed"] = seed if self.seed is None else self.seed
        values["lr"] = lr
        if self.steps is not None:
            steps = self.steps
        if steps is None:
            raise ConfigError("steps must be given: these options leave it to the run.")
        values["steps"] = steps
        if values["warmup"] is None:  # 10% of the steps, the fine-tune's default
            values["warmup"] = max(1, steps // 10)
        return LoopConfig(**values)

    def run_kwargs(self) -> dict[str, Any]:
        """The loop's keywords for checkpoints, progress and the callback."""
        return {name: getattr(self, name) for name in _RUN_FIELDS}


@dataclass(frozen=True)
class FitOptions(LoopOptions):
    """Phase 1 (reproduce the pretrained weights): :class:`LoopOptions` and the scales.

    Attributes:
        freeze_scale: Flat scheme: keep each tensor's scale at its pretrained std while fitting
            (a free scale shrinks large tensors towards their mean and the rebuilt network dies).
    """

    freeze_scale: bool = True


@dataclass(frozen=True)
class FinetuneOptions(LoopOptions):
    """Phase 2 (train through the model's own forward pass): :class:`LoopOptions` and the task.

    Defaults differ from phase 1 where measured: ``steps`` ``None``
    (:func:`default_finetune_steps`: :data:`FINETUNE_STEPS`, twice that over rollouts),
    ``lr`` ``None`` (the scheme's registered rate), ``warmup`` ``None`` (10% of the steps),
    ``grad_clip`` 1.

    Attributes:
        mode: ``"distill"`` (teacher = the pretrained model) or ``"supervised"`` (labels).
        batch_size: Mini-batch size.
        distill: Distillation loss by registered name; ``None``: the output kind's.
        output: Which model output to train on when it has several (index or name).
        output_kind: ``"logits"``, ``"probability"``, ``"embedding"``, ``"regression"`` or
            ``"ctc"``; ``None``: inferred from the teacher's outputs.
        loss_fn: Supervised loss ``(outputs, labels)``; ``None``: cross-entropy.
        temperature: KL temperature.
        alpha: Weight of the distillation term when labels are also given.
        batch_stats: Train BatchNorm in batch-statistics mode, updating the student's running
            statistics.
        labels_in_items: Where labels sit inside dataset items (see :mod:`qtcompress.data`).
        probe_size: Examples in the fixed probe batch that picks the best state.
        guard: On a collapse (outputs turning constant), restore the best state and halve the
            learning rate.
        lr_probe: Multiples of the peak rate tried in short trial fits first, the best kept
            (:mod:`qtcompress.train.lr_probe`); ``()``: the rate as given.
    """

    steps: int | None = None
    lr: float | None = None
    warmup: int | None = None
    grad_clip: float | None = 1.0
    mode: str = "distill"
    batch_size: int = BATCH_SIZE
    distill: str | None = None
    output: str | int | None = None
    output_kind: str | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    temperature: float = 2.0
    alpha: float = 1.0
    batch_stats: bool = True
    labels_in_items: bool | str = False
    probe_size: int = 256
    guard: bool = True
    lr_probe: tuple[float, ...] = ()

    def task_kwargs(self) -> dict[str, Any]:
        """The fine-tune's own keywords (what it learns from and how it is scored)."""
        own = {f.name for f in fields(FinetuneOptions)} - {f.name for f in fields(LoopOptions)}
        return {name: getattr(self, name) for name in sorted(own)}


def default_finetune_steps(rollouts: bool) -> tuple[int, str]:
    """Phase 2's step count when none is given, and why.

    A model distilled over rollouts of its training streams gets
    :data:`~qtcompress.constants.STATEFUL_FINETUNE_STEPS` (measured: its free-running
    fidelity still improves past the general :data:`~qtcompress.constants.FINETUNE_STEPS`).
    """
    if rollouts:
        return STATEFUL_FINETUNE_STEPS, "the default for a model distilled over its streams"
    return FINETUNE_STEPS, "the default"


Options = TypeVar("Options", bound=LoopOptions)


def with_overrides(options: Options, overrides: dict[str, Any], what: str) -> Options:
    """``options`` with ``overrides`` replaced by name; an unknown name raises first.

    Raises:
        ConfigError: An option ``type(options)`` does not have (naming the closest), or a
            value its validation refuses.
    """
    check_options(overrides, (f.name for f in fields(options)), what)
    return replace(options, **overrides) if overrides else options
