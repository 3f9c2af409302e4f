"""The frontier: fidelity against generator bytes at 0.1-1% of M, QT against its controls.

For suite models (``tools/suite.py``) and budgets, every arm is the hashed generator
(:mod:`qtcompress.generator.hashed`) with the identical structure (the same hash, the same
per-row or per-tensor scales, the same exact vectors), differing only in where the shared
values come from (:mod:`qtcompress.generator.values`):

* ``qnn``: Quantum-Train, the values are ``2**n p - 1`` of a trained n-qubit circuit (qsim);
* ``table``: a free trainable table with the QNN's parameter count: HashedNets at equal bytes;
* ``mps``: a real MPS Born machine over the index bits with (at most) the QNN's parameter count;
* ``frozen``: a probability vector drawn once, never trained;
* ``zeros``: the probability channel removed (every value -1: signs and scales only).

and, with their own structure (``--classical MODEL``): ``low-rank`` SVD factors at the same
parameter count and magnitude ``pruning`` at the same bytes (2 bytes of position per kept
value), best of two learning rates.

Each arm is fine-tuned by the same distillation recipe (:meth:`QTModel.finetune`: warm-up,
clipping, cosine decay, best probe state) for the same steps, with the same learning rate,
and scored against the original on held-out inputs; the generator file of each arm is written
(without the ONNX graph and check batch, which are the same for every arm) and its bytes
reported next to the checkpoint's.

Run: ``python tools/bench_frontier.py --shard 0/2 & python tools/bench_frontier.py --shard 1/2``
(results appended to ``build/frontier/*.jsonl``), then ``python tools/bench_frontier.py
--report`` to write the section of docs/benchmarks.md. Threads: one torch thread per process.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdoc import machine, write_section  # noqa: E402
from suite import load_entry  # noqa: E402

from qtcompress import QTConfig, compress  # noqa: E402
from qtcompress.errors import ConfigError  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "build" / "frontier"
MODELS = ("cnn", "rnn", "encoder")
# Reported when their rows exist: the grid's models and those run with --model.
REPORTED = (*MODELS, "mlp5m")
BUDGETS = (0.001, 0.005, 0.01)
# (arm, seeds): the QNN and its two trained rivals on three seeds, the untrained controls on one.
ARMS = (
    ("qnn", (0, 1, 2)),
    ("table", (0, 1, 2)),
    ("mps", (0, 1, 2)),
    ("frozen", (0,)),
    ("zeros", (0,)),
)
STEPS, LR = 300, 1e-2


def grid() -> list[tuple[str, float, str, int, float]]:
    """Every run: (model, budget, arm, seed, learning rate); plus a learning-rate sweep."""

    # The cheap models and the sweep first: a run cut short still has whole tables.
    return (
        model_grid("cnn")
        + sweep("cnn")
        + [r for m in MODELS[1:] for r in model_grid(m)]
        + sweep("encoder")
    )


def model_grid(
    model: str, budgets: tuple[float, ...] = BUDGETS
) -> list[tuple[str, float, str, int, float]]:
    """The main grid of one model: every budget, arm and seed at the common learning rate."""
    return [(model, b, a, s, LR) for b in budgets for a, seeds in ARMS for s in seeds]


# Classical methods with their own structure, each at the hashed arms' budget: low-rank SVD at
# the same parameter count; magnitude pruning at the same bytes, each kept value paying 2 bytes
# of position (a delta-coded index) on top of its 4; best of two learning rates, seed 0.
# Tensor-train: every matrix reshaped to a 4-way tensor, decomposed by tensorly's TT-SVD at the
# largest uniform TT rank that fits the parameter count, cores fine-tuned by the same recipe.
# Random subspace (PRANC-style): every weight a fixed, seeded sparse random combination of the
# shared coefficients (SUBSPACE_NNZ of them, random signs), a trained scale per tensor, exact
# vectors; only the coefficients and scales are trained.
CLASSICAL = ("low-rank", "pruning", "tensor-train", "subspace")
SUBSPACE_NNZ = 8


def classical(model: str) -> list[tuple[str, float, str, int, float]]:
    """The classical arms of ``model``: every budget, each method, two learning rates; int8."""
    runs = [(model, b, a, 0, lr) for b in BUDGETS for a in CLASSICAL for lr in (3e-3, 1e-2)]
    return [*runs, (model, 1.0, "int8", 0, 0.0)]


def _two_factors(n: int) -> tuple[int, int]:
    """``n = a * b`` with ``a <= b`` as close as possible (a prime stays ``(1, n)``)."""
    a = int(n**0.5)
    while n % a:
        a -= 1
    return a, n // a


class _MatrixStudent(torch.nn.Module):
    """A student whose vectors stay dense and whose matrices its subclass builds (``matrix``)."""

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    dense: torch.nn.ParameterDict

    def matrix(self, key: str) -> torch.Tensor:
        """The flat or shaped values of the parameter stored under ``key``."""
        raise NotImplementedError

    def generate_named(self, factored: bool = False) -> dict[str, torch.Tensor]:  # noqa: ARG002
        out = {}
        for n in self.names:
            key = n.replace(".", "__")
            out[n] = (
                self.dense[key] if key in self.dense else self.matrix(key).reshape(self.shapes[n])
            )
        return out


def _tt_dims(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """A parameter's matrix view (``row_view``) as four dimensions: each side in two factors."""
    from qtcompress.generator.ranks import row_view

    rows, cols = row_view(shape)
    return (*_two_factors(rows), *_two_factors(cols))


