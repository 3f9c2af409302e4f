"""Phase 2: fine-tune the generator on the task, and measure the student against the teacher."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from qtcompress.data.batch import Batch, batch_indices
from qtcompress.data.model_call import select_output
from qtcompress.data.sources import InputSource
from qtcompress.errors import ConfigError
from qtcompress.train.functional import FunctionalModel
from qtcompress.train.loop import FitResult, LoopConfig, train_loop
from qtcompress.train.lr_probe import probe_learning_rate
from qtcompress.train.objectives import (
    Fidelity,
    check_kind,
    default_distill_loss,
    distill_loss,
    infer_output_kind,
    kind_monitor,
    measure_fidelity,
)
from qtcompress.train.streams import (
    Rollouts,
    free_running_states,
    rollout_outputs,
    state_loss,
)

# The teacher's outputs on in-memory training data are computed once, before the loop, when
# they take at most this much memory (and a quarter of what is available): the original's
# forward pass was a quarter of a distillation step (docs/benchmarks.md).
TEACHER_CACHE_BYTES = 1 << 30


@torch.no_grad()
def teacher_outputs(
    fmodel: FunctionalModel,
    source: InputSource,
    output: str | int | None,
    progress: bool,
    batch_size: int = 256,
) -> torch.Tensor | None:
    """The teacher's outputs on every row of in-memory ``source`` (on the CPU), or ``None``.

    ``None`` where they cannot be reused: data not held in memory (a dataset may augment, a
    loader shuffles), a model in training mode (dropout, batch statistics: its outputs depend
    on the draw), or outputs over :data:`TEACHER_CACHE_BYTES`.
    """
    from tqdm.auto import tqdm

    from qtcompress.memory import available_memory_bytes

    if not source.in_memory or source.n is None:
        return None
    if any(m.training for m in fmodel.module.modules()):
        return None
    device = fmodel.device
    first = select_output(source.head(1).to(device).call(fmodel.teacher), output)
    if not isinstance(first, torch.Tensor):
        return None
    need = first[0].numel() * first.element_size() * source.n
    if need > min(TEACHER_CACHE_BYTES, available_memory_bytes() // 4):
        return None
    parts = []
    total = math.ceil(source.n / batch_size)
    batches = tqdm(
        source.batches(batch_size),
        total=total,
        desc="teacher outputs",
        leave=False,
        disable=not progress,
    )
    for batch in batches:
        parts.append(select_output(batch.to(device).call(fmodel.teacher), output).cpu())
    return torch.cat(parts)


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
    rollouts: Rollouts | None = None,
    lr_probe: tuple[float, ...] = (),
    **loop_kwargs: Any,
) -> FitResult:
    """Phase 2: train the generator on a task through the model's own forward pass.

    Args:
        fmodel: The model + generator pair.
        data: Training inputs in any form :meth:`qtcompress.data.sources.InputSource.of` takes: a
            tensor, a tuple of tensors (positional), a dict (keyword), a ``Dataset``, a
            ``DataLoader`` or a re-iterable of batches.
        labels: Labels aligned with ``data`` (required for ``"supervised"`` unless the items
            carry them; optional for ``"distill"``, where they add ``(1 - alpha) * loss_fn``).
        cfg: Loop settings.
        mode: ``"supervised"`` or ``"distill"`` (teacher = the pretrained model).
        batch_size: Mini-batch size.
        loss_fn: Supervised loss ``(outputs, labels)``; default cross-entropy.
        distill: ``"kl"``, ``"bce"``, ``"cosine"`` or ``"mse"``; ``None`` picks the one for the
            output kind (:func:`qtcompress.train.objectives.default_distill_loss`).
        output: Which output to train on when the model returns several
            (:func:`qtcompress.data.model_call.select_output`; default: the first tensor, or
            ``logits`` / ``last_hidden_state``).
        output_kind: ``"logits"``, ``"probability"``, ``"embedding"`` or ``"regression"``;
            ``None`` infers it from the teacher's outputs.
        temperature: KL temperature.
        alpha: Weight of the distillation term when labels are also given.
        batch_stats: Train with BatchNorm in batch-statistics mode, updating the student's
            running statistics (the way the pretrained model was trained).
        labels_in_items: Where labels sit inside dataset items (see :mod:`qtcompress.data`).
        probe_size: Examples in a fixed probe batch (the first of ``data``; with ``rollouts``,
            rollouts from starts spread over the training streams, ``probe_size`` chunks in
            all, each on the student's own state). Its distillation loss is the monitored value
            that picks the best state, and a student whose probe outputs turn constant triggers
            the collapse guard.
        guard: On a collapse (outputs turning constant after they varied), restore the best
            state, halve the learning rate and go on (at most ``MAX_RESTARTS`` times).
        rollouts: A stateful model's training streams: distil over rollouts of consecutive
            chunks on the student's own state (:class:`~qtcompress.train.streams.Rollouts`)
            instead of single teacher-forced chunks. Needs in-memory data.
        lr_probe: Multiples of ``cfg.lr`` to try in short trial fits before the run
            (:func:`~qtcompress.train.lr_probe.probe_learning_rate`); the best peak rate is
            the run's (the trials are deterministic, so a resumed run picks the same). Empty:
            ``cfg.lr`` as given; one multiple: that rate, no trials.
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
    fmodel.check(probe)
    teacher_probe = select_output(probe.call(fmodel.teacher), output)
    kind = check_kind(output_kind or infer_output_kind(teacher_probe))
    objective = distill or default_distill_loss(kind)
    distill_loss(teacher_probe, teacher_probe, objective, temperature)  # validates early
    if mode == "supervised" and probe.labels is None:
        raise ConfigError("Supervised fine-tuning needs labels; use mode='distill' without.")
    sup = loss_fn or F.cross_entropy

    def student(batch: Batch, stats: bool) -> torch.Tensor:
        return select_output(batch.call(partial(fmodel, batch_stats=stats)), output)

    def probe_outputs() -> torch.Tensor:  # the student on the probe, no gradient
        return student(probe, False)

    if rollouts is not None:
        if mode != "distill" or source.n is None:
            raise ConfigError("Rollouts distil from in-memory data only (mode 'distill').")
        everything = source.head(source.n).to(device)
        starts = rollouts.starts()
        # The probe is rollouts too, spread over the training streams: single chunks on the
        # original's state picked step 20 of 1,500 as the best state of a streaming model whose
        # rollouts kept improving, and never saw it go constant on its own state.
        k = max(1, min(len(starts), probe_size // rollouts.steps()))
        probe_rows = starts[torch.linspace(0, len(starts) - 1, k).round().long()].to(device)
        with torch.no_grad():
            teacher_probe = torch.cat(
                rollout_outputs(fmodel.teacher, everything, probe_rows, rollouts, output)
            )

        def probe_outputs() -> torch.Tensor:
            call = partial(fmodel, batch_stats=False)
            return torch.cat(rollout_outputs(call, everything, probe_rows, rollouts, output))

    cached = (
        teacher_outputs(fmodel, source, output, bool(loop_kwargs.get("progress", True)))
        if mode == "distill" and rollouts is None
        else None
    )

    own: dict[str, Any] = {}  # the student's free-running states, and the step they are from

    def own_starts(step: int, rows: torch.Tensor) -> torch.Tensor | None:
        """Start states of a rollout batch: a share from the student's own free run."""
        assert rollouts is not None
        if rollouts.own_share <= 0:
            return None
        if "states" not in own or step - own["at"] >= rollouts.own_every:
            with torch.no_grad():
                call = partial(fmodel, generated=fmodel.generator.generate_named(factored=True))
                own["states"] = free_running_states(
                    call, everything, rollouts.streams, rollouts.link
                )
            own["at"] = step
        recorded = everything.args[rollouts.link.input].index_select(0, rows)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        mine = (torch.rand(len(rows), generator=gen) < rollouts.own_share).to(device)
        mask = mine.view(-1, *([1] * (recorded.dim() - 1)))
        return torch.where(mask, own["states"].index_select(0, rows), recorded)

    def loss_at(step: int) -> torch.Tensor:
        if rollouts is not None:  # a rollout on the student's own state per sampled start
            rows = starts[batch_indices(step, len(starts), batch_size, cfg.seed)].to(device)
            start = own_starts(step, rows)
            keep = rollouts.state_weight > 0
            goal_states: list[Any] | None = [] if keep else None
            own_states: list[Any] | None = [] if keep else None
            with torch.no_grad():
                goal = rollout_outputs(
                    fmodel.teacher, everything, rows, rollouts, output, goal_states
                )
            outs = rollout_outputs(
                partial(fmodel, batch_stats=batch_stats),
                everything,
                rows,
                rollouts,
                output,
                own_states,
                start,
            )
            total = [
                distill_loss(o, g, objective, temperature) for o, g in zip(outs, goal, strict=True)
            ]
            loss = torch.stack(total).mean()
            if own_states is not None and goal_states is not None:
                loss = loss + rollouts.state_weight * state_loss(own_states, goal_states)
            return loss
        batch = source.batch_at(step, batch_size, cfg.seed).to(device)
        out = student(batch, batch_stats)
        if mode == "supervised":
            return sup(out, batch.labels)  # type: ignore[arg-type]
        if cached is not None:  # the rows batch_at drew, as in-memory sources draw them
            assert source.n is not None
            teacher = cached[batch_indices(step, source.n, batch_size, cfg.seed)].to(device)
        else:
            teacher = select_output(batch.call(fmodel.teacher), output)
        loss = distill_loss(out, teacher, objective, temperature)
        if batch.labels is not None and alpha < 1.0:
            loss = alpha * loss + (1.0 - alpha) * sup(out, batch.labels)
        return loss

    last: dict[str, torch.Tensor] = {}  # the monitor's probe outputs, reused by the guard

    own_monitor = kind_monitor(kind)

    def monitor() -> float:
        with torch.no_grad():
            last["out"] = probe_outputs()
        loss = float(distill_loss(last["out"], teacher_probe, objective, temperature))
        if own_monitor is None:
            return loss
        # The kind's own measure first; the loss (scaled far below its resolution) breaks ties.
        return own_monitor(last["out"], teacher_probe) + 1e-6 * min(loss, 100.0)

    alive = [False]  # a collapse is alive -> constant; a student that starts dead is not one

    def collapsed() -> bool:  # train_loop calls it right after monitor()
        dead = measure_fidelity(last["out"], teacher_probe, kind).degenerate
        alive[0] = alive[0] or not dead
        return dead and alive[0]

    def describe_step(step: int) -> str:  # names the data of a skipped step
        if not source.exact_resume or source.n is None:
            return ""  # a loader's batches: which one a step drew is not recorded
        epoch, j = divmod(step, math.ceil(source.n / batch_size))
        rows = sorted(batch_indices(step, source.n, batch_size, cfg.seed).tolist())
        more = f" and {len(rows) - 8} more" if len(rows) > 8 else ""
        shown = ", ".join(map(str, rows[:8]))
        return f" (batch {j} of epoch {epoch}: examples {shown}{more})"

    tried: list[tuple[float, float]] = []
    if lr_probe:
        chosen = probe_learning_rate(
            fmodel.generator,
            loss_at,
            cfg,
            monitor,
            factors=lr_probe,
            extra_state=fmodel.buffers,
            reset=own.clear,
        )
        cfg, tried = replace(cfg, lr=chosen.lr), chosen.tried
    result = train_loop(
        fmodel.generator,
        loss_at,
        cfg,
        desc=loop_kwargs.pop("desc", mode),
        extra_state=fmodel.buffers,
        monitor=monitor,
        guard=collapsed if guard else None,
        describe_step=describe_step,
        **loop_kwargs,
    )
    result.lr_tried = tried
    return result


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
        data: Inputs in any form :meth:`qtcompress.data.sources.InputSource.of` takes.
        labels: Optional labels (adds accuracy).
        output: Which output to compare (see :func:`qtcompress.data.model_call.select_output`).
        output_kind: Output kind; ``None`` infers it from the teacher's outputs.
        batch_size: Examples per forward pass.
        labels_in_items: Where labels sit inside dataset items.
    """
    source = InputSource.of(data, labels, labels_in_items=labels_in_items)
    generated = fmodel.generator.generate_named(factored=True)
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
