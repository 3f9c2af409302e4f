"""Time one fit step of the QT generator, split into its parts, for models of growing size.

For each size (weights of a 2-layer MLP, 64 inputs, 10 outputs, batch 64) one fine-tuning step
is split into:

* sim: QNN probabilities forward (qsim) + adjoint gradient backward;
* mapping: mapping network + per-tensor affine, forward and backward;
* model: the model's own forward and backward via ``torch.func.functional_call``;

plus the peak resident memory of a fresh process doing it. Each size runs in its own
subprocess so peaks do not mix. The table replaces the text between
``<!-- bench_fit:start -->`` and ``<!-- bench_fit:end -->`` in docs/benchmarks.md.

Usage: python tools/bench_fit.py [--sizes 1e3 1e4 1e5 1e6] [--steps 5] [--max-qubits 12]
       [--no-write]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdoc import ROOT, machine, write_section  # noqa: E402


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(size: int, steps: int, max_qubits: int, n_layers: int) -> dict[str, float]:
    """Run in a fresh process: build a model of ~size weights and time ``steps`` fit steps."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    sys.path.insert(0, str(ROOT))
    from qtcompress.api import compress
    from qtcompress.config import QTConfig

    torch.set_num_threads(2)
    torch.manual_seed(0)
    hidden = max(1, round((size - 10) / 75))  # 64h + h + 10h + 10 weights
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).eval()
    x = torch.randn(64, 64)
    y = torch.randint(0, 10, (64,))
    rss0 = _rss_mib()
    qt = compress(
        model,
        QTConfig(
            scheme="flat",
            chunk=None,
            chunk_max_qubits=max_qubits,
            n_layers=n_layers,
            hidden=(16, 16),
        ),
    )
    gen, fm = qt.generator, qt.functional
    parts = {"sim": 0.0, "mapping": 0.0, "model": 0.0}
    for i in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        feats = gen.features()  # QNN forward (qsim) + transform
        t1 = time.perf_counter()
        x_leaf = feats.detach().requires_grad_()
        w = gen.generate_from_features(x_leaf)
        t2 = time.perf_counter()
        w_leaf = w.detach().requires_grad_()
        loss = F.cross_entropy(fm(x, generated=gen.generate_named(w_leaf)), y)
        loss.backward()
        t3 = time.perf_counter()
        w.backward(w_leaf.grad)
        t4 = time.perf_counter()
        feats.backward(x_leaf.grad)  # adjoint gradient through qsim
        t5 = time.perf_counter()
        gen.zero_grad(set_to_none=True)
        if i >= 2:
            parts["sim"] += (t1 - t0) + (t5 - t4)
            parts["mapping"] += (t2 - t1) + (t4 - t3)
            parts["model"] += t3 - t2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rep = qt.report()
    out = {k: 1000 * v / steps for k, v in parts.items()}
    out.update(
        M=rep.generated_weights,
        trainable=rep.trainable,
        qubits=rep.n_qubits,
        chunk=rep.chunk,
        peak_mib=peak,
        setup_rss_mib=rss0,
    )
    out["total"] = out["sim"] + out["mapping"] + out["model"]
    return out


def table(rows: list[dict[str, float]], steps: int, n_layers: int) -> str:
    """Markdown table of the measured rows."""
    lines = [
        f"Fit step time (ms, mean of {steps} steps after 2 warm-up) of a 2-layer MLP (batch 64), "
        f"QNN {n_layers} layers, MLP mapping (16, 16). Measured {machine()}; "
        "written by `tools/bench_fit.py`.",
        "",
        "| M | qubits | chunk | trainable | sim (ms) | mapping (ms) | model f+b (ms) | "
        "total (ms) | peak RSS (MiB) | RSS before compress (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['M']:,} | {r['qubits']} | {r['chunk']} | {r['trainable']:,} | {r['sim']:.2f} | "
            f"{r['mapping']:.2f} | {r['model']:.2f} | {r['total']:.2f} | {r['peak_mib']:.0f} | "
            f"{r['setup_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--max-qubits", type=int, default=12)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--one", type=float, help=argparse.SUPPRESS)  # child-process mode
    a = ap.parse_args(argv)
    if a.one is not None:
        print(json.dumps(measure(int(a.one), a.steps, a.max_qubits, a.layers)))
        return
    rows = []
    for size in a.sizes:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(size),
            "--steps",
            str(a.steps),
            "--max-qubits",
            str(a.max_qubits),
            "--layers",
            str(a.layers),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    text = table(rows, a.steps, a.layers)
    print(text)
    if not a.no_write:
        write_section(
            "bench_fit", "Fit step time and memory vs model size (`tools/bench_fit.py`)", text
        )


if __name__ == "__main__":
    main()