class SubspaceStudent(_MatrixStudent):
    """Weights in a seeded random subspace of ``params`` dimensions (PRANC-style, sparse basis).

    Weight ``j`` of matrix ``t`` is ``s_t / sqrt(k) * sum_i sign_i(j) * alpha[idx_i(j)]`` with
    ``k`` = :data:`SUBSPACE_NNZ` seeded indices and signs per weight (nothing stored but the
    seed): the span of ``len(alpha)`` sparse random basis vectors. Vectors stay exact; ``s_t``
    starts at the pretrained standard deviation (``alpha`` is standard normal), so the
    student starts at the pretrained spread, as the hashed arms do.
    """

    def __init__(self, model: torch.nn.Module, params: int, seed: int = 0) -> None:
        super().__init__()
        named = dict(model.named_parameters())
        self.names = list(named)
        self.shapes = {n: tuple(p.shape) for n, p in named.items()}
        mats = [n for n, p in named.items() if p.ndim >= 2]
        vectors = sum(p.numel() for n, p in named.items() if n not in mats)
        dim = params - vectors - len(mats)
        if dim < 16:
            raise ValueError(f"{params:,} parameters leave {dim} coefficients")
        g = torch.Generator().manual_seed(seed)
        self.alpha = torch.nn.Parameter(torch.randn(dim, generator=g))
        self.scale = torch.nn.ParameterDict()
        self.dense = torch.nn.ParameterDict()
        self.index: dict[str, torch.Tensor] = {}
        self.sign: dict[str, torch.Tensor] = {}
        for n, p in named.items():
            key = n.replace(".", "__")
            if n not in mats:
                self.dense[key] = torch.nn.Parameter(p.detach().clone())
                continue
            self.index[key] = torch.randint(0, dim, (p.numel(), SUBSPACE_NNZ), generator=g)
            self.sign[key] = torch.randint(0, 2, (p.numel(), SUBSPACE_NNZ), generator=g) * 2.0 - 1
            self.scale[key] = torch.nn.Parameter(p.detach().std().reshape(1).float())

    def matrix(self, key: str) -> torch.Tensor:
        mixed = (self.sign[key] * self.alpha[self.index[key]]).sum(-1)  # (numel,)
        return self.scale[key] * mixed / SUBSPACE_NNZ**0.5


