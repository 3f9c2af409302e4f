"""Fidelity of a compressed CTC line recogniser: the suite's ``crnn`` through the real pipeline.

Issue 24's target: a conv + BiLSTM CTC model trained on rendered text lines (``tools/suite.py``,
entry ``crnn``), compressed at the default budget (hashed scheme, 0.5% of M) and at 5% of M:
the character error rate of the student's greedy decodes against the original's must be at
most 2%.

Each run is :func:`qtcompress.pipeline.run_pipeline` with ``output_kind="ctc"`` (phase 1,
phase 2 distilled on the training lines, storage rounding, generator file, ONNX export and
check), then the exported graph is run with onnxruntime on the held-out lines and measured:

* CER of the student's greedy decodes against the original's (``1 - decode_agreement``), and
  against the true strings (with the original's own CER beside it);
* per-frame agreement (best class equal) and lines decoded exactly as the original does;
* the pipeline's own figures on the rounded generator (``fidelity_finetuned``);
* generator file bytes against the checkpoint's, and seconds per phase.

Run: ``python tools/bench_ctc.py`` (both budgets, seed 0); ``--budgets default,0.05 --seeds
0,1 --steps 1500``. Appends one JSON line per run to ``build/ctc/runs.jsonl`` and prints a
Markdown table. Threads: torch ``--threads`` (default 2); ``OMP_NUM_THREADS``,
``MKL_NUM_THREADS`` and ``OPENBLAS_NUM_THREADS`` are set before torch loads.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402
from benchdoc import machine  # noqa: E402

from qtcompress import QTConfig  # noqa: E402
from qtcompress.examples import Split  # noqa: E402
from qtcompress.pipeline import PipelineSettings, run_pipeline  # noqa: E402
from qtcompress.train.objectives import decode_agreement  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "ctc"
TARGET_CER = 0.02  # issue 24: student decodes against the original's


def source_state() -> str:
    """The commit the run measured, with ``+dirty`` when qtcompress/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "qtcompress"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{'+dirty' if dirty else ''}" if head else "unknown"


SOURCE = source_state()  # at import: the qtcompress code this process runs


def config_for(budget: str, seed: int) -> QTConfig:
    """``"default"``: ``QTConfig()`` as shipped (hashed, 0.5% of M); else ``budget=float``."""
    if budget == "default":
        return QTConfig(seed=seed)
    return QTConfig(budget=float(budget), seed=seed)


