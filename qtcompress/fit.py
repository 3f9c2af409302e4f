"""Training the generator: phase 1 (reproduce pretrained weights), phase 2 (fine-tune on a task).

Both phases share one loop (:func:`train_loop`): Adam, a warm-up + cosine (or constant) learning
rate, early stopping on a monitored value, a tqdm bar, atomic checkpoints and exact resume, and
NaN/Inf detection that leaves the generator at its last good state.

Determinism: every step's mini-batch is a pure function of ``(seed, step)`` and the optimiser,
EMA, early-stopping and best-state bookkeeping all live in the checkpoint, so a resumed fit
takes exactly the same steps as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from qtcompress.atomic import atomic_path
from qtcompress.batches import Batch, InputSource, check_call, select_output
from qtcompress.errors import ConfigError, FormatError, NonFiniteError
from qtcompress.fidelity import (
    DEFAULT_LOSS,
    Fidelity,
    check_kind,
    distill_loss,
    infer_output_kind,
    measure_fidelity,
)
from qtcompress.generator import AnyGenerator, RowGenerator, all_finite
from qtcompress.targets import Layout

SCHEDULES = ("cosine", "constant")
CHECKPOINT_VERSION = 1
# Collapse restarts allowed per fit before it stops at its best state.
MAX_RESTARTS = 4


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
        return dict(vars(self))


def _save_atomic(obj: Any, path: Path) -> None:
    # Write then rename: an interruption never leaves a half-written checkpoint behind.
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _all_finite(tensors: Any) -> bool:
    return all(all_finite(t) for t in tensors if t is not None)


def make_adam(params: list[nn.Parameter], cfg: LoopConfig) -> torch.optim.Adam:
    """Adam over the generator's parameters, fused into one kernel where torch has one.

    The generator has one small head per tensor: torch's default per-tensor loop spent 2-4 ms
    of Python per step on the 21 tensors of a 1e6-weight MLP's generator (fused: 0.13 ms). Fused
    Adam rounds differently in the last bits (not bit-identical to the loop; same math).
    """
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
        for p in params
    )
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


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

    Returns:
        A :class:`FitResult`.

    Raises:
        NonFiniteError: The loss, a gradient or an updated parameter became NaN/Inf; the
            generator is left at its last good state (also written to the checkpoint).
        FormatError: The checkpoint is unreadable or was made with other settings.
    """
    t0 = time.perf_counter()
    params = [p for p in generator.parameters() if p.requires_grad]
    opt = make_adam(params, cfg)
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    start, best, best_step, bad, ema = 0, math.inf, 0, 0, None
    lr_scale, restarts = 1.0, 0
    history: list[float] = []
    extra = dict(extra_state or {})

    def full_state() -> dict[str, Any]:
        return {
            "generator": copy.deepcopy(generator.state_dict()),
            "extra": {k: v.detach().clone() for k, v in extra.items()},
        }

    def load_full(state: dict[str, Any]) -> None:
        generator.load_state_dict(state["generator"])
        with torch.no_grad():
            for k, v in extra.items():
                v.copy_(state["extra"][k])

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
            "history": history,
            "best_state": best_state,
        }

    stopped = False
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not progress, leave=False)
    try:
        for step in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(step) * lr_scale
            opt.zero_grad(set_to_none=True)
            good = full_state()
            good_opt = copy.deepcopy(opt.state_dict())
            try:
                loss = loss_at(step)
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"Loss is {loss.item()} at step {step}.")
                loss.backward()
                grads = [p.grad for p in params]
                if not _all_finite(grads):
                    raise NonFiniteError(f"A gradient holds NaN/Inf at step {step}.")
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                if not _all_finite(params):
                    raise NonFiniteError(f"A parameter became NaN/Inf at step {step}.")
            except NonFiniteError as exc:
                load_full(good)
                opt.load_state_dict(good_opt)
                if path is not None:
                    _save_atomic(snapshot(step), path)
                raise NonFiniteError(
                    f"{exc} The generator was left at its state before step {step}"
                    + (f" (saved to {path})." if path is not None else ".")
                    + " Lower the learning rate, enable grad_clip, or check the data."
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
                    opt = make_adam(params, cfg)
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
    )


