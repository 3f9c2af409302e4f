"""The training loop both phases share (:func:`train_loop`).

Adam, a warm-up + cosine (or constant) learning rate, early stopping on a monitored value, a
tqdm bar, atomic checkpoints and exact resume, and NaN/Inf detection that leaves the generator
at its last good state.

A step whose loss is finite but whose gradient is not is skipped (no update, as AMP's
GradScaler does) and counted: the user's own model can have an infinite slope at some inputs
(``torch.sqrt`` of a norm that is exactly zero), which no learning rate fixes and which one
batch in many should not end a fit. Only when skips exceed ``MAX_SKIPPED_SHARE`` of the steps
does the fit stop.

Determinism: every step's mini-batch is a pure function of ``(seed, step)`` and the optimiser,
EMA, early-stopping and best-state bookkeeping all live in the checkpoint, so a resumed fit
takes exactly the same steps as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qtcompress.errors import ConfigError, FormatError, NonFiniteError
from qtcompress.generator import AnyGenerator, all_finite
from qtcompress.io.atomic import atomic_path

SCHEDULES = ("cosine", "constant")
CHECKPOINT_VERSION = 1
# Collapse restarts allowed per fit before it stops at its best state.
MAX_RESTARTS = 4
# Steps skipped for a non-finite gradient: a fit stops once more than this share of its steps
# so far were skipped, judged from SKIP_GRACE_STEPS steps on (or at the end of a shorter fit),
# so that all of the first 20 skipped stops it, and a rare bad batch never does.
MAX_SKIPPED_SHARE = 0.1
SKIP_GRACE_STEPS = 20
_LR_ADVICE = "Lower the learning rate, enable grad_clip, or check the data."
_MODEL_ADVICE = (
    "The loss was finite, so the model's own operations have an infinite slope at these "
    "inputs, not the learning rate: torch.sqrt, log, pow with a fractional exponent or a "
    "division at 0 (e.g. the square root of an all-zero row's squared norm); add a small "
    "epsilon there (torch.sqrt(s + 1e-12)) or use torch.linalg.vector_norm, whose gradient "
    "at 0 is finite."
)


@dataclass
class FitResult:
    """Outcome of one fit.

    Attributes:
        steps: Steps completed (including those before a resume).
        best: Best monitored value (lower is better).
        best_step: Step at which ``best`` was reached.
        final_loss: Training loss of the last step.
        history: Training loss per step.
        stopped_early: Whether early stopping ended the fit.
        resumed_from: Step restored from a checkpoint, or ``None``.
        elapsed_s: Wall time of this call.
        restarts: Collapses that the guard undid (best state restored, learning rate halved).
        skipped_steps: Steps (counted in ``steps``) whose gradient was NaN/Inf while the loss
            was finite: no update was made (see ``MAX_SKIPPED_SHARE``).
        lr_tried: ``(peak rate, monitored value)`` of each trial that chose the rate (the
            fine-tune's learning-rate probe); empty when the rate was given.
        lr: The peak learning rate the fit ran at (before any collapse-guard halving).
    """

    steps: int
    best: float
    best_step: int
    final_loss: float
    history: list[float] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from: int | None = None
    elapsed_s: float = 0.0
    restarts: int = 0
    skipped_steps: int = 0
    lr_tried: list[tuple[float, float]] = field(default_factory=list)
    lr: float = math.nan


@dataclass
class LoopConfig:
    """Settings of :func:`train_loop` (all part of the checkpoint fingerprint except progress).

    Attributes:
        steps: Total optimisation steps.
        lr: Peak learning rate.
        weight_decay: Adam (L2) weight decay.
        schedule: ``"cosine"`` (decay to ``lr * min_lr_ratio``) or ``"constant"``.
        warmup: Linear warm-up steps.
        min_lr_ratio: Final LR as a fraction of ``lr`` for the cosine schedule.
        eval_every: Steps between checks of the monitored value (early stopping, best state).
        patience: Checks without improvement before stopping; ``None`` disables early stopping.
        min_delta: Relative improvement that counts as one.
        restore_best: Load the best state at the end.
        grad_clip: Max global gradient norm; ``None`` disables clipping.
        seed: Seeds mini-batch order.
        source_lr_factor: Multiplier of the rate for the parameters under the generator's
            ``source`` (the hashed scheme's shared values: QNN angles, a table or an MPS); its
            scales and exact vectors keep the rate. 1: one rate for all.
    """

    steps: int = 500
    lr: float = 1e-2
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: int = 0
    min_lr_ratio: float = 0.01
    eval_every: int = 10
    patience: int | None = None
    min_delta: float = 1e-4
    restore_best: bool = True
    grad_clip: float | None = None
    seed: int = 0
    source_lr_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.eval_every < 1 or self.warmup < 0:
            raise ConfigError("steps and eval_every must be >= 1 and warmup >= 0.")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.weight_decay < 0:
            raise ConfigError(
                f"lr must be positive and finite, weight_decay >= 0 (got {self.lr}, "
                f"{self.weight_decay})."
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"Unknown schedule {self.schedule!r}; choose from {SCHEDULES}.")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"patience must be >= 1 or None, got {self.patience}.")
        if not (self.source_lr_factor > 0 and math.isfinite(self.source_lr_factor)):
            raise ConfigError(
                f"source_lr_factor must be positive and finite, got {self.source_lr_factor}."
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be positive or None, got {self.grad_clip}.")

    def lr_at(self, step: int) -> float:
        """Learning rate used at a (0-based) step."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        span = max(1, self.steps - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        low = self.lr * self.min_lr_ratio
        return low + 0.5 * (self.lr - low) * (1.0 + math.cos(math.pi * t))

    def fingerprint(self) -> dict[str, Any]:
        """Settings a checkpoint must agree with to be resumed."""
        values = dict(vars(self))
        if values["source_lr_factor"] == 1.0:  # as checkpoints written before the option say
            del values["source_lr_factor"]
        return values


def _save_atomic(obj: Any, path: Path) -> None:
    # Write then rename: an interruption never leaves a half-written checkpoint behind.
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _all_finite(tensors: Any) -> bool:
    return all(all_finite(t) for t in tensors if t is not None)


def copy_state(generator: nn.Module, extra: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A copy of the generator's state and of the tensors the loss updates in place."""
    return {
        "generator": copy.deepcopy(generator.state_dict()),
        "extra": {k: v.detach().clone() for k, v in extra.items()},
    }


def restore_state(
    generator: nn.Module, extra: Mapping[str, torch.Tensor], state: dict[str, Any]
) -> None:
    """Put back what :func:`copy_state` copied (``extra`` in place)."""
    generator.load_state_dict(state["generator"])
    with torch.no_grad():
        for k, v in extra.items():
            v.copy_(state["extra"][k])


def make_adam(generator: nn.Module, cfg: LoopConfig) -> torch.optim.Adam:
    """Adam over the generator's trainable parameters, fused where torch has the kernel.

    The generator has one small head per tensor: torch's default per-tensor loop spent 2-4 ms
    of Python per step on the 21 tensors of a 1e6-weight MLP's generator (fused: 0.13 ms). Fused
    Adam rounds differently in the last bits (not bit-identical to the loop; same math). With
    ``cfg.source_lr_factor`` the ``source.`` parameters form a second group whose ``factor``
    multiplies the scheduled rate.
    """
    named = [(n, p) for n, p in generator.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
        for p in params
    )
    groups: list[dict[str, Any]] = [{"params": params, "factor": 1.0}]
    if cfg.source_lr_factor != 1.0:
        source = [p for n, p in named if n.startswith("source.")]
        rest = [p for n, p in named if not n.startswith("source.")]
        groups = [
            {"params": g, "factor": f}
            for g, f in ((rest, 1.0), (source, cfg.source_lr_factor))
            if g
        ]
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def train_loop(
    generator: AnyGenerator,
    loss_at: Callable[[int], torch.Tensor],
    cfg: LoopConfig,
    *,
    monitor: Callable[[], float] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 50,
    resume: bool = True,
    progress: bool = True,
    desc: str = "fit",
    callback: Callable[[int, float], None] | None = None,
    extra_state: Mapping[str, torch.Tensor] | None = None,
    guard: Callable[[], bool] | None = None,
    describe_step: Callable[[int], str] | None = None,
) -> FitResult:
    """Optimise the generator's parameters.

    Args:
        generator: Trained in place.
        loss_at: ``step -> scalar loss`` (must depend only on the step and the generator).
        cfg: Loop settings.
        monitor: Value checked every ``cfg.eval_every`` steps for early stopping and best state
            (lower is better); default: an exponential moving average of the training loss.
        checkpoint_path: File for periodic checkpoints (written atomically).
        checkpoint_every: Steps between checkpoints.
        resume: Continue from ``checkpoint_path`` if it exists.
        progress: Show a tqdm bar (loss, elapsed).
        desc: Bar label.
        callback: Called as ``callback(step, loss)`` after every completed step.
        extra_state: Tensors that the loss updates in place (e.g. BatchNorm running statistics
            of the student); they are checkpointed, rolled back and restored with the
            generator so that resume and best-state stay exact.
        guard: Checked with the monitored value; ``True`` means the state went bad (e.g. a
            student collapsed to a constant function): the best state is restored, the
            optimiser's moments are reset and the learning rate is halved for the rest of the
            fit (at most ``MAX_RESTARTS`` times, then the fit stops at the best state).
        describe_step: ``step -> text`` naming the step's data (e.g. ``" (batch 3 of epoch
            0)"``), for the messages about a skipped step.

    Returns:
        A :class:`FitResult`.

    Raises:
        NonFiniteError: The loss or an updated parameter became NaN/Inf, or more than
            ``MAX_SKIPPED_SHARE`` of the steps had a NaN/Inf gradient (each such step is
            skipped, with one warning); the generator is left at its last good state (also
            written to the checkpoint).
        FormatError: The checkpoint is unreadable or was made with other settings.
    """
    t0 = time.perf_counter()
    params = [p for p in generator.parameters() if p.requires_grad]
    opt = make_adam(generator, cfg)
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    start, best, best_step, bad, ema = 0, math.inf, 0, 0, None
    lr_scale, restarts, skipped = 1.0, 0, 0
    history: list[float] = []
    extra = dict(extra_state or {})

    def full_state() -> dict[str, Any]:
        return copy_state(generator, extra)

    def load_full(state: dict[str, Any]) -> None:
        restore_state(generator, extra, state)

    best_state = full_state()
    resumed_from = None
    if path is not None and resume and path.exists():
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
        except Exception as exc:  # torch raises several types for corrupt files
            raise FormatError(f"Cannot read checkpoint {path}: {exc}") from exc
        if not isinstance(ck, dict) or ck.get("version") != CHECKPOINT_VERSION:
            raise FormatError(
                f"{path} is not a qtcompress fit checkpoint (version {CHECKPOINT_VERSION})."
            )
        if ck["fingerprint"] != cfg.fingerprint() or ck["desc"] != desc:
            raise FormatError(
                f"Checkpoint {path} was written by a fit with other settings: "
                f"{ck['fingerprint']} ({ck['desc']})."
            )
        load_full(ck["state"])
        opt.load_state_dict(ck["optimizer"])
        start, best, best_step, bad, ema = (
            ck["step"],
            ck["best"],
            ck["best_step"],
            ck["bad"],
            ck["ema"],
        )
        lr_scale, restarts = ck.get("lr_scale", 1.0), ck.get("restarts", 0)
        skipped = ck.get("skipped", 0)
        history, best_state = list(ck["history"]), ck["best_state"]
        resumed_from = start

    def snapshot(step: int) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "desc": desc,
            "fingerprint": cfg.fingerprint(),
            "state": full_state(),
            "optimizer": opt.state_dict(),
            "step": step,
            "best": best,
            "best_step": best_step,
            "bad": bad,
            "ema": ema,
            "lr_scale": lr_scale,
            "restarts": restarts,
            "skipped": skipped,
            "history": history,
            "best_state": best_state,
        }

    def where(step: int) -> str:
        return describe_step(step) if describe_step is not None else ""

    stopped, warned = False, False
    last_skip: int | None = None  # in this call (a resumed fit's earlier skips are counted only)
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not progress, leave=False)
    try:
        for step in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(step) * lr_scale * g.get("factor", 1.0)
            opt.zero_grad(set_to_none=True)
            good = full_state()
            good_opt = copy.deepcopy(opt.state_dict())
            advice, skipped_before = _LR_ADVICE, skipped
            try:
                loss = loss_at(step)
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"Loss is {loss.item()} at step {step}.")
                try:
                    loss.backward()
                    grad_ok = _all_finite(p.grad for p in params)
                except NonFiniteError:
                    # The QNN refuses a NaN/Inf gradient reaching it: the same fault, met
                    # inside the backward pass.
                    grad_ok = False
                if not grad_ok:
                    skipped, last_skip = skipped + 1, step
                    # No update; the forward pass may have moved BatchNorm statistics.
                    load_full(good)
                    opt.zero_grad(set_to_none=True)
                if skipped and step + 1 >= min(SKIP_GRACE_STEPS, cfg.steps):
                    if skipped > MAX_SKIPPED_SHARE * (step + 1):
                        advice = _MODEL_ADVICE
                        last = (
                            f", last at step {last_skip}{where(last_skip)}"
                            if last_skip is not None
                            else ""
                        )
                        raise NonFiniteError(
                            f"The gradient was NaN or Inf on {skipped} of the first {step + 1} "
                            f"steps{last}; a fit stops when more than "
                            f"{MAX_SKIPPED_SHARE:.0%} of its steps are skipped."
                        )
                if not grad_ok and not warned:
                    warned = True
                    warnings.warn(
                        f"{desc}: the gradient at step {step}{where(step)} is NaN or Inf "
                        "while the loss is finite; the step was skipped (no update). The "
                        "model's own operations likely have an infinite slope at these "
                        "inputs (torch.sqrt, log or a division at 0); later skips are counted "
                        "(FitResult.skipped_steps), and more than "
                        f"{MAX_SKIPPED_SHARE:.0%} of the steps skipped stops the fit.",
                        stacklevel=2,
                    )
                if grad_ok:
                    if cfg.grad_clip is not None:
                        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    if not _all_finite(params):
                        raise NonFiniteError(f"A parameter became NaN/Inf at step {step}.")
            except NonFiniteError as exc:
                load_full(good)
                opt.load_state_dict(good_opt)
                skipped = skipped_before  # the checkpoint resumes at this step, not after it
                if path is not None:
                    _save_atomic(snapshot(step), path)
                raise NonFiniteError(
                    f"{exc} The generator was left at its state before step {step}"
                    + (f" (saved to {path})." if path is not None else ".")
                    + f" {advice}"
                ) from exc
            value = float(loss.detach())
            history.append(value)
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.steps:
                current = monitor() if monitor is not None else ema
                if guard is not None and best < math.inf and guard():
                    # Collapsed: back to the best state with a smaller step.
                    restarts += 1
                    load_full(best_state)
                    opt = make_adam(generator, cfg)
                    lr_scale *= 0.5
                    if progress:
                        bar.write(
                            f"{desc}: outputs collapsed at step {done}; restored the "
                            f"best state (step {best_step}), halved the learning rate"
                        )
                    if restarts > MAX_RESTARTS:
                        bar.close()
                        break
                if current < best * (1.0 - cfg.min_delta) or best == math.inf:
                    best, best_step, bad = current, done, 0
                    best_state = full_state()
                else:
                    bad += 1
                stopped = cfg.patience is not None and bad >= cfg.patience
            if path is not None and (done % checkpoint_every == 0 or done == cfg.steps or stopped):
                _save_atomic(snapshot(done), path)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}", best=f"{best:.4g}")
            if callback is not None:
                callback(done, value)
            if stopped:
                break
    finally:
        bar.close()
    if cfg.restore_best and best_state is not None and best < math.inf:
        load_full(best_state)
    return FitResult(
        len(history),
        best,
        best_step,
        history[-1] if history else math.nan,
        history,
        stopped,
        resumed_from,
        time.perf_counter() - t0,
        restarts,
        skipped,
        lr=cfg.lr,
    )
