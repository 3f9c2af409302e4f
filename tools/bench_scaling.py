"""Generator bytes as M grows: one MLP family at several widths, 1e5 to ~1e8 weights.

The polylog claim tested, not assumed. Each width of ``WideMLP`` (784 -> w -> w -> 10, no
BatchNorm; ``tools/suite.py``) is trained on the digits upsampled to 28x28, then compressed by
the hashed scheme in two ways, fine-tuned by distillation for the same steps and scored by
top-1 agreement with the original on the held-out images:

* ``fixed``: a generator of a fixed size whatever M (``FIXED`` parameters, per-tensor scales,
  hashed vectors): a QNN of at most 12 qubits x 256 layers and a few scales. This is the
  polylog regime: its parameters do not grow with M at all;
* ``default``: the tool's default, 0.5% of M (per-row scales where they fit).

Reported per width: M, the checkpoint's bytes, each arm's generator parameters, float16 file
bytes (without ONNX graph and check batch, which grow with the architecture, not with M) and
agreement after the float16 rounding. One seed; the teachers are cached in
``build/scaling/``.

Run: ``python tools/bench_scaling.py`` (results appended to ``build/scaling/runs.jsonl``;
widths already run are skipped), then ``python tools/bench_scaling.py --report``.
Threads: ``--threads`` (default 2) for torch, BLAS and qsim.
"""

from __future__ import annotations

import os
import sys

THREADS = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(THREADS))

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdoc import machine, write_section  # noqa: E402
from suite import WideMLP, _fit_classifier, digits_split, upsample  # noqa: E402

from qtcompress import QTConfig, compress  # noqa: E402
from qtcompress.qnn.backends import set_threads  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "build" / "scaling"
WIDTHS = (96, 384, 1536, 4096, 8192)
FIXED = 4096  # parameters of the fixed-size arm, whatever M
STEPS = 300
RECIPE = {"epochs": 15, "batch_size": 64, "lr": 1e-3, "warmup": 20, "seed": 0}


def teacher(width: int, log: Any = print) -> tuple[WideMLP, float]:
    """The trained MLP of this width (cached) and the seconds its training took (0 if cached)."""
    path = OUT / f"mlp{width}.safetensors"
    model = WideMLP(hidden=(width, width))
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval(), 0.0
    split = digits_split()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    _fit_classifier(
        model, upsample(split.x_train).flatten(1), split.y_train, RECIPE, log, f"mlp{width}"
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval(), time.perf_counter() - t0


def run_width(width: int) -> list[dict[str, Any]]:
    """Both arms at one width; one row each."""
    model, train_s = teacher(width)
    split = digits_split()
    x_train = upsample(split.x_train).flatten(1)
    x_test = upsample(split.x_test).flatten(1)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == split.y_test).float().mean())
    weights = sum(p.numel() for p in model.parameters())
    rows = []
    arms = {
        "fixed": QTConfig(scheme="hashed", budget=FIXED, row_scales=False),
        "default": QTConfig(),
    }
    for arm, config in arms.items():
        t0 = time.perf_counter()
        torch.manual_seed(0)
        qt = compress(model, config)
        qt.finetune(x_train, steps=STEPS, progress=False)
        qt.round_to("float16")
        fid = qt.evaluate(x_test, split.y_test)
        with tempfile.TemporaryDirectory() as tmp:
            file_bytes = qt.save(Path(tmp) / "g.qtc.safetensors").stat().st_size
        rows.append(
            {
                "width": width,
                "arm": arm,
                "weights": weights,
                "checkpoint_bytes": 4 * weights,
                "teacher_accuracy": accuracy,
                "teacher_seconds": round(train_s, 1),
                "params": qt.report().trainable,
                "qubits": qt.generator.n_qubits,
                "layers": qt.generator.ansatz.n_layers,
                "file_bytes": file_bytes,
                "agreement": fid.headline,
                "accuracy": fid.accuracy,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del qt
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    """The markdown table: one line per width, both arms side by side."""
    by = {(r["width"], r["arm"]): r for r in rows}
    widths = sorted({r["width"] for r in rows})
    lines = [
        f"Measured {machine()}; `python tools/bench_scaling.py` ({THREADS} thread(s)), one seed, "
        f"{STEPS} distillation steps at the hashed scheme's learning rate. The family: "
        "`WideMLP` 784 -> w -> w -> 10 without BatchNorm, trained on the digits upsampled to "
        f"28x28. `fixed`: the hashed generator with a budget of {FIXED:,} parameters whatever "
        "M (per-tensor scales, hashed biases; the QNN is capped at 12 qubits x 256 layers, so "
        "3,081-3,853 are spent): constant in M, the polylog end; `default`: 0.5% of M. "
        "Bytes: the float16 generator file without ONNX graph and check batch; agreement "
        "after the float16 rounding, on 359 held-out images.",
        "",
        "| width | M | checkpoint B | original acc. | fixed: params | fixed: file B (ratio) "
        "| fixed: agreement | default: params | default: file B (ratio) | default: agreement |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in widths:
        f, d = by.get((w, "fixed")), by.get((w, "default"))
        base = f or d
        if base is None:
            continue
        cells = []
        for r in (f, d):
            if r is None:
                cells += ["-", "-", "-"]
                continue
            ratio = r["checkpoint_bytes"] / r["file_bytes"]
            cells += [
                f"{r['params']:,} ({r['qubits']} x {r['layers']})",
                f"{r['file_bytes']:,} ({ratio:,.0f}x)",
                f"{100 * r['agreement']:.1f}%",
            ]
        lines.append(
            f"| {w:,} | {base['weights']:,} | {base['checkpoint_bytes']:,} | "
            f"{100 * base['teacher_accuracy']:.1f}% | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the widths not yet run, or write the report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--report", action="store_true", help="write docs/benchmarks.md and stop")
    ap.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    ap.add_argument("--threads", type=int, default=THREADS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    set_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    runs = OUT / "runs.jsonl"
    rows = [json.loads(line) for line in runs.open()] if runs.exists() else []
    if args.report:
        md = report(rows)
        print(md)
        write_section("bench_scaling", "Generator bytes as M grows (1e5 to 1e8)", md)
        return 0
    done = {r["width"] for r in rows}
    for width in args.widths:
        if width in done:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = run_width(width)
        with runs.open("a") as f:
            for r in new:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