# -- phase 1 ------------------------------------------------------------------------------------
def tensor_normalisers(generator: AnyGenerator, target: torch.Tensor) -> torch.Tensor:
    """Per-weight factors that make the squared error a mean over tensors of relative MSEs.

    Tensor ``t`` contributes ``mean((w - w*)^2) / var(w*_t)`` with equal weight, so a 16-element
    BatchNorm scale counts as much as a 10^5-element conv kernel, and a near-constant tensor is
    judged against a floor of ``1e-4 * mean(w*_t^2)`` rather than its (near-zero) variance.
    """
    layout = generator.layout
    factors = torch.empty(layout.total, device=target.device)
    for s, scale in zip(layout.specs, tensor_scales(generator, target), strict=True):
        factors[s.offset : s.offset + s.numel] = scale
    return factors


def tensor_scales(generator: AnyGenerator, target: torch.Tensor) -> list[float]:
    """One factor per tensor (see :func:`tensor_normalisers`), without an M-sized vector."""
    layout = generator.layout
    out = []
    for s in layout.specs:
        part = target[s.offset : s.offset + s.numel].double()
        denom = max(float(part.var(unbiased=False)), 1e-4 * float((part**2).mean()), 1e-12)
        out.append(1.0 / (denom * s.numel * len(layout.specs)))
    return out


# Above this many weights, phase 1 recomputes each tensor in the backward pass instead of
# keeping its difference from the target: extra memory is then one tensor, not all of M.
STREAM_WEIGHTS = 1 << 24
STREAM_BLOCK = 1 << 22  # weights per recomputed block (16 MiB of float32)


def row_weight_loss(
    generator: RowGenerator, target: torch.Tensor, scales: Sequence[float]
) -> torch.Tensor:
    """Phase-1 loss of the rows scheme, tensor by tensor (same value as :func:`weight_loss`).

    Each tensor is generated from the shared features and compared with its slice of
    ``target`` (a view): no M-sized concatenation, factor vector or gradient is made. Above
    :data:`STREAM_WEIGHTS` weights each tensor's term is checkpointed, so at most one generated
    tensor is alive at a time (at the cost of generating it again in the backward pass).
    """
    h = generator.features()  # (S, rank)
    stream = generator.total >= STREAM_WEIGHTS
    loss = h.new_zeros(())
    for i, s in enumerate(generator.layout.specs):
        goal = generator._as_view(target[s.offset : s.offset + s.numel], i)  # (rows, cols) view
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
    generated: torch.Tensor, target: torch.Tensor, factors: torch.Tensor
) -> torch.Tensor:
    """Phase-1 loss: per-tensor normalised MSE averaged over tensors.

    See :func:`tensor_normalisers` for the normalisation.
    """
    return ((generated - target) ** 2 * factors).sum()


def relative_errors(generator: AnyGenerator, target: torch.Tensor) -> dict[str, float]:
    """``||w - w*|| / ||w*||`` overall (key ``"_total"``) and per tensor."""
    out: dict[str, float] = {}
    diff_sq = 0.0
    specs = {s.offset: s for s in generator.layout.specs}
    with torch.no_grad():
        # Block by block (one tensor per block for the rows scheme): no M-sized copy.
        for start, block in generator.iter_blocks():
            stop = start + block.shape[0]
            b = target[start:stop]
            block_sq = float(((block - b).double() ** 2).sum())
            diff_sq += block_sq
            s = specs.get(start)
            if s is not None and s.numel == block.shape[0]:
                out[s.name] = block_sq**0.5 / float(b.double().norm().clamp_min(1e-12))
        if len(out) != len(specs):  # blocks that do not line up with tensors (flat scheme)
            w = torch.cat([b for _, b in generator.iter_blocks()])
            for s in generator.layout.specs:
                a, b = w[s.offset : s.offset + s.numel], target[s.offset : s.offset + s.numel]
                out[s.name] = float((a - b).norm() / b.norm().clamp_min(1e-12))
        total = float(target.double().norm().clamp_min(1e-12))
    return {"_total": diff_sq**0.5 / total, **out}


