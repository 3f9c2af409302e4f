"""Fidelity of compressed real-shaped models: the suite through `compress`, against baselines.

For every suite model (``tools/suite.py``: a 420K CNN without BatchNorm, a 335K streaming LSTM
with carried state, an 804K two-input transformer encoder with normalised embeddings, a 5.8M
MLP without BatchNorm) and every budget, this runs:

* ``qt``: the whole ``compress`` pipeline (phase 1, phase 2, generator file, ONNX export and
  check) with the default generator sized to the budget;
* ``qt without QNN``: the same generator fed zeros instead of the QNN's probabilities;
* ``low-rank``: truncated SVD of every matrix (ranks greedy by spectrum per parameter);
* ``pruning``: the largest-magnitude weights of every matrix, the same fraction per matrix;

each at the parameter count of the QT generator, each fine-tuned by the same
:func:`qtcompress.train.finetune.finetune` recipe (steps, learning rate, warm-up, clipping, collapse
guard, distillation loss), and reports fidelity to the original on held-out inputs.

Run: ``python tools/bench_suite.py`` (about an hour on 2 cores), ``--quick`` for a smoke run.
Threads: torch ``--threads`` (default 2), qsim follows the CPU affinity mask,
``OMP_WAIT_POLICY=PASSIVE`` and ``OPENBLAS_NUM_THREADS=1`` are set before torch loads.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import heapq  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402
from benchdoc import machine, write_section  # noqa: E402

from qtcompress import QTConfig, compress  # noqa: E402
from qtcompress.errors import ConfigError  # noqa: E402
from qtcompress.examples import Split  # noqa: E402
from qtcompress.generator.ranks import row_view  # noqa: E402
from qtcompress.pipeline import PipelineSettings, run_pipeline  # noqa: E402
from qtcompress.targets import select_targets  # noqa: E402
from qtcompress.train.finetune import evaluate_fidelity, finetune  # noqa: E402
from qtcompress.train.functional import FunctionalModel  # noqa: E402
from qtcompress.train.loop import LoopConfig  # noqa: E402

METHODS = ("qt", "qt without QNN", "low-rank", "pruning")


# -- classical students at a parameter budget ---------------------------------------------------
class LowRankStudent(nn.Module):
    """Every matrix (``row_view`` of a >= 2-D parameter) as ``U @ V`` from its truncated SVD;
    vectors dense. Ranks grow greedily by captured variance per parameter within the budget."""

    def __init__(self, model: nn.Module, budget: int) -> None:
        super().__init__()
        named = dict(model.named_parameters())
        self.names = list(named)
        self.shapes = {n: tuple(p.shape) for n, p in named.items()}
        mats = {
            n: p.detach().reshape(row_view(tuple(p.shape))).double()
            for n, p in named.items()
            if p.ndim >= 2
        }
        svd = {n: torch.linalg.svd(m, full_matrices=False) for n, m in mats.items()}
        used = sum(p.numel() for n, p in named.items() if n not in mats)
        ranks = {n: 1 for n in mats}
        used += sum(sum(m.shape) for m in mats.values())
        heap = [
            (-float(svd[n].S[1] ** 2 / (svd[n].S ** 2).sum()) / sum(m.shape), n)
            for n, m in mats.items()
            if min(m.shape) > 1
        ]
        heapq.heapify(heap)
        while heap:
            _, n = heapq.heappop(heap)
            cost = sum(mats[n].shape)
            if used + cost > budget:
                continue
            ranks[n] += 1
            used += cost
            s = svd[n].S
            if ranks[n] < len(s):
                heapq.heappush(heap, (-float(s[ranks[n]] ** 2 / (s**2).sum()) / cost, n))
        self.ranks = ranks
        self.u = nn.ParameterDict()
        self.v = nn.ParameterDict()
        self.dense = nn.ParameterDict()
        for n, p in named.items():
            key = n.replace(".", "__")
            if n in mats:
                u, s, vh = svd[n]
                r = ranks[n]
                root = s[:r].sqrt()
                self.u[key] = nn.Parameter((u[:, :r] * root).float())
                self.v[key] = nn.Parameter((root[:, None] * vh[:r]).float())
            else:
                self.dense[key] = nn.Parameter(p.detach().clone())

    def generate_named(self, factored: bool = False) -> dict[str, torch.Tensor]:  # noqa: ARG002
        out = {}
        for n in self.names:
            key = n.replace(".", "__")
            if key in self.u:
                out[n] = (self.u[key] @ self.v[key]).reshape(self.shapes[n])
            else:
                out[n] = self.dense[key]
        return out


class PrunedStudent(nn.Module):
    """The largest-magnitude entries of every >= 2-D parameter (the same fraction in each),
    vectors dense, so that kept entries + vectors fit the budget; pruned entries stay zero."""

    def __init__(self, model: nn.Module, budget: int) -> None:
        super().__init__()
        named = dict(model.named_parameters())
        self.names = list(named)
        matrices = sum(p.numel() for p in named.values() if p.ndim >= 2)
        vectors = sum(p.numel() for p in named.values() if p.ndim < 2)
        frac = max(0.0, min(1.0, (budget - vectors) / matrices))
        self.weights = nn.ParameterDict()
        self.masks: dict[str, torch.Tensor] = {}
        for n, p in named.items():
            key = n.replace(".", "__")
            w = p.detach().clone()
            if p.ndim >= 2:
                k = max(1, int(frac * w.numel()))
                thresh = w.abs().flatten().kthvalue(w.numel() - k + 1).values
                self.masks[key] = w.abs() >= thresh
                w = w * self.masks[key]
            self.weights[key] = nn.Parameter(w)

    def generate_named(self, factored: bool = False) -> dict[str, torch.Tensor]:  # noqa: ARG002
        out = {}
        for n in self.names:
            key = n.replace(".", "__")
            w = self.weights[key]
            out[n] = w * self.masks[key] if key in self.masks else w
        return out


def count(module: nn.Module) -> int:
    """Trainable parameters (a pruned student counts only its kept entries)."""
    if isinstance(module, PrunedStudent):
        return sum(
            int(module.masks[k].sum()) if k in module.masks else p.numel()
            for k, p in module.weights.items()
        )
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# -- one run --------------------------------------------------------------------------------------
@dataclass
class Row:
    model: str
    budget: float
    method: str
    seed: int
    params: int
    weights: int
    phase1_error: float | None
    phase1_fidelity: float | None
    fidelity: float
    fidelity_name: str
    accuracy: float | None
    teacher_accuracy: float | None
    degenerate: bool
    generator_bytes: int | None
    checkpoint_bytes: int
    seconds: float


def split_of(entry: Any) -> Split:
    def labels(t: torch.Tensor | None) -> torch.Tensor:
        return t if t is not None else torch.empty(0, dtype=torch.int64)

    return Split(
        entry.train_inputs, labels(entry.train_labels), entry.test_inputs, labels(entry.test_labels)
    )


def qt_config(entry: Any, budget: float, seed: int, **fields: Any) -> QTConfig:
    """``budget``, or the smallest generator (rank 1 everywhere) where the budget is below it."""
    config = QTConfig(budget=budget, seed=seed, **fields)
    try:
        config.resolve(select_targets(entry.model))
    except ConfigError:
        return QTConfig(rank=1, seed=seed, **fields)
    return config


def run_qt(entry: Any, budget: float, seed: int, steps: int, fit_steps: int) -> Row:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        r = run_pipeline(
            entry.model,
            qt_config(entry, budget, seed),
            split_of(entry),
            Path(tmp) / "out",
            name=entry.name,
            settings=PipelineSettings(fit_steps=fit_steps, finetune_steps=steps, latency_repeats=1),
            checkpoint_bytes=entry.checkpoint.stat().st_size,
        )
    f1, f2 = r.fidelity_phase1, r.fidelity_finetuned
    return Row(
        entry.name,
        budget,
        "qt",
        seed,
        r.generator_params,
        r.generated_weights,
        r.phase1_rel_weight_error,
        f1["headline"],
        f2["headline"],
        f2["headline_name"],
        r.accuracy_finetuned,
        r.accuracy_original,
        f2["degenerate"],
        r.generator_file_bytes,
        entry.checkpoint.stat().st_size,
        time.perf_counter() - t0,
    )


def run_other(
    entry: Any, method: str, budget: float, params: int, seed: int, steps: int, fit_steps: int
) -> Row:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    data = split_of(entry)
    labels = data.y_test if data.y_test.numel() else None
    p1_err = p1_fid = None
    if method == "qt without QNN":
        qt = compress(entry.model, qt_config(entry, budget, seed, prob_transform="none"))
        qt.fit_weights(steps=fit_steps, lr=1e-2, progress=False)
        p1_err = qt.weight_errors()["_total"]
        p1_fid = qt.evaluate(data.x_test, labels).headline
        qt.finetune(data.x_train, steps=steps, progress=False)
        fid = qt.evaluate(data.x_test, labels)
        n_params = qt.report().trainable - qt.report().qnn  # the QNN is cut off
    else:
        student: nn.Module = (
            LowRankStudent(entry.model, params)
            if method == "low-rank"
            else PrunedStudent(entry.model, params)
        )
        fmodel = FunctionalModel(entry.model, student)  # type: ignore[arg-type]
        p1_fid = evaluate_fidelity(fmodel, data.x_test, labels).headline
        cfg = LoopConfig(steps=steps, lr=3e-3, seed=seed, warmup=max(1, steps // 10), grad_clip=1.0)
        finetune(fmodel, data.x_train, None, cfg, progress=False)
        fid = evaluate_fidelity(fmodel, data.x_test, labels)
        n_params = count(student)
    weights = sum(p.numel() for p in entry.model.parameters())
    return Row(
        entry.name,
        budget,
        method,
        seed,
        n_params,
        weights,
        p1_err,
        p1_fid,
        fid.headline,
        fid.headline_name,
        fid.accuracy,
        None,
        fid.degenerate,
        None,
        entry.checkpoint.stat().st_size,
        time.perf_counter() - t0,
    )


# -- report ---------------------------------------------------------------------------------------
def _mean_std(values: list[float], pct: bool) -> str:
    scale = 100.0 if pct else 1.0
    m = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{m:.2f}" if pct else f"{m:.3f}"
    s = statistics.stdev(values) * scale
    return f"{m:.2f} ± {s:.2f}" if pct else f"{m:.3f} ± {s:.3f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| model | budget | method | trainable (% of M) | phase-1 rel. weight error | "
        "phase-1 fidelity | fine-tuned fidelity | accuracy (original) | "
        "generator file vs checkpoint | seeds | s per run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted(
        {(r.model, r.budget, r.method) for r in rows},
        key=lambda k: (k[0], k[1], METHODS.index(k[2])),
    )
    for key in keys:
        group = [r for r in rows if (r.model, r.budget, r.method) == key]
        g0 = group[0]
        pct = g0.fidelity_name == "agreement"
        p1e = (
            _mean_std([r.phase1_error for r in group if r.phase1_error is not None], False)
            if g0.phase1_error is not None
            else "—"
        )
        p1f = _mean_std([r.phase1_fidelity for r in group if r.phase1_fidelity is not None], pct)
        fid = (
            f"{g0.fidelity_name} {_mean_std([r.fidelity for r in group], pct)}"
            + ("%" if pct else "")
            + (" DEAD" if any(r.degenerate for r in group) else "")
        )
        acc = "—"
        if g0.accuracy is not None:
            acc = _mean_std([r.accuracy for r in group if r.accuracy is not None], True) + "%"
            if g0.teacher_accuracy is not None:
                acc += f" ({g0.teacher_accuracy:.2%})"
        size = "—"
        if g0.generator_bytes is not None:
            size = (
                f"{g0.generator_bytes:,} B vs {g0.checkpoint_bytes:,} B "
                f"({g0.checkpoint_bytes / g0.generator_bytes:.1f}x smaller)"
            )
        lines.append(
            f"| {g0.model} | {g0.budget:.0%} | {g0.method} | {g0.params:,} "
            f"({g0.params / g0.weights:.2%}) | {p1e} | {p1f}{'%' if pct else ''} | {fid} | "
            f"{acc} | {size} | {len(group)} | {statistics.fmean(r.seconds for r in group):.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="cnn,rnn,encoder,mlp5m")
    ap.add_argument("--budgets", default="0.01,0.05,0.2")
    ap.add_argument("--seeds", type=int, default=2, help="seeds at the default budget (5%%)")
    ap.add_argument("--steps", type=int, default=500, help="fine-tuning steps")
    ap.add_argument("--fit-steps", type=int, default=100, help="phase-1 steps")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--quick", action="store_true", help="smoke run: cnn, 5%%, 30 steps")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/benchmarks.md")
    ap.add_argument(
        "--rows",
        type=Path,
        default=None,
        help="JSON-lines file: every finished run is appended to it, and runs "
        "already in it are not measured again (resume after an interruption)",
    )
    ap.add_argument(
        "--write-only",
        action="store_true",
        help="measure nothing: write the table of the runs in --rows",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.budgets, args.seeds, args.steps, args.fit_steps = "cnn", "0.05", 1, 30, 5
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",")]
    rows: list[Row] = []
    if args.rows is not None and args.rows.exists():
        rows = [Row(**json.loads(line)) for line in args.rows.read_text().splitlines() if line]
    done = {(r.model, r.budget, r.method, r.seed) for r in rows}

    def keep(row: Row) -> None:
        rows.append(row)
        print(row, flush=True)
        if args.rows is not None:
            with args.rows.open("a") as f:
                f.write(json.dumps(asdict(row)) + "\n")

    for name in [] if args.write_only else args.models.split(","):
        entry = suite.load_entry(name, log=lambda *_: None)
        for budget in (float(b) for b in args.budgets.split(",")):
            seeds = range(args.seeds if math.isclose(budget, 0.05) else 1)
            for seed in seeds:
                qt_row = next(
                    (
                        r
                        for r in rows
                        if (r.model, r.budget, r.method, r.seed) == (name, budget, "qt", seed)
                    ),
                    None,
                )
                if qt_row is None:
                    qt_row = run_qt(entry, budget, seed, args.steps, args.fit_steps)
                    keep(qt_row)
                for method in methods:
                    if method == "qt" or (name, budget, method, seed) in done:
                        continue
                    keep(
                        run_other(
                            entry, method, budget, qt_row.params, seed, args.steps, args.fit_steps
                        )
                    )
    text = table(rows)
    print(text)
    minutes = sum(r.seconds for r in rows) / 60  # measured runs, also across resumed runs
    if not args.no_write and not args.quick:
        write_section(
            "bench_suite",
            "Real-shaped models: fidelity against the original (bench_suite.py)",
            f"Measured {machine()}; torch {torch.__version__}, {args.threads} torch threads, "
            f"qsim on the affinity mask, OMP_WAIT_POLICY=PASSIVE, OPENBLAS_NUM_THREADS=1; "
            f"{args.fit_steps} phase-1 and {args.steps} fine-tuning steps per run, batch 64, "
            f"distillation without labels; seeds per row in the table; {minutes:.0f} min of "
            "runs in all. Fidelity is on held-out inputs: top-1 agreement with "
            "the original for logits, agreement of the thresholded probability for the "
            "streaming model, mean cosine for the encoder's embeddings. Every method has the "
            "QT generator's parameter count (a budget below the smallest generator uses the "
            "smallest). Models: "
            + "; ".join(
                f"**{e.name}**: {e.description}"
                for e in (suite.load_entry(n, log=lambda *_: None) for n in args.models.split(","))
            )
            + ".\n\n"
            + text,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
