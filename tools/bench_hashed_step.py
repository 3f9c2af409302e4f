"""Step cost of the hashed QT generator against the classical table of the same structure.

For suite models at 0.5% of M, a fine-tuning step (generate the weights, the model's forward
and backward, Adam) is timed with the shared values from the QNN (qsim forward + adjoint
gradient) and from a free table (HashedNets), interleaved round by round so that machine noise
falls on both alike; the QNN's own forward + gradient is timed apart. The frontier issue asks
for a QNN-heavy scheme within 1.2x of the classical generator's step.

Run: ``python tools/bench_hashed_step.py`` (a few minutes, on a quiet machine); writes its
section of docs/benchmarks.md. Threads: torch and qsim 1 (``--threads``), BLAS 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdoc import machine, write_section  # noqa: E402
from suite import capped_layers, load_entry  # noqa: E402

from qtcompress import QTConfig, compress  # noqa: E402
from qtcompress.data.sources import InputSource  # noqa: E402
from qtcompress.qnn.backends import set_threads  # noqa: E402
from qtcompress.train.objectives import distill_loss  # noqa: E402


def stepper(entry, values: str, max_layers: int | None = None):  # noqa: ANN001, ANN201
    """One distillation step of a fresh 0.5% hashed generator, as a zero-argument callable.

    ``max_layers`` caps the QNN's depth on its default register (the rest of the budget
    unspent).
    """
    config = QTConfig(scheme="hashed", budget=0.005, values=values)
    if max_layers is not None:
        config = capped_layers(entry.model, config, max_layers)
    qt = compress(entry.model, config)
    batch = InputSource.of(entry.train_inputs).head(64)
    with torch.no_grad():
        goal = batch.call(qt.teacher)
        goal = goal[0] if isinstance(goal, tuple) else goal
    params = [p for p in qt.generator.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    kind = "logits" if entry.output == "logits" else entry.output

    def step() -> None:
        opt.zero_grad()
        out = batch.call(qt.functional)
        out = out[0] if isinstance(out, tuple) else out
        loss = distill_loss(
            out, goal, {"logits": "kl", "probability": "bce"}.get(kind, "cosine"), 2.0
        )
        loss.backward()
        opt.step()

    return qt, step


def qnn_alone(source: Any) -> None:
    """The QNN source's forward and adjoint gradient on its own."""
    with torch.no_grad():  # new angles: the engine's state cache must not answer
        source.qnn.angles.add_(1e-6)
    (source() * torch.linspace(-1, 1, source.n_values)).sum().backward()


def timed(fn, repeats: int) -> float:  # noqa: ANN001
    """Median seconds of ``fn`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    """Time both arms per model, interleaved; print and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["cnn", "rnn", "encoder"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--max-layers", type=int, default=None, help="also time a QNN capped at this depth"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    set_threads(args.threads)
    rows = []
    for name in args.models:
        entry = load_entry(name, log=lambda _s: None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qnns = [stepper(entry, "qnn")]
            if args.max_layers is not None:
                qnns.append(stepper(entry, "qnn", args.max_layers))
            _, table_step = stepper(entry, "table")
        for _, step in qnns:
            step()  # warm-up
        table_step()
        q: list[list[float]] = [[] for _ in qnns]
        t = []
        for _ in range(args.rounds):  # interleaved rounds
            for times, (_, step) in zip(q, qnns, strict=True):
                times.append(timed(step, args.repeats))
            t.append(timed(table_step, args.repeats))
        for times, (qt, _) in zip(q, qnns, strict=True):
            alone = timed(partial(qnn_alone, qt.generator.source), args.repeats * args.rounds)
            rows.append(
                (
                    name,
                    qt.config.n_qubits,
                    qt.config.n_layers,
                    statistics.median(times),
                    statistics.median(t),
                    alone,
                )
            )
            r = rows[-1]
            print(
                f"{name} {r[1]} x {r[2]}: qnn step {r[3] * 1e3:.1f} ms, table step "
                f"{r[4] * 1e3:.1f} ms, ratio {r[3] / r[4]:.2f}x; QNN forward + gradient alone "
                f"{r[5] * 1e3:.1f} ms",
                flush=True,
            )
    lines = [
        f"Measured {machine()}; `python tools/bench_hashed_step.py"
        f"{f' --max-layers {args.max_layers}' if args.max_layers else ''}`, {args.threads} "
        f"thread(s), batch 64, median of {args.rounds} interleaved rounds of {args.repeats} "
        "steps; the default generator at 0.5% of M (its register and depth), and with "
        "`--max-layers` the same register capped at that depth.",
        "",
        "| model | QNN | QT step (ms) | table step (ms) | ratio | QNN forward + gradient (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name, n, layers, qs, ts, alone in rows:
        lines.append(
            f"| {name} | {n} x {layers} | {qs * 1e3:.1f} | {ts * 1e3:.1f} | {qs / ts:.2f}x | "
            f"{alone * 1e3:.1f} |"
        )
    md = "\n".join(lines)
    print(md)
    if not args.no_write:
        write_section("bench_hashed_step", "Hashed generator: QT step against the table's", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