def fit_weights(
    generator: AnyGenerator,
    target: torch.Tensor,
    cfg: LoopConfig,
    *,
    freeze_scale: bool = True,
    **loop_kwargs: Any,
) -> FitResult:
    """Phase 1: fit the generator so that it reproduces ``target`` (flat pretrained weights).

    Args:
        generator: Trained in place (flat scheme: call :meth:`QTGenerator.init_affine` first).
            A :class:`RowGenerator` ends with least-squares heads (:meth:`RowGenerator.fit_heads`),
            so every tensor's relative error is at most 1.
        target: ``(M,)`` pretrained weights.
        cfg: Loop settings.
        freeze_scale: Keep the per-tensor scales (the pretrained stds) fixed. When the
            generator is much smaller than M it cannot match a large tensor, and the MSE-optimal
            scale then shrinks that tensor towards its mean: the rebuilt model collapses to a
            constant output with dead ReLUs, from which fine-tuning may never recover.
            Frozen, the fit maximises each tensor's correlation with its target instead.
        **loop_kwargs: Passed to :func:`train_loop` (checkpointing, progress, ...).
    """
    if target.shape != (generator.total,):
        raise ConfigError(
            f"target must have shape ({generator.total},), got {tuple(target.shape)}."
        )
    if not all_finite(target):
        raise NonFiniteError("The pretrained weights hold NaN or Inf.")
    target = target.detach().to(torch.float32)
    desc = loop_kwargs.pop("desc", "fit_weights")
    if isinstance(generator, RowGenerator):
        scales = tensor_scales(generator, target)
        result = train_loop(
            generator,
            lambda _step: row_weight_loss(generator, target, scales),
            cfg,
            desc=desc,
            **loop_kwargs,
        )
        # The heads' least-squares optimum for the trained features: never worse than zeros.
        generator.fit_heads(target)
        return result
    factors = tensor_normalisers(generator, target)
    trainable = generator.scale.requires_grad
    if freeze_scale:
        generator.scale.requires_grad_(False)
    try:
        return train_loop(
            generator,
            lambda _step: weight_loss(generator.generate(), target, factors),
            cfg,
            desc=desc,
            **loop_kwargs,
        )
    finally:
        generator.scale.requires_grad_(trainable)


