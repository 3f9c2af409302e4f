"""The whole job: compress a model, fine-tune it, export and verify it, and summarise the run.

Used by ``qtcompress compress`` and ``qtcompress demo``; callable from Python as
:func:`run_pipeline`. Every output is written atomically into one folder:

* ``<name>.qtc.safetensors`` — the generator file (regenerates the whole network);
* ``<name>.onnx`` — the reconstructed classical network, checked with onnxruntime;
* ``summary.json`` — the numbers of the summary table;
* ``report/`` — plots and a Markdown page, when asked for (needs matplotlib).

The measured result (:class:`~qtcompress.summary.PipelineResult`) and its table live in
``summary.py``; user data sets are read by
:func:`qtcompress.io.arrays.load_npz_split`. This module stays one job read top to bottom
(settings, :func:`run_pipeline`, its ``_finish``), which is why it runs past 400 lines.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtcompress.api import QTModel, compress
from qtcompress.config import QTConfig
from qtcompress.constants import BATCH_SIZE, FIT_LR, FIT_STEPS, ROLLOUT
from qtcompress.data.layout import BatchLayout
from qtcompress.data.model_call import (
    check_call,
    positional_inputs,
    select_output,
)
from qtcompress.data.sources import InputSource
from qtcompress.errors import ConfigError
from qtcompress.examples import Split
from qtcompress.generator_file.storage import check_storage
from qtcompress.io.arrays import check_label_range
from qtcompress.io.atomic import OutputRecord, check_writable_dir
from qtcompress.onnx.export import dynamic_shapes
from qtcompress.summary import PipelineResult, shape_of, summary_rows
from qtcompress.targets import kinds_summary, select_targets
from qtcompress.train.objectives import (
    Fidelity,
    check_distill_loss,
    check_kind,
    infer_output_kind,
)
from qtcompress.train.options import FinetuneOptions, FitOptions, default_finetune_steps
from qtcompress.train.streams import (
    Rollouts,
    StateLink,
    detect_state_link,
    free_running_fidelity,
    parse_state_link,
    split_streams,
)


@dataclass(frozen=True)
class PipelineSettings:
    """How long and how hard to train, and what to write.

    Attributes:
        fit_steps: Phase-1 steps (reproduce the pretrained weights); 0 skips phase 1.
        fit_lr: Phase-1 peak learning rate.
        finetune_steps: Phase-2 steps (one mini-batch each); 0 skips phase 2; ``None``: 1,500,
            3,000 for a stateful model distilled over its training streams
            (:func:`~qtcompress.train.options.default_finetune_steps`).
        finetune_lr: Phase-2 peak learning rate; ``None``: the scheme's default for the model
            (3e-3 for the rows and flat schemes; 1e-2 for the hashed scheme, 3e-3 where the
            model carries its state: :meth:`QTModel.default_finetune_lr`).
        mode: ``"distill"`` (teacher = the original model) or ``"supervised"`` (labels).
        batch_size: Phase-2 mini-batch size.
        distill: Distillation loss (``kl``, ``bce``, ``cosine``, ``mse``); ``None``: the one for
            the output kind.
        output: Which model output to distil and compare (index or name) when it has several.
        output_kind: A registered output kind (``logits``, ``probability``, ``embedding``,
            ``regression``, ``ctc``; :func:`~qtcompress.train.objectives.register_output_kind`);
            ``None``: inferred from the original model's outputs.
        min_fidelity: Fine-tuned fidelity (agreement, cosine or correlation, by kind) below
            which the run counts as failed (``fidelity_ok`` False; the CLI exits 1).
        dynamic_axes: ONNX axes beyond the batch that stay symbolic, by input name (the
            names of ``forward``'s parameters): ``{"input_ids": {1: "seq"}}``.
        device: Where the mapping, the model and the loss train (``"cuda"``...); the QNN
            stays on the CPU simulator, and export and latency run on the CPU.
        progress: Show progress bars.
        report: Also write plots and a Markdown report (needs matplotlib).
        latency_repeats: Timed runs per latency figure (fewer, at least 3, once the figure's
            runs have taken ``LATENCY_BUDGET_S``).
        storage: How the generator file stores the generator's parameters: ``"auto"`` (the
            smallest of int8, float16, float32 whose rounded generator keeps the fine-tuned
            fidelity within :data:`STORAGE_TOLERANCE`), or one of them.
        state: A stateful model's link, ``"IN=OUT"`` (positional input ``IN`` is fed from
            output ``OUT``); ``None``: the obvious ``(x, state) -> (y, state)`` is detected and
            named in the log; ``"none"``: not stateful.
        rollout: Chunks per distillation rollout of a stateful model with training streams
            (``stream_train``), in the budget search too.
        search: With ``min_fidelity`` and no size in the config (budget, rank, ranks, scheme
            all default), search the budget for the smallest generator that reaches it
            (:func:`search_budget`); ``False``: ``min_fidelity`` is only a check.
        time_limit: Seconds the budget search may take before it keeps its best point.
        batch_dims: Inputs and outputs whose batch is not dimension 0, by name: ``{"1": 1}``
            for ``forward(x, state)`` with a state ``(layers, batch, hidden)`` (positional
            inputs by index, keyword inputs by name, outputs as ``"output.K"``; a fed-back
            state output takes its input's). The data are given and the ONNX graph takes its
            inputs in this layout (:mod:`qtcompress.data.layout`).
    """

    fit_steps: int = FIT_STEPS
    fit_lr: float = FIT_LR
    finetune_steps: int | None = None
    finetune_lr: float | None = None
    mode: str = "distill"
    batch_size: int = BATCH_SIZE
    distill: str | None = None
    output: str | int | None = None
    output_kind: str | None = None
    min_fidelity: float | None = None
    dynamic_axes: dict[str, dict[int, str]] | None = None
    device: str | None = None
    progress: bool = False
    report: bool = False
    latency_repeats: int = 50
    storage: str = "auto"
    state: str | None = None
    rollout: int = ROLLOUT
    search: bool = True
    time_limit: float = 1800.0
    batch_dims: dict[str, int] | None = None

    def phase2_steps(self, rollouts: bool) -> tuple[int, str]:
        """Phase 2's step count and why: as given, or the default for the run."""
        if self.finetune_steps is not None:
            return self.finetune_steps, "given"
        return default_finetune_steps(rollouts)

    def __post_init__(self) -> None:
        from qtcompress import limits
        from qtcompress.device import resolve_device

        resolve_device(self.device)  # an unusable device fails before anything is loaded
        limits.check_count(self.fit_steps, "--fit-steps", maximum=limits.MAX_STEPS)
        if self.finetune_steps is not None:
            limits.check_count(self.finetune_steps, "--finetune-steps", maximum=limits.MAX_STEPS)
        limits.check_count(self.batch_size, "--batch-size", maximum=limits.MAX_STEPS, minimum=1)
        limits.check_count(self.rollout, "--rollout", maximum=limits.MAX_STEPS, minimum=1)
        limits.check_count(self.latency_repeats, "latency_repeats", maximum=10_000, minimum=1)
        for name in ("fit_lr", "finetune_lr"):
            value = getattr(self, name)
            if value is None and name == "finetune_lr":
                continue
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ConfigError(
                    f"{name} must be a positive number, got {value!r}; pass "
                    f"--{name.replace('_', '-')} > 0."
                )
        if self.storage != "auto":
            check_storage(self.storage)
        if self.mode not in ("distill", "supervised"):
            raise ConfigError(f"Unknown mode {self.mode!r}; choose 'distill' or 'supervised'.")
        if self.distill is not None:  # the registered losses (train/objectives.py)
            check_distill_loss(self.distill)
        if self.output_kind is not None:  # the registered output kinds (the same module)
            check_kind(self.output_kind)
        BatchLayout.of(self.batch_dims)  # bad names or dimensions fail before loading


# The most a rounded generator may lose of the fine-tuned headline fidelity (agreement,
# cosine or correlation) for its storage to be chosen by "auto".
STORAGE_TOLERANCE = 0.005


def choose_storage(
    qt: QTModel,
    evaluate: Callable[[], Fidelity],
    fidelity: Fidelity,
    storage: str,
    log: Callable[[str], None],
) -> tuple[str, Fidelity]:
    """Round the generator to the storage its file will use.

    ``"auto"`` tries int8, then float16, and keeps the first whose regenerated network keeps the
    headline fidelity within :data:`STORAGE_TOLERANCE` of float32's on the held-out inputs (the
    same inputs the summary reports: a check of three candidates, not a search); otherwise the
    generator stays float32. A named storage is applied as asked.

    Returns:
        A note for the summary, and the fidelity of the generator as it will be shipped.
    """
    if storage != "auto":
        if storage == "float32":
            return "as asked", fidelity
        qt.round_to(storage)
        return "as asked", evaluate()
    snapshot = {k: v.clone() for k, v in qt.generator.state_dict().items()}
    for candidate in ("int8", "float16"):
        qt.round_to(candidate)
        after = evaluate()
        if not after.degenerate and after.headline >= fidelity.headline - STORAGE_TOLERANCE:
            log(f"storage: {candidate} ({after.describe()})")
            return f"{fidelity.headline_name} {fidelity.headline:.4f} before rounding", after
        qt.generator.load_state_dict(snapshot)
        qt.storage = "float32"
    note = f"int8 and float16 lost more than {STORAGE_TOLERANCE} {fidelity.headline_name}"
    log(f"storage: float32 ({note})")
    return note, fidelity


# Seconds of timed runs after which a latency figure stops repeating (at least 3 runs).
LATENCY_BUDGET_S = 2.0


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times: list[float] = []
    # Fewer runs once the figure has taken LATENCY_BUDGET_S: 50 runs of a 22.7M BERT at batch
    # 64 were half a minute of an otherwise finished command.
    while len(times) < repeats and (len(times) < 3 or sum(times) < LATENCY_BUDGET_S):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _latencies(
    model: nn.Module, onnx_path: Path, test: InputSource, repeats: int, layout: BatchLayout
) -> tuple[dict[str, float], dict[str, float]]:
    from qtcompress.onnx.runtime import OnnxPredictor

    predictor = OnnxPredictor(onnx_path)
    torch_ms, onnx_ms = {}, {}
    big = test.head(64)
    for label, batch in (("batch 1", test.head(1)), (f"batch {len(big)}", big)):
        args, _ = positional_inputs(model, layout.batch_to_model(batch))
        feeds = {n: a.numpy() for n, a in zip(predictor.input_names, args, strict=True)}
        with torch.no_grad():
            torch_ms[label] = _median_ms(partial(model, *args), repeats)
        onnx_ms[label] = _median_ms(partial(predictor.run, feeds), repeats)
    return torch_ms, onnx_ms


def state_link(
    model: nn.Module,
    data: InputSource,
    given: str | None,
    log: Callable[[str], None],
    layout: BatchLayout | None = None,
) -> StateLink | None:
    """The model's state link: as given (``"IN=OUT"``, ``"none"``), else the obvious one.

    ``data`` are batch-first; the obvious link is looked for in the model's own ``layout``,
    where a state output has its input's shape.
    """
    if given == "none":
        return None
    if given is not None:
        return parse_state_link(given)
    link = detect_state_link(model, (layout or BatchLayout()).batch_to_model(data.head(2)))
    if link is not None:
        log(
            f"stateful model assumed: {link.describe()} (same shape); --state IN=OUT to say "
            "otherwise, --state none if it is not"
        )
    return link


@dataclass
class Trained:
    """One generator compressed, fitted, fine-tuned and rounded to its storage."""

    qt: QTModel
    rep: Any
    budget: str
    fid1: Fidelity
    fid2: Fidelity
    phase1_error: float
    histories: dict[str, list[float]]
    fit_s: float
    finetune_s: float
    skipped_steps: int
    storage_note: str
    unspent: str = ""  # the budget the generator could not use, said in the summary
    lr: float | None = None  # phase 2's peak rate (None: no phase 2)
    lr_reason: str = ""
    steps: int = 0  # phase 2's step count (0: no phase 2)
    steps_reason: str = ""


def train_generator(
    model: nn.Module,
    config: QTConfig,
    train: InputSource,
    held_out: InputSource,
    settings: PipelineSettings,
    log: Callable[[str], None],
    rollouts: Rollouts | None = None,
    stateful: bool = False,
) -> Trained:
    """Compress, phase 1, phase 2 and storage rounding, measured on ``held_out``.

    With ``rollouts`` (a stateful model's training streams) phase 2 distils over rollouts on
    the student's own state. ``stateful`` (the model carries its state: a state link, with or
    without rollouts) picks the scheme's rate for such models when no rate is given.
    """
    qt: QTModel = compress(model, config, device=settings.device)
    qt.functional.layout = BatchLayout.of(settings.batch_dims)
    rep = qt.report()
    budget = (
        f"{qt.config.budget_params(rep.generated_weights):,} parameters"
        if qt.generator.sized_by_budget and qt.config.rank is None
        else "n/a"
    )
    log(
        f"compressing {rep.generated_weights:,} weights with {rep.trainable:,} generator "
        f"parameters ({rep.n_qubits} qubits x {rep.n_layers} layers, {shape_of(qt)})"
    )
    unspent = ""
    if budget != "n/a":
        allowed = qt.config.budget_params(rep.generated_weights)
        if rep.trainable < allowed // 2:
            # The QNN's size is capped (qubits, layers, work per step): past it a budget buys
            # nothing more, which a user asking for "5% of M" must be told.
            unspent = (
                f"the generator uses {rep.trainable:,} of the {allowed:,} parameters its budget "
                f"allows ({rep.trainable / rep.generated_weights:.2%} of M): its largest for "
                "this model; a larger budget buys nothing more here"
            )
            log(f"note: {unspent}")

    def evaluate() -> Fidelity:
        return qt.evaluate(held_out, output=settings.output, output_kind=settings.output_kind)

    histories: dict[str, list[float]] = {}
    fit_s = finetune_s = 0.0
    skipped = 0
    if settings.fit_steps > 0:
        r1 = qt.fit_weights(
            FitOptions(steps=settings.fit_steps, lr=settings.fit_lr, progress=settings.progress)
        )
        fit_s, histories["phase 1: reproduce weights"] = r1.elapsed_s, r1.history
    phase1_error = qt.weight_errors()["_total"]
    fid1 = evaluate()
    log(f"phase 1: relative weight error {phase1_error:.3f}; {fid1.describe()}")
    lr, lr_reason = settings.finetune_lr, "given"
    steps, steps_reason = settings.phase2_steps(rollouts is not None)
    if steps > 0:
        if settings.finetune_steps is None:
            log(f"phase 2 steps {steps:,}: {steps_reason}")
        if lr is None:
            lr, lr_reason = qt.default_finetune_lr(stateful or rollouts is not None)
            log(f"phase 2 learning rate {lr:g}: {lr_reason}")
        r2 = qt.finetune(
            train,
            None,
            FinetuneOptions(
                mode=settings.mode,
                steps=steps,
                lr=lr,
                batch_size=settings.batch_size,
                distill=settings.distill,
                output=settings.output,
                output_kind=fid1.kind,
                progress=settings.progress,
            ),
            rollouts=rollouts,
        )
        finetune_s, histories[f"phase 2: fine-tune ({settings.mode})"] = r2.elapsed_s, r2.history
        skipped = r2.skipped_steps
    fid2 = evaluate()
    log(f"phase 2: {fid2.describe()}")
    # fid2 becomes the shipped (rounded) generator's fidelity, measured once.
    storage_note, fid2 = choose_storage(qt, evaluate, fid2, settings.storage, log)
    return Trained(
        qt,
        rep,
        budget,
        fid1,
        fid2,
        phase1_error,
        histories,
        fit_s,
        finetune_s,
        skipped,
        storage_note,
        unspent,
        lr if steps > 0 else None,
        lr_reason,
        steps,
        steps_reason,
    )


# Budgets the search tries, smallest first (hashed scheme; see docs/benchmarks.md, frontier).
SEARCH_BUDGETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05)
# Share of the training examples held out to select the budget on (never reported on).
VALIDATION_SHARE = 0.15