class TTStudent(_MatrixStudent):
    """Every matrix (``row_view`` of a >= 2-D parameter) in tensor-train form; vectors dense.

    A ``rows x cols`` matrix is reshaped to ``(r1, r2, c1, c2)`` (each dimension split into its
    two closest factors) and decomposed by ``tensorly.decomposition.tensor_train`` at TT rank
    ``rank`` (capped by each unfolding); its cores are the trainable parameters. The largest
    uniform rank whose parameters fit the budget is chosen by :func:`tt_rank_for`.
    """

    def __init__(self, model: torch.nn.Module, rank: int) -> None:
        import tensorly
        from tensorly.decomposition import tensor_train

        super().__init__()
        named = dict(model.named_parameters())
        self.names = list(named)
        self.shapes = {n: tuple(p.shape) for n, p in named.items()}
        self.cores = torch.nn.ParameterDict()
        self.dense = torch.nn.ParameterDict()
        self.ncores: dict[str, int] = {}
        tensorly.set_backend("numpy")
        for n, p in named.items():
            key = n.replace(".", "__")
            if p.ndim < 2:
                self.dense[key] = torch.nn.Parameter(p.detach().clone())
                continue
            dims = _tt_dims(tuple(p.shape))
            tensor = p.detach().double().reshape(dims).numpy()
            cores = tensor_train(tensor, rank=[1, rank, rank, rank, 1]).factors
            self.ncores[key] = len(cores)
            for i, core in enumerate(cores):
                self.cores[f"{key}__{i}"] = torch.nn.Parameter(torch.tensor(core).float())

    @staticmethod
    def size(model: torch.nn.Module, rank: int) -> int:
        """Parameters of the student at TT rank ``rank`` (without decomposing anything)."""
        total = 0
        for p in model.parameters():
            if p.ndim < 2:
                total += p.numel()
                continue
            dims = _tt_dims(tuple(p.shape))
            # TT-SVD caps each rank by the unfoldings' sizes.
            ranks = [1]
            for k in range(1, 4):
                left = math.prod(dims[:k])
                right = math.prod(dims[k:])
                ranks.append(min(rank, left, right))
            ranks.append(1)
            total += sum(ranks[k] * dims[k] * ranks[k + 1] for k in range(4))
        return total

    def matrix(self, key: str) -> torch.Tensor:
        full = self.cores[f"{key}__0"]  # (1, d0, r1)
        for i in range(1, self.ncores[key]):
            core = self.cores[f"{key}__{i}"]  # (r_i, d_i, r_{i+1})
            full = torch.tensordot(full, core, dims=([full.dim() - 1], [0]))
        return full


def tt_rank_for(model: torch.nn.Module, params: int) -> int | None:
    """The largest uniform TT rank whose student fits ``params``; ``None`` if rank 1 does not."""
    if TTStudent.size(model, 1) > params:
        return None
    rank = 1
    while rank < 4096 and TTStudent.size(model, rank + 1) <= params:
        rank += 1
    return rank


def run_int8(model: str) -> dict[str, Any]:
    """The original weights rounded to int8 (one scale per tensor, symmetric), not trained."""
    from qtcompress.train.finetune import evaluate_fidelity
    from qtcompress.train.functional import FunctionalModel

    entry = load_entry(model, log=lambda _s: None)
    t0 = time.perf_counter()
    named = dict(entry.model.named_parameters())

    class Int8(torch.nn.Module):
        def generate_named(self, factored: bool = False) -> dict[str, torch.Tensor]:  # noqa: ARG002
            out = {}
            for n, p in named.items():
                scale = p.detach().abs().max().clamp_min(1e-12) / 127.0
                out[n] = (p.detach() / scale).round().clamp(-127, 127) * scale
            return out

    student = Int8()
    fmodel = FunctionalModel(entry.model, student)  # type: ignore[arg-type]
    fid = evaluate_fidelity(fmodel, entry.test_inputs, entry.test_labels)
    weights = sum(p.numel() for p in named.values())
    return _classical_row(
        (model, 1.0, "int8", 0, 0.0),
        entry,
        fid.headline,
        fid,
        t0,
        weights,
        weights,
        weights + 4 * len(named),
    )


