"""More buckets than parameters: the hashed QNN generator with a wider register, and its controls.

A register of ``n = log2(allowance)`` qubits has about as many buckets (shared values) as
parameters, the regime where a free table of the same size (HashedNets) does at least as well.
A QNN can do what a table cannot: ``n * L`` angles make ``2**n`` values, many more buckets than
parameters (fewer weights sharing each value). This tool spends the same allowance on the
log2 register, the default register (up to 3 qubits wider, see
:func:`qtcompress.generator.hashed.default_qubits`) and 14 and 16 qubits (fewer layers), against
the free table and controls over the same register: a frozen random probability vector (only
the scales train), an MPS Born machine with the allowance, and zeros.

Run: ``python tools/bench_wide.py --models cnn rnn --seeds 0 --budgets 0.005`` (minutes per
arm); writes
``build/wide/runs.jsonl`` and, with ``--write``, its section of docs/benchmarks.md.
Threads: torch and qsim 1, BLAS 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdoc import machine, write_section  # noqa: E402
from suite import capped_layers, load_entry  # noqa: E402

from qtcompress import QTConfig, compress, limits  # noqa: E402
from qtcompress.generator.hashed import log2_qubits  # noqa: E402
from qtcompress.qnn.backends import set_threads  # noqa: E402
from qtcompress.train.lr_probe import LR_FACTORS  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "build" / "wide" / "runs.jsonl"
BUDGET = 0.005
STEPS = 300
LR = 1e-2
# (arm, values source, register: None = the default (default_qubits), "log2" = log2_qubits,
# or a qubit count)
ARMS: tuple[tuple[str, str, int | str | None], ...] = (
    ("qnn, log2 register", "qnn", "log2"),
    ("qnn, 14 qubits", "qnn", 14),
    ("qnn, 16 qubits", "qnn", 16),
    ("table (HashedNets)", "table", None),
    ("frozen, 16 qubits", "frozen", 16),
    ("mps, 16 qubits", "mps", 16),
    ("frozen, 14 qubits", "frozen", 14),
    ("mps, 14 qubits", "mps", 14),
    ("qnn (default register)", "qnn", None),
    ("frozen (default register)", "frozen", None),
    ("mps (default register)", "mps", None),
    ("zeros (default register)", "zeros", None),
)


def run(
    model: str,
    arm: str,
    values: str,
    qubits: int | str | None,
    seed: int,
    lr: float = LR,
    budget: float = BUDGET,
    lr_probe: bool = False,
    source_lr_factor: float = 1.0,
    max_layers: int | None = None,
) -> dict[str, Any]:
    """Compress at ``budget``, fine-tune :data:`STEPS` steps, score on the test split.

    ``max_layers`` caps the QNN's layers on its register (the rest of the budget unspent):
    what the circuit's depth, which its cost grows with, buys.
    """
    entry = load_entry(model, log=lambda _s: None)
    default = compress(entry.model, QTConfig(budget=budget, seed=seed)).config
    assert default.allowance is not None
    config = QTConfig(budget=budget, values=values, seed=seed)
    if qubits is not None:  # the same allowance on another register: other layers
        n = log2_qubits(default.allowance) if qubits == "log2" else int(qubits)
        layers = min(limits.MAX_LAYERS, max(1, default.allowance // n))
        config = QTConfig(budget=budget, values=values, seed=seed, n_qubits=n, n_layers=layers)
    if max_layers is not None:
        config = capped_layers(entry.model, config, max_layers)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    qt = compress(entry.model, config)
    factors = LR_FACTORS if lr_probe else ()
    fit = qt.finetune(
        entry.train_inputs,
        steps=STEPS,
        lr=lr,
        progress=False,
        lr_probe=factors,
        source_lr_factor=source_lr_factor,
    )
    fid = qt.evaluate(entry.test_inputs, entry.test_labels)
    counts = qt.generator.parameter_counts()
    return {
        "model": model,
        "budget": budget,
        "arm": (arm if lr == LR else f"{arm}, lr {lr:g}")
        + (f", source lr x{source_lr_factor:g}" if source_lr_factor != 1.0 else "")
        + (", lr probe" if lr_probe else "")
        + (f", at most {max_layers} layers" if max_layers is not None else ""),
        "seed": seed,
        "lr": lr,
        "buckets": int(qt.generator.buckets),
        "qubits": qt.generator.n_qubits,
        "layers": qt.generator.ansatz.n_layers,
        "params": counts["total"],
        "headline": fid.headline,
        "metric": fid.headline_name,
        "seconds": round(time.perf_counter() - t0, 1),
        "lr_tried": fit.lr_tried,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per model and arm, mean ± sd over seeds."""
    lines = [
        f"Measured {machine()}; `python tools/bench_wide.py`, 1 thread, hashed generator, "
        f"{STEPS} distillation steps at lr {LR} unless named; one row per "
        "arm, mean ± "
        "sd over the seeds run (n). Buckets: shared values; params: trainable (the source's "
        "plus the scales and exact vectors, the same for every arm up to the source's "
        "rounding). Default register: the log2 register widened by up to 3 qubits "
        "(`default_qubits`; at 0.5% of M the same register as the 14-qubit arm).",
        "",
        "| model | budget | arm | qubits x layers | buckets | params | fidelity (n) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        r.setdefault("budget", BUDGET)  # rows from before the budgets option
    # A rerun of the same arm and seed replaces the earlier row (the runs are deterministic).
    rows = list({(r["model"], r["budget"], r["arm"], r["seed"]): r for r in rows}.values())
    models = list(dict.fromkeys(r["model"] for r in rows))  # in the order first run
    groups = sorted(
        {(r["model"], r["budget"]) for r in rows}, key=lambda g: (models.index(g[0]), g[1])
    )
    for model, budget in groups:
        arms = [a for a, _v, _q in ARMS]
        arms += sorted({r["arm"] for r in rows if r["arm"] not in arms})  # other learning rates
        for arm in arms:
            got = [
                r for r in rows if r["model"] == model and r["budget"] == budget and r["arm"] == arm
            ]
            if not got:
                continue
            values = [r["headline"] for r in got]
            scale = 100.0 if got[0]["metric"] == "agreement" else 1.0
            mean = statistics.fmean(values) * scale
            sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
            shape = (
                f"{got[0]['qubits']} x {got[0]['layers']}"
                if arm.startswith("qnn")
                else "-"
                if arm.startswith("table")
                else f"{got[0]['qubits']} bits"
            )
            digits = 1 if scale == 100.0 else 3  # agreement in %, cosine as is
            lines.append(
                f"| {model} | {budget:.1%} | {arm} | {shape} | {got[0]['buckets']:,} | "
                f"{got[0]['params']:,} | "
                f"{mean:.{digits}f} ± {sd:.{digits}f} ({len(values)}) |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the arms (appending to the jsonl file) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "rnn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--arms", nargs="+", type=int, help="indices into ARMS")
    parser.add_argument("--lr", type=float, default=LR, help=f"peak learning rate ({LR:g})")
    parser.add_argument("--budgets", nargs="+", type=float, default=[BUDGET])
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--lr-probe", action="store_true", help="pick the rate by trial fits")
    parser.add_argument(
        "--source-lr-factor", type=float, default=1.0, help="the shared values' rate multiple"
    )
    parser.add_argument("--max-layers", type=int, default=None, help="cap the QNN's layers")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    set_threads(1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        arms = [ARMS[i] for i in args.arms] if args.arms else list(ARMS)
        for seed in args.seeds:
            for model in args.models:
                for budget in args.budgets:
                    for arm, values, qubits in arms:
                        row = run(
                            model,
                            arm,
                            values,
                            qubits,
                            seed,
                            args.lr,
                            budget,
                            args.lr_probe,
                            args.source_lr_factor,
                            args.max_layers,
                        )
                        print(json.dumps(row), flush=True)
                        with OUT.open("a") as f:
                            f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in OUT.read_text().splitlines()] if OUT.exists() else []
    text = table(rows)
    print(text)
    if args.write:
        write_section("bench_wide", "More buckets than parameters (bench_wide.py)", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