def searching(config: QTConfig, settings: PipelineSettings) -> bool:
    """Whether the run searches the budget: ``--min-fidelity`` without any size given."""
    sized = (config.budget, config.rank, config.ranks, config.scheme) != (
        None,
        None,
        None,
        QTConfig().scheme,
    )
    return settings.min_fidelity is not None and settings.search and not sized


def search_budget(
    model: nn.Module,
    config: QTConfig,
    train: InputSource,
    settings: PipelineSettings,
    log: Callable[[str], None],
    rollouts: Rollouts | None = None,
    stateful: bool = False,
) -> tuple[Trained, list[dict[str, Any]]]:
    """The smallest hashed generator whose fidelity on a validation split reaches the target.

    Hashed generators of :data:`SEARCH_BUDGETS` of M, then the default generator of
    ``config``, are tried smallest first, each trained on the training
    examples less a seeded :data:`VALIDATION_SHARE` and measured on that share; the first that
    reaches ``settings.min_fidelity`` there is kept. The held-out test split is never looked
    at here (the caller reports on it). Past ``settings.time_limit`` seconds, or when no budget
    reaches the target, the point with the best validation fidelity is kept (the caller then
    reports the shortfall and exits 1).

    With ``rollouts`` (a stateful model's training streams) the split keeps streams whole
    (:func:`~qtcompress.train.streams.split_streams`), each point distils over rollouts on the
    student's own state, and a point is judged free-running over the validation streams, as
    the caller's final check judges the held-out streams.

    Returns:
        The kept run and one record per point tried (budget, parameters, validation fidelity,
        storage, seconds), for ``summary.json``.
    """
    assert settings.min_fidelity is not None
    fit_rollouts: Rollouts | None = None
    if rollouts is not None:
        fit_rows, val_rows = split_streams(rollouts.streams, VALIDATION_SHARE, config.seed)
        fit_part, validation = train.rows(fit_rows), train.rows(val_rows)
        fit_rollouts = replace(rollouts, streams=rollouts.streams[fit_rows])
        val_streams = rollouts.streams[val_rows]
        what = f"{int(val_streams.unique().numel())} training streams, free-running"
    else:
        fit_part, validation = train.split(VALIDATION_SHARE, config.seed)
        what = f"{VALIDATION_SHARE:.0%} of the training examples"
    log(
        f"searching the smallest generator with fidelity >= {settings.min_fidelity} on a "
        f"validation split ({what}, seed {config.seed}); time limit "
        f"{settings.time_limit:.0f} s"
    )
    start = time.perf_counter()
    points: list[dict[str, Any]] = []
    best: tuple[Trained, Fidelity] | None = None
    # The hashed budgets, then the default generator (small models: its floor of 1,024).
    candidates = [replace(config, scheme="hashed", budget=b) for b in SEARCH_BUDGETS] + [config]
    layout = select_targets(
        model, config.target, config.exclude, include_frozen=config.include_frozen
    )
    seen: set[tuple[Any, ...]] = set()
    for candidate in candidates:
        t0 = time.perf_counter()
        budget = candidate.budget
        try:
            resolved = candidate.resolve(layout)
        except ConfigError as exc:  # below this model's smallest hashed generator
            log(f"budget {budget}: skipped ({exc})")
            continue
        # The QNN's size is capped: larger budgets can resolve to the generator just tried.
        shape: tuple[Any, ...] = (resolved.scheme, resolved.n_qubits, resolved.n_layers)
        shape += (resolved.row_scales, resolved.hashed_vectors, resolved.ranks)
        if shape in seen:
            log(f"budget {budget}: the same generator as a smaller budget; skipped")
            continue
        seen.add(shape)
        try:
            trained = train_generator(
                model, candidate, fit_part, validation, settings, log, fit_rollouts, stateful
            )
        except ConfigError as exc:  # below this model's smallest hashed generator
            log(f"budget {budget}: skipped ({exc})")
            continue
        fid = trained.fid2
        if fit_rollouts is not None:  # judged as the final check judges: free-running
            qt = trained.qt
            fid = free_running_fidelity(
                partial(qt.functional, generated=qt.generator.generate_named()),
                qt.teacher,
                validation.head(len(val_streams)),
                val_streams,
                fit_rollouts.link,
                output=settings.output,
                output_kind=trained.fid1.kind,
            )
        reached = fid.headline >= settings.min_fidelity and not fid.degenerate
        points.append(
            {
                "scheme": trained.qt.config.scheme,
                "budget": trained.rep.trainable / trained.rep.generated_weights,
                "generator_params": trained.rep.trainable,
                "validation_fidelity": fid.headline,
                "fidelity_name": fid.headline_name,
                "validation": "free-running" if fit_rollouts is not None else "teacher-forced",
                "storage": trained.qt.storage,
                "reached": reached,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        log(
            f"{trained.qt.config.scheme} generator of {points[-1]['budget']:.2%} of M "
            f"({trained.rep.trainable:,} parameters, {trained.qt.storage}): "
            f"validation {fid.headline_name} {fid.headline:.4f}"
            + (" reaches the target" if reached else "")
        )
        if best is None or fid.headline > best[1].headline:
            best = (trained, fid)
        if reached:
            return trained, points
        if time.perf_counter() - start > settings.time_limit:
            log(f"time limit {settings.time_limit:.0f} s reached: keeping the best point")
            break
    if best is None:
        raise ConfigError(
            "No searched budget fits this model (each is below its smallest hashed generator); "
            "give --budget."
        )
    return best[0], points


@dataclass
class Measured:
    """A trained generator measured as it will be used: fidelity, warnings, the check."""

    trained: Trained
    fid2: Fidelity  # on the held-out data (teacher-forced for a stateful model)
    free: Fidelity | None  # free-running over held-out streams, for a stateful model
    link: StateLink | None
    warnings: list[str]
    fidelity_ok: bool
    search: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Written:
    """The files of a run: the student they hold, the export check and the latencies."""

    student: nn.Module
    export: Any
    torch_ms: dict[str, float]
    onnx_ms: dict[str, float]
    gen_path: Path
    onnx_path: Path


def measure_in_use(
    trained: Trained,
    fid2: Fidelity,
    data: Split,
    test: InputSource,
    link: StateLink | None,
    settings: PipelineSettings,
    log: Callable[[str], None],
) -> Measured:
    """Fidelity as the model is used (free-running for a stateful one), warnings, the check."""
    qt = trained.qt
    # Where more budget buys nothing, poor fidelity is not advised to raise it.
    advice = (
        "raise --finetune-steps or --qubits"
        if trained.unspent
        else "raise --budget or --finetune-steps"
    )
    warnings = [f"phase 2: {w}" for w in fid2.warnings(advice)]
    if trained.skipped_steps:
        warnings.append(
            f"phase 2: {trained.skipped_steps:,} of {trained.steps:,} steps skipped "
            "(non-finite gradient from the model's own operations, e.g. sqrt or log at 0)"
        )
    if trained.unspent:
        warnings.append(trained.unspent)
    if qt.revived:
        warnings.append(
            f"phase 1 left a dead network; fine-tuning restored the spread of "
            f"{len(qt.revived)} tensors first"
        )
    free: Fidelity | None = None
    if link is not None and data.stream_test is not None:
        labelled = data.y_test.numel() > 0
        free = free_running_fidelity(
            partial(qt.functional, generated=qt.generator.generate_named()),
            qt.teacher,
            test.head(len(data.stream_test)),
            data.stream_test,
            link,
            output=settings.output,
            output_kind=trained.fid1.kind,
            labels=data.y_test if labelled else None,
        )
        n = int(data.stream_test.unique().numel())
        log(f"free-running over {n} streams: {free.describe()}")
        warnings += [f"free-running: {w}" for w in free.warnings(advice)]
    elif link is not None:
        warnings.append(
            f"the model carries state ({link.describe()}): the fidelity above is teacher-forced "
            "(each test row has the original's state); add stream_test to the .npz to measure "
            "it free-running, as deployed"
        )
    shipped = free or fid2  # the headline: fidelity as the model is used
    fidelity_ok = settings.min_fidelity is None or (
        shipped.headline >= settings.min_fidelity and not shipped.degenerate
    )
    if not fidelity_ok:
        warnings.append(
            f"fidelity {shipped.headline:.4f} is below --min-fidelity {settings.min_fidelity}"
        )
    for w in warnings:
        log(f"warning: {w}")
    return Measured(trained, fid2, free, link, warnings, fidelity_ok)


def run_pipeline(
    model: nn.Module,
    config: QTConfig,
    data: Split,
    out_dir: str | Path,
    *,
    name: str = "model",
    settings: PipelineSettings | None = None,
    checkpoint_bytes: int | None = None,
    model_info: dict[str, Any] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> PipelineResult:
    """Compress ``model``, fine-tune, export ONNX, verify, save, and measure everything.

    Args:
        model: The pretrained model (not modified).
        config: Generator settings.
        data: Train/test data; labels may be empty tensors when unknown (then accuracies are
            ``None`` and fine-tuning must be ``"distill"``).
        out_dir: Existing or creatable folder (its parent must exist) for all outputs.
        name: Base name of the output files.
        settings: Training and output settings.
        checkpoint_bytes: Size of the original checkpoint file, for the summary.
        model_info: JSON facts stored in the generator file (e.g. the model factory).
        log: Receives one line per stage (the CLI prints them unless quiet).

    Returns:
        The measured :class:`PipelineResult` (also written to ``summary.json``).
    """
    from qtcompress.generator_file.save import save_generator
    from qtcompress.onnx.export import export_onnx, to_onnx_proto

    settings = settings or PipelineSettings()
    out = Path(out_dir)
    labelled = data.y_test.numel() > 0 and data.y_train.numel() > 0
    if settings.mode == "supervised" and not labelled:
        raise ConfigError("Supervised fine-tuning needs labels; use mode 'distill' or give labels.")
    if settings.min_fidelity is not None and not 0.0 <= settings.min_fidelity <= 1.0:
        raise ConfigError(f"min_fidelity must be in [0, 1], got {settings.min_fidelity}.")
    start = time.perf_counter()
    model = model.eval()
    # Batch-first from here on; the model is called, and exported, in its own layout.
    layout = BatchLayout.of(settings.batch_dims)
    if layout:
        log(f"batch not in dimension 0: {layout.describe()}")
    x_train, x_test = layout.to_front(data.x_train), layout.to_front(data.x_test)
    # Checked once here and handed on: finetune() and evaluate() take these sources as they are.
    train = InputSource.of(x_train, data.y_train if settings.mode == "supervised" else None)
    test = InputSource.of(x_test, data.y_test if labelled else None)
    # Fail fast: the model must accept the data, labels must fit its classes, and the output
    # folder must take the files, all before any fitting starts.
    first = check_call(model, layout.batch_to_model(train.head(2)))
    link = state_link(model, test, settings.state, log, layout)
    if link is not None and layout:
        # A fed-back state has its input's layout: say so, for every call from here on.
        layout = layout.with_state(link.input, link.output)
        dims = dict(layout.inputs)
        dims.update({f"output.{k}": d for k, d in layout.outputs.items()})
        settings = replace(settings, batch_dims=dims)
    teacher_head = select_output(layout.outputs_to_front(first), settings.output)
    if (
        labelled
        and infer_output_kind(teacher_head) == "logits"
        and (settings.output_kind in (None, "logits"))
    ):
        for key, y in (("y_train", data.y_train), ("y_test", data.y_test)):
            check_label_range(y, int(teacher_head.shape[-1]), name=key)
    # The graph takes the inputs as the user calls the model: batch axes where they are.
    example, input_names = positional_inputs(model, layout.batch_to_model(test.head(2)))
    dynamic_axes = layout.export_axes(input_names, settings.dynamic_axes)
    dynamic_shapes(example, input_names, dynamic_axes)  # bad axes fail before fitting
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    check_writable_dir(out, 2 * model_bytes + (1 << 20))

    search: list[dict[str, Any]] = []
    rollouts = None
    if link is not None and data.stream_train is not None:
        rollouts = Rollouts(link, data.stream_train, settings.rollout)
        log(
            f"distilling over rollouts of {rollouts.steps()} chunks on the student's own "
            f"state ({int(data.stream_train.unique().numel())} training streams)"
        )
    if searching(config, settings):
        trained, search = search_budget(
            model, config, train, settings, log, rollouts, link is not None
        )
        fid2 = trained.qt.evaluate(test, output=settings.output, output_kind=settings.output_kind)
        log(f"held-out (never selected on): {fid2.describe()}")
    else:
        trained = train_generator(
            model, config, train, test, settings, log, rollouts, link is not None
        )
        fid2 = trained.fid2
    measured = measure_in_use(trained, fid2, data, test, link, settings, log)
    measured.search = search
    qt = trained.qt
    qt.to("cpu")  # files, the ONNX graph and latency come from the CPU
    student = qt.materialize().eval()

    gen_path = out / f"{name}.qtc.safetensors"
    onnx_path = out / f"{name}.onnx"
    record = OutputRecord(out, {"generator": gen_path, "onnx": onnx_path})
    with record:
        log("exporting the ONNX graph")
        # One export serves both files: the generator file keeps its weightless skeleton.
        proto = to_onnx_proto(student, example, input_names=input_names, dynamic_axes=dynamic_axes)
        log(f"writing {gen_path.name}")
        save_generator(
            qt,
            gen_path,
            example_inputs=example,
            model_info=model_info,
            input_names=input_names,
            dynamic_axes=dynamic_axes,
            exported=proto,
            materialized=student,
            storage=qt.storage,
        )
        record.wrote("generator")
        log(f"writing {onnx_path.name} and checking it with onnxruntime")
        export = export_onnx(
            student,
            example,
            onnx_path,
            input_names=input_names,
            dynamic_axes=dynamic_axes,
            exported=proto,
        )
        record.wrote("onnx")
        log("timing torch against onnxruntime")
        torch_ms, onnx_ms = _latencies(student, onnx_path, test, settings.latency_repeats, layout)
        written = Written(student, export, torch_ms, onnx_ms, gen_path, onnx_path)
        return _finish(
            record, start, name, model, settings, measured, written, checkpoint_bytes, log
        )


def _finish(
    record: OutputRecord,
    start: float,
    name: str,
    model: nn.Module,
    settings: PipelineSettings,
    measured: Measured,
    written: Written,
    checkpoint_bytes: int | None,
    log: Callable[[str], None],
) -> PipelineResult:
    """Summarise a run whose files are written, and record it as complete."""
    trained, fid2, free, link = measured.trained, measured.fid2, measured.free, measured.link
    qt, rep, fid1 = trained.qt, trained.rep, trained.fid1
    student, export, gen_path, onnx_path = (
        written.student,
        written.export,
        written.gen_path,
        written.onnx_path,
    )
    out = gen_path.parent
    log(
        f"wrote {gen_path.name} ({gen_path.stat().st_size:,} bytes) and {onnx_path.name} "
        f"(onnxruntime vs torch max |diff| {export.max_abs_diff:.2g})"
    )
    files = {
        "generator": str(gen_path),
        "onnx": str(onnx_path),
        "summary": str(out / "summary.json"),
    }
    result = PipelineResult(
        name=name,
        original_params=sum(p.numel() for p in model.parameters()),
        generated_weights=rep.generated_weights,
        generator_params=rep.trainable,
        compression_ratio=rep.generated_weights / rep.trainable,
        n_qubits=rep.n_qubits,
        n_layers=rep.n_layers,
        chunk=rep.chunk,
        checkpoint_bytes=checkpoint_bytes,
        generator_file_bytes=gen_path.stat().st_size,
        onnx_bytes=onnx_path.stat().st_size,
        scheme=qt.config.scheme,
        shape=shape_of(qt),
        basis_state=qt.generator.basis_state_text(),
        budget=trained.budget,
        generated_kinds={
            k: [n, v]
            for k, (n, v) in kinds_summary((s.name, s.shape) for s in qt.layout.specs).items()
        },
        output_kind=fid1.kind,
        accuracy_original=fid2.teacher_accuracy,
        accuracy_phase1=fid1.accuracy,
        accuracy_finetuned=fid2.accuracy,
        fidelity_phase1=fid1.to_dict(),
        fidelity_finetuned=fid2.to_dict(),
        warnings=measured.warnings,
        min_fidelity=settings.min_fidelity,
        fidelity_ok=measured.fidelity_ok,
        phase1_rel_weight_error=trained.phase1_error,
        onnx_max_abs_diff=export.max_abs_diff,
        onnx_max_abs_output=export.max_abs_output,
        latency_torch_ms=written.torch_ms,
        latency_onnx_ms=written.onnx_ms,
        fit_s=trained.fit_s,
        finetune_s=trained.finetune_s,
        total_s=0.0,
        files=files,
        histories=trained.histories,
        finetune_lr=trained.lr,
        finetune_lr_reason=trained.lr_reason,
        finetune_steps=trained.steps,
        finetune_steps_reason=trained.steps_reason,
        storage=qt.storage,
        storage_note=trained.storage_note,
        search=measured.search,
        state_link=link.describe() if link else None,
        fidelity_free_running=free.to_dict() if free else None,
    )
    if settings.report:
        from qtcompress.report import write_report

        original = dict(model.named_parameters())
        rebuilt = dict(student.named_parameters())
        weights = {
            s.name: (original[s.name].detach().numpy(), rebuilt[s.name].detach().numpy())
            for s in qt.layout.specs
        }
        report = write_report(
            out / "report",
            summary_rows(result),
            trained.histories,
            weights,
            title=f"qtcompress report: {name}",
        )
        files["report"] = str(report)
    result.total_s = time.perf_counter() - start
    record.complete({k: v for k, v in asdict(result).items() if k != "histories"})
    return result