def onnx_scores(path: Path, x: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """The exported graph's outputs for ``x``, in batches, through onnxruntime on one thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i : i + batch].numpy()})[0] for i in range(0, len(x), batch)]
    return torch.from_numpy(np.concatenate(outs))


def measure(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """CTC figures of student scores against the teacher's and the true strings."""
    s_dec, t_dec = suite.ctc_decode(student), suite.ctc_decode(teacher)
    return {
        "cer_vs_original": 1.0 - decode_agreement(student, teacher),
        "cer_vs_original_uncapped": suite.character_error_rate(s_dec, t_dec),
        "frame_agreement": float((student.argmax(-1) == teacher.argmax(-1)).float().mean()),
        "lines_equal_original": float(np.mean([a == b for a, b in zip(s_dec, t_dec, strict=True)])),
        "cer_student_vs_truth": suite.character_error_rate(s_dec, labels),
        "cer_original_vs_truth": suite.character_error_rate(t_dec, labels),
    }


def run_one(
    entry: Any,
    budget: str,
    seed: int,
    steps: int,
    fit_steps: int,
    keep: Path | None,
    lr: float | None = None,
) -> dict[str, Any]:
    """One pipeline run, measured on the held-out lines through the exported ONNX graph."""
    empty = torch.empty(0, dtype=torch.int64)  # distillation only: the labels stay here
    data = Split(entry.train_inputs, empty, entry.test_inputs, empty)
    settings = PipelineSettings(
        output_kind="ctc",
        fit_steps=fit_steps,
        finetune_steps=steps,
        finetune_lr=lr,
        latency_repeats=1,
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = keep / f"crnn-{budget}-s{seed}" if keep else Path(tmp) / "out"
        r = run_pipeline(
            entry.model,
            config_for(budget, seed),
            data,
            out,
            name="crnn",
            settings=settings,
            checkpoint_bytes=entry.checkpoint.stat().st_size,
            log=lambda msg: print(f"  [{budget} s{seed}] {msg}", flush=True),
        )
        pipeline_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        student = onnx_scores(Path(r.files["onnx"]), entry.test_inputs)
        onnx_eval_s = time.perf_counter() - t1
    teacher = suite.predict(entry.model, entry.test_inputs)
    figures = measure(student, teacher, entry.test_labels)
    f1, f2 = r.fidelity_phase1, r.fidelity_finetuned
    return {
        "model": "crnn",
        "budget": budget,
        "seed": seed,
        "scheme": r.scheme,
        "budget_resolved": r.budget,
        "finetune_steps": steps,
        "finetune_lr": r.finetune_lr,  # the rate it ran at (given, or the default's)
        "finetune_lr_reason": r.finetune_lr_reason,
        "fit_steps": fit_steps,
        "weights": r.generated_weights,
        "original_params": r.original_params,
        "generator_params": r.generator_params,
        "generator_pct_of_M": 100.0 * r.generator_params / r.generated_weights,
        "n_qubits": r.n_qubits,
        "n_layers": r.n_layers,
        "storage": r.storage,
        "test_lines": len(entry.test_labels),
        **{f"onnx_{k}": v for k, v in figures.items()},
        "pipeline_decode_agreement_phase1": f1["decode_agreement"],
        "pipeline_decode_agreement": f2["decode_agreement"],
        "pipeline_frame_agreement": f2["agreement"],
        "pipeline_correlation": f2["correlation"],
        "pipeline_degenerate": f2["degenerate"],
        "phase1_rel_weight_error": r.phase1_rel_weight_error,
        "onnx_max_abs_diff": r.onnx_max_abs_diff,
        "generator_file_bytes": r.generator_file_bytes,
        "checkpoint_bytes": r.checkpoint_bytes,
        "onnx_bytes": r.onnx_bytes,
        "file_ratio": (
            r.checkpoint_bytes / r.generator_file_bytes if r.checkpoint_bytes is not None else None
        ),
        "fit_s": r.fit_s,
        "finetune_s": r.finetune_s,
        "pipeline_total_s": r.total_s,
        "other_s": r.total_s - r.fit_s - r.finetune_s,
        "onnx_eval_s": onnx_eval_s,
        "wall_s": pipeline_s + onnx_eval_s,
        "meets_target": figures["cer_vs_original"] <= TARGET_CER,
        "warnings": r.warnings,
        # Each phase's loss every 50 steps: when (whether) the student left the all-blank start.
        "loss_every_50": {k: [round(v, 4) for v in h[::50]] for k, h in r.histories.items()},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "source": SOURCE,
        "machine": machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| budget | seed | generator (% of M) | storage | CER vs original (ONNX) | "
        "frame agreement | lines = original | CER vs truth: student / original | "
        "pipeline decode agreement | generator file / checkpoint bytes | "
        "phase 1 / phase 2 / rest s | target CER <= 2% |",
        "|---|---:|---|---|---:|---:|---:|---|---:|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['seed']} | {r['generator_params']:,} "
            f"({r['generator_pct_of_M']:.2f}%) | {r['storage']} | "
            f"{r['onnx_cer_vs_original']:.2%} | {r['onnx_frame_agreement']:.2%} | "
            f"{r['onnx_lines_equal_original']:.1%} | {r['onnx_cer_student_vs_truth']:.2%} / "
            f"{r['onnx_cer_original_vs_truth']:.2%} | {r['pipeline_decode_agreement']:.2%} | "
            f"{r['generator_file_bytes']:,} / {r['checkpoint_bytes']:,} "
            f"({r['file_ratio']:.0f}x) | {r['fit_s']:.0f} / {r['finetune_s']:.0f} / "
            f"{r['other_s']:.0f} | {'yes' if r['meets_target'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--budgets",
        default="default,0.05",
        help="comma-separated: 'default' (QTConfig(), hashed 0.5%% of M) or fractions of M",
    )
    ap.add_argument("--seeds", default="0", help="comma-separated QTConfig seeds")
    ap.add_argument("--steps", type=int, default=1500, help="phase-2 (distillation) steps")
    ap.add_argument("--fit-steps", type=int, default=100, help="phase-1 steps")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--lr", type=float, default=None, help="phase-2 peak rate (the scheme's)")
    ap.add_argument("--out", type=Path, default=OUT / "runs.jsonl", help="JSON lines, appended")
    ap.add_argument("--keep", type=Path, default=None, help="keep each run's files under here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    entry = suite.load_entry("crnn")
    # The CTC entry records both (the other entries' may be None).
    assert entry.accuracy is not None and entry.test_labels is not None
    print(
        f"crnn: {entry.weights:,} weights, original CER vs truth {1 - entry.accuracy:.2%} on "
        f"{len(entry.test_labels):,} test lines; {entry.description}",
        flush=True,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for budget in args.budgets.split(","):
            row = run_one(entry, budget, seed, args.steps, args.fit_steps, args.keep, args.lr)
            rows.append(row)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{budget} seed {seed}: CER vs original {row['onnx_cer_vs_original']:.2%} "
                f"({row['wall_s']:.0f} s)",
                flush=True,
            )
    print()
    print(
        f"Measured {machine()}; torch threads {args.threads}; `python tools/bench_ctc.py "
        f"--budgets {args.budgets} --seeds {args.seeds} --steps {args.steps} --fit-steps "
        f"{args.fit_steps}{f' --lr {args.lr}' if args.lr else ''}`; "
        f"{len(entry.test_labels):,} held-out lines, student = the exported "
        "ONNX graph through onnxruntime."
    )
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