# -- phase 2 ------------------------------------------------------------------------------------
class FunctionalModel:
    """Runs a private copy of a model with generated weights via ``torch.func.functional_call``.

    The user's module is never touched: the copy is put in eval mode (dropout off) and its own
    parameters are frozen; generated tensors replace the targeted ones at call time, untargeted
    parameters come from the copy. The student (generated weights) has its own copy of the
    buffers (:attr:`buffers`), so that BatchNorm statistics re-estimated for the generated
    weights never leak into the teacher.

    Args:
        model: The pretrained model (copied).
        generator: Supplies the generated tensors.
    """

    def __init__(self, model: nn.Module, generator: AnyGenerator) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.generator = generator
        self.fixed: dict[str, torch.Tensor] = dict(
            self.module.named_parameters(remove_duplicate=False)
        )
        self.buffers: dict[str, torch.Tensor] = {
            n: b.detach().clone() for n, b in self.module.named_buffers()
        }
        self.norm_layers = [
            m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self.device = torch.device("cpu")

    def share_target(self, target: torch.Tensor, layout: Layout) -> None:
        """Back the private copy's generated parameters by views of the flat ``target``.

        The copy's tensors and the phase-1 target hold the same values; sharing them saves one
        copy of the generated weights (400 MB at 1e8). Both are read-only here: nothing writes
        to the private copy's parameters, and :meth:`qtcompress.api.QTModel.materialize` writes
        into a deep copy (which clones). Tensors that are not float32 keep their own storage.
        """
        named = dict(self.module.named_parameters(remove_duplicate=False))
        for s in layout.specs:
            params = [named[n] for n in s.names if n in named]
            if params and all(
                p.dtype == target.dtype and p.device == target.device for p in params
            ):
                view = target[s.offset : s.offset + s.numel].view(s.shape)
                for p in params:
                    p.data = view

    def to(self, device: torch.device) -> FunctionalModel:
        """Move the model copy, its buffers and the student's buffers to ``device``.

        The generator is moved by its owner (:meth:`qtcompress.api.QTModel.to`).
        """
        self.module.to(device)
        self.fixed = dict(self.module.named_parameters(remove_duplicate=False))
        self.buffers = {n: b.to(device) for n, b in self.buffers.items()}
        self.device = device
        return self

    def __call__(
        self,
        *args: Any,
        generated: Mapping[str, torch.Tensor] | None = None,
        batch_stats: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Forward pass with generated weights (generated now if not given).

        Args:
            *args: Model inputs.
            generated: Tensors by name; default ``generator.tensors(factored=True)`` (linear
                layers run on the low-rank factors, :mod:`qtcompress.lowrank`).
            batch_stats: Run BatchNorm layers in training mode: normalise with batch
                statistics and update the student's running statistics (:attr:`buffers`).
            **kwargs: Model keyword inputs.
        """
        tensors = self.generator.tensors(factored=True) if generated is None else generated
        if batch_stats:
            for m in self.norm_layers:
                m.train()
        try:
            return functional_call(
                self.module,
                {**self.fixed, **self.buffers, **tensors},
                args,
                kwargs,
                tie_weights=False,
                strict=False,
            )
        finally:
            for m in self.norm_layers:
                m.eval()

    @torch.no_grad()
    def recalibrate(self, inputs: torch.Tensor, batch_size: int = 256) -> None:
        """Re-estimate the student's BatchNorm running statistics on ``inputs``.

        The generator is not changed: this only makes the normalisation match the generated
        weights (exact cumulative averages over the batches, as with ``momentum=None``).
        """
        if not self.norm_layers:
            return
        tensors = self.generator.tensors(factored=True)
        momenta = [m.momentum for m in self.norm_layers]
        for m in self.norm_layers:
            m.momentum = None
        for name, b in self.buffers.items():
            if name.endswith("running_mean") or name.endswith("num_batches_tracked"):
                b.zero_()
            elif name.endswith("running_var"):
                b.fill_(1.0)
        try:
            for i in range(0, inputs.shape[0], batch_size):
                self(
                    inputs[i : i + batch_size].to(self.device), generated=tensors, batch_stats=True
                )
        finally:
            for m, momentum in zip(self.norm_layers, momenta, strict=True):
                m.momentum = momentum

    def teacher(self, *args: Any, **kwargs: Any) -> Any:
        """Forward pass of the original (pretrained) weights, without gradients."""
        with torch.no_grad():
            return self.module(*args, **kwargs)


def finetune(
    fmodel: FunctionalModel,
    data: Any,
    labels: torch.Tensor | None,
    cfg: LoopConfig,
    *,
    mode: str = "distill",
    batch_size: int = 64,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    distill: str | None = None,
    output: str | int | None = None,
    output_kind: str | None = None,
    temperature: float = 2.0,
    alpha: float = 1.0,
    batch_stats: bool = True,
    labels_in_items: bool | str = False,
    probe_size: int = 256,
    guard: bool = True,
    **loop_kwargs: Any,
) -> FitResult:
    """Phase 2: train the generator on a task through the model's own forward pass.

    Args:
        fmodel: The model + generator pair.
        data: Training inputs in any form :meth:`qtcompress.batches.InputSource.of` takes: a
            tensor, a tuple of tensors (positional), a dict (keyword), a ``Dataset``, a
            ``DataLoader`` or a re-iterable of batches.
        labels: Labels aligned with ``data`` (required for ``"supervised"`` unless the items
            carry them; optional for ``"distill"``, where they add ``(1 - alpha) * loss_fn``).
        cfg: Loop settings.
        mode: ``"supervised"`` or ``"distill"`` (teacher = the pretrained model).
        batch_size: Mini-batch size.
        loss_fn: Supervised loss ``(outputs, labels)``; default cross-entropy.
        distill: ``"kl"``, ``"bce"``, ``"cosine"`` or ``"mse"``; ``None`` picks the one for the
            output kind (:data:`qtcompress.fidelity.DEFAULT_LOSS`).
        output: Which output to train on when the model returns several
            (:func:`qtcompress.batches.select_output`; default: the first tensor, or
            ``logits`` / ``last_hidden_state``).
        output_kind: ``"logits"``, ``"probability"``, ``"embedding"`` or ``"regression"``;
            ``None`` infers it from the teacher's outputs.
        temperature: KL temperature.
        alpha: Weight of the distillation term when labels are also given.
        batch_stats: Train with BatchNorm in batch-statistics mode, updating the student's
            running statistics (the way the pretrained model was trained).
        labels_in_items: Where labels sit inside dataset items (see :mod:`qtcompress.batches`).
        probe_size: Examples in a fixed probe batch (the first of ``data``). Its distillation
            loss is the monitored value that picks the best state, and a student whose probe
            outputs turn constant triggers the collapse guard.
        guard: On a collapse (outputs turning constant after they varied), restore the best
            state, halve the learning rate and go on (at most ``MAX_RESTARTS`` times).
        **loop_kwargs: Passed to :func:`train_loop`.
    """
    if mode not in ("supervised", "distill"):
        raise ConfigError(f"Unknown mode {mode!r}; choose 'supervised' or 'distill'.")
    if batch_size < 1 or not 0.0 <= alpha <= 1.0:
        raise ConfigError(
            f"batch_size must be >= 1 and alpha in [0, 1] (got {batch_size}, {alpha})."
        )
    source = InputSource.of(data, labels, labels_in_items=labels_in_items)
    device = fmodel.device
    probe = source.head(probe_size).to(device)
    check_call(fmodel.module, probe)
    teacher_probe = select_output(probe.call(fmodel.teacher), output)
    kind = check_kind(output_kind or infer_output_kind(teacher_probe))
    objective = distill or DEFAULT_LOSS[kind]
    distill_loss(teacher_probe, teacher_probe, objective, temperature)  # validates early
    if mode == "supervised" and probe.labels is None:
        raise ConfigError("Supervised fine-tuning needs labels; use mode='distill' without.")
    sup = loss_fn or F.cross_entropy

    def student(batch: Batch, stats: bool) -> torch.Tensor:
        return select_output(batch.call(partial(fmodel, batch_stats=stats)), output)

    def loss_at(step: int) -> torch.Tensor:
        batch = source.batch_at(step, batch_size, cfg.seed).to(device)
        out = student(batch, batch_stats)
        if mode == "supervised":
            return sup(out, batch.labels)  # type: ignore[arg-type]
        teacher = select_output(batch.call(fmodel.teacher), output)
        loss = distill_loss(out, teacher, objective, temperature)
        if batch.labels is not None and alpha < 1.0:
            loss = alpha * loss + (1.0 - alpha) * sup(out, batch.labels)
        return loss

    last: dict[str, torch.Tensor] = {}  # the monitor's probe outputs, reused by the guard

    def monitor() -> float:
        with torch.no_grad():
            last["out"] = student(probe, False)
        return float(distill_loss(last["out"], teacher_probe, objective, temperature))

    alive = [False]  # a collapse is alive -> constant; a student that starts dead is not one

    def collapsed() -> bool:  # train_loop calls it right after monitor()
        dead = measure_fidelity(last["out"], teacher_probe, kind).degenerate
        alive[0] = alive[0] or not dead
        return dead and alive[0]

    return train_loop(
        fmodel.generator,
        loss_at,
        cfg,
        desc=loop_kwargs.pop("desc", mode),
        extra_state=fmodel.buffers,
        monitor=monitor,
        guard=collapsed if guard else None,
        **loop_kwargs,
    )


@torch.no_grad()
def evaluate_fidelity(
    fmodel: FunctionalModel,
    data: Any,
    labels: torch.Tensor | None = None,
    *,
    output: str | int | None = None,
    output_kind: str | None = None,
    batch_size: int = 256,
    labels_in_items: bool | str = False,
) -> Fidelity:
    """Fidelity of ``fmodel``'s generated network to its original on ``data``.

    Weights are generated once; teacher and student run batch by batch in eval mode.

    Args:
        fmodel: The model + generator pair (any module with ``tensors()`` as generator).
        data: Inputs in any form :meth:`qtcompress.batches.InputSource.of` takes.
        labels: Optional labels (adds accuracy).
        output: Which output to compare (see :func:`qtcompress.batches.select_output`).
        output_kind: Output kind; ``None`` infers it from the teacher's outputs.
        batch_size: Examples per forward pass.
        labels_in_items: Where labels sit inside dataset items.
    """
    source = InputSource.of(data, labels, labels_in_items=labels_in_items)
    generated = fmodel.generator.tensors(factored=True)
    students, teachers, golds = [], [], []
    for batch in source.batches(batch_size):
        batch = batch.to(fmodel.device)
        # Metrics on the CPU: one small copy per batch, and the same arithmetic on any device.
        students.append(
            select_output(batch.call(partial(fmodel, generated=generated)), output).cpu()
        )
        teachers.append(select_output(batch.call(fmodel.teacher), output).cpu())
        if batch.labels is not None:
            golds.append(batch.labels.cpu())
    teacher = torch.cat(teachers)
    kind = output_kind or infer_output_kind(teacher)
    return measure_fidelity(torch.cat(students), teacher, kind, torch.cat(golds) if golds else None)