def run_classical(model: str, budget: float, arm: str, seed: int, lr: float) -> dict[str, Any]:
    """Fine-tune a low-rank or pruned student by the same recipe; returns its row."""
    from bench_suite import LowRankStudent, PrunedStudent, count

    from qtcompress.train.finetune import evaluate_fidelity, finetune
    from qtcompress.train.functional import FunctionalModel
    from qtcompress.train.loop import LoopConfig

    entry = load_entry(model, log=lambda _s: None)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    weights = sum(p.numel() for p in entry.model.parameters())
    params = int(budget * weights)
    student: torch.nn.Module
    if arm == "low-rank":
        student = LowRankStudent(entry.model, params)
    elif arm == "pruning":
        student = PrunedStudent(entry.model, params * 4 // 6)
    elif arm == "subspace":
        try:
            student = SubspaceStudent(entry.model, params, seed)
        except ValueError as exc:  # the exact vectors alone are over the budget
            return _error_row((model, budget, arm, seed, lr), str(exc))
    else:
        rank = tt_rank_for(entry.model, params)
        if rank is None:
            return _error_row(
                (model, budget, arm, seed, lr),
                f"TT rank 1 needs {TTStudent.size(entry.model, 1):,} parameters",
            )
        student = TTStudent(entry.model, rank)
    fmodel = FunctionalModel(entry.model, student)  # type: ignore[arg-type]
    start = evaluate_fidelity(fmodel, entry.test_inputs, entry.test_labels).headline
    cfg = LoopConfig(steps=STEPS, lr=lr, seed=seed, warmup=STEPS // 10, grad_clip=1.0)
    finetune(fmodel, entry.train_inputs, None, cfg, progress=False)
    fid = evaluate_fidelity(fmodel, entry.test_inputs, entry.test_labels)
    kept = count(student)  # pruning: its kept entries; the others: their parameters
    index_bytes = 2 * (kept - sum(p.numel() for p in entry.model.parameters() if p.ndim < 2))
    file_bytes = 4 * kept + (max(0, index_bytes) if arm == "pruning" else 0)
    return _classical_row(
        (model, budget, arm, seed, lr), entry, start, fid, t0, weights, kept, file_bytes
    )


def _error_row(run: tuple[str, float, str, int, float], error: str) -> dict[str, Any]:
    """The row of a run that could not be built at its budget (the report shows "-")."""
    model, budget, arm, seed, lr = run
    return {"model": model, "budget": budget, "arm": arm, "seed": seed, "lr": lr, "error": error}


def _classical_row(
    run: tuple[str, float, str, int, float],
    entry: Any,
    start: float,
    fid: Any,
    t0: float,
    weights: int,
    params: int,
    file_bytes: int,
) -> dict[str, Any]:
    """The row of an arm with its own structure (no QNN, no buckets)."""
    return _row(
        run,
        entry,
        start,
        fid,
        t0,
        weights=weights,
        params=params,
        source_params=0,
        buckets=0,
        qubits=0,
        layers=0,
        file_bytes=file_bytes,
    )


def _row(
    run: tuple[str, float, str, int, float],
    entry: Any,
    start: float,
    fid: Any,
    t0: float,
    **sizes: int,
) -> dict[str, Any]:
    """The jsonl row of a finished run: what it was, its fidelity, its sizes, its time."""
    model, budget, arm, seed, lr = run
    return {
        "model": model,
        "budget": budget,
        "arm": arm,
        "seed": seed,
        "lr": lr,
        "steps": STEPS,
        **sizes,
        "start": start,
        "headline": fid.headline,
        "metric": fid.headline_name,
        "accuracy": fid.accuracy,
        "degenerate": fid.degenerate,
        "checkpoint_bytes": entry.checkpoint.stat().st_size,
        "seconds": time.perf_counter() - t0,
    }


def sweep(model: str) -> list[tuple[str, float, str, int, float]]:
    """The learning-rate sweep of the trained arms at 0.5% of M, seed 0."""
    return [(model, 0.005, a, 0, lr) for a in ("table", "mps", "qnn") for lr in (3e-3, 3e-2)]


def run_one(model: str, budget: float, arm: str, seed: int, lr: float) -> dict[str, Any]:
    """Compress, fine-tune and score one arm; returns the row written to the jsonl file."""
    entry = load_entry(model, log=lambda _s: None)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    config = QTConfig(scheme="hashed", budget=budget, values=arm, seed=seed)
    try:
        qt = compress(entry.model, config)
    except ConfigError as exc:  # below the smallest hashed generator of this model
        return _error_row((model, budget, arm, seed, lr), str(exc))
    labels = entry.test_labels
    start = qt.evaluate(entry.test_inputs, labels).headline
    qt.finetune(entry.train_inputs, steps=STEPS, lr=lr, progress=False)
    fid = qt.evaluate(entry.test_inputs, labels)
    with tempfile.TemporaryDirectory() as tmp:
        path = qt.save(Path(tmp) / "g.qtc.safetensors")
        file_bytes = path.stat().st_size
    c = qt.generator.parameter_counts()
    return _row(
        (model, budget, arm, seed, lr),
        entry,
        start,
        fid,
        t0,
        weights=qt.layout.total,
        params=c["total"],
        source_params=c["qnn"] + c["mapping"],
        buckets=int(qt.generator.buckets),
        qubits=qt.generator.n_qubits,
        layers=qt.generator.ansatz.n_layers,
        file_bytes=file_bytes,
    )


def _fmt(values: list[float], metric: str) -> str:
    scale, unit = (100.0, "%") if metric == "agreement" else (1.0, "")
    m = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{m:.1f}{unit}" if unit else f"{m:.3f}"
    sd = statistics.stdev(values) * scale
    return f"{m:.1f} ± {sd:.1f}{unit}" if unit else f"{m:.3f} ± {sd:.3f}"


def current_bytes(model: str, budget: float) -> tuple[int, int]:
    """Generator file bytes of the QNN arm as this code base writes it: float32, float16.

    Sizes do not depend on the trained values, so they are measured on an untrained generator
    (the runs may have been made by an earlier version of the file format).
    """
    entry = load_entry(model, log=lambda _s: None)
    qt = compress(entry.model, QTConfig(scheme="hashed", budget=budget))
    with tempfile.TemporaryDirectory() as tmp:
        full = qt.save(Path(tmp) / "a.qtc.safetensors").stat().st_size
        qt.round_to("float16")
        half = qt.save(Path(tmp) / "b.qtc.safetensors").stat().st_size
    return full, half


def report(rows: list[dict[str, Any]]) -> str:
    """The markdown section: one table per model, arms side by side per budget."""
    lines = [
        f"Measured {machine()}; `python tools/bench_frontier.py` (two shards, one torch thread "
        f"each), {STEPS} distillation steps per arm, peak learning rate {LR} unless marked. "
        "Every arm is the hashed generator with the same hash, scales and exact vectors; only the "
        "shared values differ. Mean ± standard deviation over the seeds run (n in brackets). "
        "File bytes: the QNN arm's generator file as this code base writes it, float32 and "
        "float16, without ONNX graph and check batch (those add the same for every arm; the "
        "controls' files differ by their parameter count); ratio = checkpoint bytes / float16 "
        "file bytes. The QNN arms here ran on the log2 register (about one basis state per "
        "parameter: the qubits x layers shown), the default until 2026-12-05; the default "
        "register's QNN (up to 3 more qubits), its controls and the learning rates that suit "
        "each model are in the bench_wide section below.",
        "",
    ]
    below = {(r["model"], r["budget"]) for r in rows if "error" in r}
    rows = [r for r in rows if "error" not in r]
    main = [r for r in rows if r["lr"] == LR]
    by: dict[tuple[str, float, str], list[dict[str, Any]]] = defaultdict(list)
    for r in main:
        by[(r["model"], r["budget"], r["arm"])].append(r)
    arms = [a for a, _ in ARMS]
    best_classical: dict[tuple[str, float, str], dict[str, Any]] = {}
    for r in rows:
        if r["arm"] in CLASSICAL:
            key = (r["model"], r["budget"], r["arm"])
            if key not in best_classical or r["headline"] > best_classical[key]["headline"]:
                best_classical[key] = r
    for model in REPORTED:
        some = [r for r in main if r["model"] == model]
        if not some:
            continue
        metric = some[0]["metric"]
        lines += [
            f"**{model}** ({some[0]['weights']:,} weights, checkpoint "
            f"{some[0]['checkpoint_bytes']:,} B; {metric} with the original)",
            "",
            "| budget | params: QNN (qubits x layers) / table | QNN file bytes f32 / f16 (ratio) | "
            + " | ".join(arms)
            + " | low-rank (params) | pruning (kept; bytes) | tensor-train (params) "
            + "| subspace (params) |",
            "|---|---|---|" + "---|" * (len(arms) + len(CLASSICAL)),
        ]
        for b in sorted({r["budget"] for r in some} | set(BUDGETS)):
            q = by.get((model, b, "qnn"))
            if not q:
                if (model, b) in below:
                    lines.append(f"| {b:.2%} | below the smallest hashed generator | | |")
                continue
            cells = []
            for a in arms:
                rs = by.get((model, b, a), [])
                cells.append(
                    f"{_fmt([r['headline'] for r in rs], metric)} ({len(rs)})" if rs else "-"
                )
            r0 = q[0]
            full, half = current_bytes(model, b)
            ratio = r0["checkpoint_bytes"] / half
            table = by.get((model, b, "table"))
            table_params = f" / {table[0]['params']:,}" if table else ""
            for arm in CLASSICAL:
                c = best_classical.get((model, b, arm))
                if c is None:
                    cells.append("-")
                    continue
                size = f"{c['params']:,}" + (f"; {c['file_bytes']:,} B" if arm == "pruning" else "")
                cells.append(f"{_fmt([c['headline']], metric)} ({size}, lr {c['lr']:g})")
            lines.append(
                f"| {b:.2%} | {r0['params']:,} ({r0['qubits']} x {r0['layers']}){table_params} | "
                f"{full:,} / {half:,} ({ratio:.0f}x) | " + " | ".join(cells) + " |"
            )
        q8 = [r for r in rows if r["model"] == model and r["arm"] == "int8"]
        if q8:
            r8 = q8[-1]
            lines += [
                "",
                f"int8 of the original weights (one scale per tensor, no training): "
                f"{_fmt([r8['headline']], metric)} in {r8['file_bytes']:,} B "
                f"({r8['checkpoint_bytes'] / r8['file_bytes']:.1f}x).",
            ]
        lines.append("")
    for model in MODELS:
        swept = [
            r
            for r in rows
            if r["model"] == model and r["budget"] == 0.005 and r["seed"] == 0 and r["lr"] != LR
        ]
        if not swept:
            continue
        metric = swept[0]["metric"]
        lines += [
            "",
            f"Learning-rate sweep, {model} at 0.5% of M, seed 0 ({metric}):",
            "",
            "| arm | " + " | ".join(f"lr {lr:g}" for lr in (3e-3, LR, 3e-2)) + " |",
            "|---|---|---|---|",
        ]
        at = [r for r in rows if r["model"] == model and r["budget"] == 0.005 and r["seed"] == 0]
        for arm in ("qnn", "table", "mps"):
            got = {r["lr"]: r["headline"] for r in at if r["arm"] == arm}
            cells = [_fmt([got[lr]], metric) if lr in got else "-" for lr in (3e-3, LR, 3e-2)]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PLOT = Path(__file__).resolve().parents[1] / "docs" / "frontier.png"


def plot(rows: list[dict[str, Any]]) -> None:
    """Fidelity against generator bytes per model and arm (docs/frontier.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        r
        for r in rows
        if "error" not in r and (r["lr"] == LR or r.get("arm") in (*CLASSICAL, "int8"))
    ]
    fig, axes = plt.subplots(1, len(MODELS), figsize=(5 * len(MODELS), 4))
    for ax, model in zip(axes, MODELS, strict=True):
        for arm in ("qnn", "table", "mps", *CLASSICAL, "int8"):
            pts: dict[float, list[tuple[float, float]]] = defaultdict(list)
            for r in rows:
                if r["model"] == model and r["arm"] == arm:
                    pts[r["budget"]].append((r["file_bytes"], r["headline"]))
            if not pts:
                continue
            xs = [statistics.fmean(x for x, _ in v) for _, v in sorted(pts.items())]
            ys = [
                max(y for _, y in v) if arm in CLASSICAL else statistics.fmean(y for _, y in v)
                for _, v in sorted(pts.items())
            ]
            ax.plot(xs, ys, marker="o", label=arm)
        ax.set_xscale("log")
        ax.set_title(model)
        ax.set_xlabel("bytes as run (float32, no graph or check batch)")
        ax.set_ylabel("fidelity to the original")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=90)


def main(argv: list[str] | None = None) -> int:
    """Run a shard of the grid, or write the report from the results so far."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th run from i")
    ap.add_argument("--report", action="store_true", help="write docs/benchmarks.md and stop")
    ap.add_argument("--sweep", default=None, help="run only this model's learning-rate sweep")
    ap.add_argument("--classical", default=None, help="run only this model's classical arms")
    ap.add_argument(
        "--model", default=None, help="run only this model's main grid (any suite model)"
    )
    ap.add_argument("--arms", default=None, help="with --model: comma-separated arms to run")
    ap.add_argument(
        "--budgets", type=float, nargs="+", default=None, help="with --model: these budgets"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="with --model: these seeds")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.report:
        rows = [json.loads(line) for f in sorted(OUT.glob("*.jsonl")) for line in f.open()]
        md = report(rows)
        try:
            plot(rows)
            md += (
                "\n\n![fidelity against bytes](frontier.png)\n\nThe plot: the same runs at lr "
                "1e-2 (the classical arms at their best learning rate), against the bytes each "
                "run's files had when it ran (the hashed arms before the one-tensor packing of "
                "their scales, so 5-40% more than the table's current figures)."
            )
        except ImportError:
            md += "\n\n(no plot: matplotlib is not installed; pip install -e .[report])"
        print(md)
        write_section("bench_frontier", "Frontier: fidelity against generator bytes", md)
        return 0
    i, n = (int(x) for x in args.shard.split("/"))
    done = set()
    for f in OUT.glob("*.jsonl"):  # every shard's finished runs
        for line in f.open():
            r = json.loads(line)
            done.add((r["model"], r["budget"], r["arm"], r["seed"], r["lr"]))
    out = OUT / (
        f"sweep-{args.sweep}.jsonl"
        if args.sweep
        else f"classical-{args.classical}.jsonl"
        if args.classical
        else f"model-{args.model}.jsonl"
        if args.model
        else f"shard{i}of{n}.jsonl"
    )
    if args.sweep:
        runs = sweep(args.sweep)
    elif args.classical:
        runs = classical(args.classical)
    elif args.model:
        arms = set(args.arms.split(",")) if args.arms else None
        runs = model_grid(args.model, tuple(args.budgets or BUDGETS))
        runs = [r for r in runs if arms is None or r[2] in arms]
        runs = [r for r in runs if args.seeds is None or r[3] in args.seeds]
    else:
        runs = grid()
    for k, run in enumerate(runs):
        if k % n != i or run in done:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if run[2] == "int8":
                row = run_int8(run[0])
            elif run[2] in CLASSICAL:
                row = run_classical(*run)
            else:
                row = run_one(*run)
        if "error" in row:
            print(f"{run}: {row['error']}", flush=True)
        else:
            print(
                f"{run}: {row['metric']} {row['headline']:.4f} (start {row['start']:.4f}), "
                f"{row['params']:,} params, {row['file_bytes']:,} B, {row['seconds']:.0f} s",
                flush=True,
            )
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
