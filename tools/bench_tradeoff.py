"""Accuracy vs generator size on the shipped digits CNN (issue 6's trade-off curve).

For each generator configuration: phase 1 (reproduce the pretrained weights), then phase 2
(distillation from the original model), all seeded. Reports trainable generator parameters as a
share of M, phase-1 relative weight error and accuracy, final accuracy, and time. Includes a
classical control whose mapping never sees the QNN (``prob_transform="none"``).

Usage:
    python tools/bench_tradeoff.py                       # default grid, writes docs/benchmarks.md
    python tools/bench_tradeoff.py --finetune-steps 300 --no-write
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdoc import ROOT, machine, write_section  # noqa: E402

from qtcompress.api import compress  # noqa: E402
from qtcompress.config import QTConfig  # noqa: E402
from qtcompress.examples import DigitsCNN, accuracy, load_dataset  # noqa: E402

# (label, QTConfig fields)
GRID: list[tuple[str, dict[str, object]]] = [
    ("MLP (16, 16), chunk 32 [default]", {"chunk": 32, "hidden": (16, 16)}),
    ("MLP (16, 16), chunk 16", {"chunk": 16, "hidden": (16, 16)}),
    ("MLP (8, 8), chunk 64", {"chunk": 64, "hidden": (8, 8)}),
    ("MLP (8), chunk 32", {"chunk": 32, "hidden": (8,)}),
    ("MPS bond 4, chunk 32", {"chunk": 32, "mapping": "mps", "bond_dim": 4}),
    (
        "control: QNN cut off, MLP (16, 16), chunk 32",
        {"chunk": 32, "hidden": (16, 16), "prob_transform": "none"},
    ),
]


def run_one(
    fields: dict[str, object], fit_steps: int, finetune_steps: int, seed: int, finetune_lr: float
) -> dict[str, float]:
    data = load_dataset("digits", seed=0)
    model = DigitsCNN()
    model.load_state_dict(load_file(str(ROOT / "models" / "digits_cnn.safetensors")))
    model.eval()
    start = time.perf_counter()
    qt = compress(
        model,
        QTConfig(
            scheme="flat",
            n_layers=8,
            seed=seed,  # as published
            **fields,
        ),
    )  # type: ignore[arg-type]
    rep = qt.report()
    if fit_steps:
        qt.fit_weights(steps=fit_steps, lr=2e-2, progress=False)
    phase1_error = qt.weight_errors()["_total"]
    phase1_acc = accuracy(qt.materialize(), data.x_test, data.y_test)
    qt.finetune(
        data.x_train,
        mode="distill",
        steps=finetune_steps,
        lr=finetune_lr,
        batch_size=64,
        progress=False,
    )
    return {
        "M": rep.generated_weights,
        "trainable": rep.trainable,
        "ratio": rep.ratio,
        "base": accuracy(model, data.x_test, data.y_test),
        "phase1_error": phase1_error,
        "phase1_acc": phase1_acc,
        "final": accuracy(qt.materialize(), data.x_test, data.y_test),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--fit-steps", type=int, default=300)
    ap.add_argument("--finetune-steps", type=int, default=3000)
    ap.add_argument("--finetune-lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    lines = [
        f"Measured {machine()}. Shipped digits CNN (`models/digits_cnn.safetensors`, "
        f"M = 6,186 weights incl. BatchNorm affine), 1,437 train / 360 test images. "
        f"QNN: 8 layers, qubits = the fewest that cover M / chunk. Phase 1: "
        f"{args.fit_steps} steps (lr 2e-2); phase 2: {args.finetune_steps} distillation steps "
        f"(lr {args.finetune_lr:g}, cosine, batch 64); seed {args.seed}; one run per row "
        "(one test image = 0.28 points).",
        "",
        "| generator | trainable / M | phase-1 rel. weight error | phase-1 accuracy "
        "| fine-tuned accuracy | original | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, fields in GRID:
        r = run_one(fields, args.fit_steps, args.finetune_steps, args.seed, args.finetune_lr)
        row = (
            f"| {label} | {int(r['trainable']):,} / {int(r['M']):,} = {r['ratio']:.1%} "
            f"| {r['phase1_error']:.3f} | {r['phase1_acc']:.2%} | **{r['final']:.2%}** "
            f"| {r['base']:.2%} | {r['seconds']:.0f} |"
        )
        print(row, flush=True)
        lines.append(row)
    markdown = "\n".join(lines)
    if not args.no_write:
        write_section(
            "bench_tradeoff",
            "Accuracy vs generator size on digits (`tools/bench_tradeoff.py`)",
            markdown,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
