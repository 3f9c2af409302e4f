"""Fine-tuning time with the teacher's outputs computed once against per step.

For suite models at the default generator (hashed, 0.5% of M), ``QTModel.finetune`` runs the
same steps on the same in-memory training data twice: with the teacher's outputs computed once
before the loop (the default since 2026-12-05, :func:`qtcompress.train.finetune.teacher_outputs`)
and with that cache turned off (the original's forward pass every step, as before). The two
arms alternate round by round so that machine noise falls on both alike; each time includes the
cache's own pass over the training data. The fine-tuned generators are compared too: the cache
changes where the teacher runs, not what it outputs.

Run: ``python tools/bench_teacher_cache.py`` (a few minutes, on a quiet machine); writes its
section of docs/benchmarks.md. Threads: torch and qsim 1, BLAS 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdoc import machine, write_section  # noqa: E402
from suite import load_entry  # noqa: E402

from qtcompress import QTConfig, compress  # noqa: E402
from qtcompress.data.sources import InputSource  # noqa: E402
from qtcompress.qnn.backends import set_threads  # noqa: E402
from qtcompress.train import finetune as finetune_module  # noqa: E402


def run(entry, steps: int, cached: bool) -> tuple[float, list[float]]:  # noqa: ANN001
    """Seconds of ``steps`` fine-tuning steps (the cache's pass included), and the losses."""
    limit = finetune_module.TEACHER_CACHE_BYTES
    finetune_module.TEACHER_CACHE_BYTES = limit if cached else 0
    try:
        qt = compress(entry.model, QTConfig())
        result = qt.finetune(entry.train_inputs, steps=steps, progress=False)
    finally:
        finetune_module.TEACHER_CACHE_BYTES = limit
    return result.elapsed_s, result.history


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write its section of docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "rnn", "encoder"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    set_threads(1)
    rows = []
    for name in args.models:
        entry = load_entry(name)
        times: dict[bool, list[float]] = {True: [], False: []}
        losses: dict[bool, list[float]] = {}
        for _ in range(args.rounds):
            for cached in (False, True):
                seconds, history = run(entry, args.steps, cached)
                times[cached].append(seconds)
                losses[cached] = history
        with_cache, without = statistics.median(times[True]), statistics.median(times[False])
        gap = max(abs(a - b) for a, b in zip(losses[True], losses[False], strict=True))
        rows.append(
            f"| {name} | {entry.weights:,} | {InputSource.of(entry.train_inputs).n:,} | "
            f"{without / args.steps * 1e3:.1f} | {with_cache / args.steps * 1e3:.1f} | "
            f"{without / with_cache:.2f}x | {gap:.1e} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"Measured {machine()}; `python tools/bench_teacher_cache.py`, 1 thread (torch, "
            f"qsim, BLAS), default generator (hashed, 0.5% of M), {args.steps} fine-tuning "
            f"steps of batch 64 per run, median of {args.rounds} interleaved rounds; a run's "
            "time includes the cache's pass over the training data. Loss difference: the "
            "largest gap between the two runs' training losses in the last round (0 where the "
            "teacher's outputs come out bit-identical in batches of 256 and of 64; otherwise "
            "they differ by float rounding, 4e-9 on the rnn, and the trajectories drift apart).",
            "",
            "| model | weights | training rows | ms per step, teacher every step | ms per step, "
            "outputs once | speed-up | loss difference |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if not args.no_write:
        write_section("bench_teacher_cache", "Teacher outputs computed once", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
