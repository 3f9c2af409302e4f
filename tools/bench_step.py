"""The price of a Quantum-Train step: QT fine-tuning step vs the plain step of the same model.

For an MLP, a CNN (no BatchNorm), an LSTM and a transformer encoder at ~1e5, 1e6 and 1e7
weights, one process per model times, interleaved (plain, QT, plain, QT, ...; medians):

* plain: a distillation step of the model itself, all weights trainable (student forward +
  backward, teacher forward, KL loss, Adam step);
* QT: the same step where the student's weights come from the generator (rows scheme, default
  budget 5% of M) and Adam updates the generator;

then splits the QT step into QNN (qsim forward + adjoint gradient), mapping body, heads
(materialising every weight from its low-rank factors, forward + backward), model (student +
teacher + loss), optimiser. The *floor* of the generator is what regenerating the weights must
cost on this machine: the heads' multiply-adds at the measured sgemm rate, or the weights'
bytes at the measured copy bandwidth, whichever is larger.

``--wait`` times the MLP 1e6 steps under several OpenMP idle-thread settings, quiet and next to
one competing 2-thread process (the evidence for the CLI's ``GOMP_SPINCOUNT=1000``).

``--phase1 1e8`` times phase-1 steps (weight loss, backward, Adam) on a 1e8-weight MLP with peak
resident memory, in its own process.

Threads: torch 2 intra-op threads, qsim 2 threads, ``OMP_NUM_THREADS=2``,
``OPENBLAS_NUM_THREADS=2``, ``GOMP_SPINCOUNT=1000`` (as the CLI sets it).

``--contention`` times the QNN (13 qubits, 8 layers, forward + adjoint gradient) through the
public API with torch imported first and no environment variables set, quiet and next to one
competing 2-thread process.

Usage: python tools/bench_step.py [--models mlp cnn lstm transformer] [--sizes 1e5 1e6 1e7]
       [--repeats 7] [--phase1 1e8] [--contention] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

THREADS = 2
ENV = {
    "OMP_NUM_THREADS": str(THREADS),
    "OPENBLAS_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
    "GOMP_SPINCOUNT": "1000",
}

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdoc import ROOT, machine, write_section  # noqa: E402


# -- models ------------------------------------------------------------------------------------
def build(kind: str, size: float) -> tuple[Any, Any]:
    """A model of about ``size`` weights and one input batch for it (seeded)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if kind == "mlp":  # 784 -> w -> w -> w -> 10: 2w^2 + 797w weights
        w = int((-797 + math.sqrt(797**2 + 8 * size)) / 4)
        model = nn.Sequential(
            nn.Linear(784, w),
            nn.ReLU(),
            nn.Linear(w, w),
            nn.ReLU(),
            nn.Linear(w, w),
            nn.ReLU(),
            nn.Linear(w, 10),
        )
        return model.eval(), torch.randn(64, 784)
    if kind == "cnn":  # four 3x3 convs (c, 2c, 4c, 4c), no BatchNorm: ~234 c^2 weights
        c = max(4, round(math.sqrt(size / 234)))
        model = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4 * c, 4 * c, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * c, 10),
        )
        return model.eval(), torch.randn(16, 3, 16, 16)
    if kind == "lstm":  # 2-layer LSTM over 16 steps: ~12 h^2 weights
        h = max(8, round(math.sqrt(size / 12)))

        class Recurrent(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lstm = nn.LSTM(32, h, num_layers=2, batch_first=True)
                self.head = nn.Linear(h, 10)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.head(self.lstm(x)[0][:, -1])

        return Recurrent().eval(), torch.randn(32, 16, 32)
    if kind == "transformer":  # embedding + 2 encoder layers (ff 4d): ~24 d^2 + 1000 d
        d = max(16, 8 * round((-1000 + math.sqrt(1000**2 + 96 * size)) / 48 / 8))

        class Encoder(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed = nn.Embedding(1000, d)
                layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
                self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
                self.head = nn.Linear(d, 10)

            def forward(self, ids: torch.Tensor) -> torch.Tensor:
                return self.head(self.encoder(self.embed(ids)).mean(1))

        return Encoder().eval(), torch.randint(0, 1000, (16, 32))
    raise SystemExit(f"unknown model kind {kind!r}")


# -- machine floors ----------------------------------------------------------------------------
def machine_rates() -> dict[str, float]:
    """Measured sgemm rate (GFLOP/s) and copy bandwidth (GB/s) of this process's threads."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    src, dst = torch.randn(1 << 24), torch.empty(1 << 24)
    gemm, copy = [], []
    for _ in range(7):
        t0 = time.perf_counter()
        torch.mm(a, b)
        gemm.append(2 * 1024**3 / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        dst.copy_(src)
        copy.append(2 * 4 * (1 << 24) / (time.perf_counter() - t0) / 1e9)
    return {"gflops": max(gemm), "gbps": max(copy)}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _reset_peak() -> bool:
    """Restart the kernel's resident-memory high-water mark (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# -- one model, in a fresh process ---------------------------------------------------------------
def measure(kind: str, size: float, repeats: int) -> dict[str, Any]:
    """Interleaved plain vs QT step medians, the QT step's parts, and the generator's floor."""
    import copy as copymod

    import torch

    sys.path.insert(0, str(ROOT))
    from qtcompress import compress
    from qtcompress.mapping import transform_probs
    from qtcompress.qnn.backends import set_threads
    from qtcompress.train.objectives import distill_loss

    set_threads(THREADS)
    model, x = build(kind, size)
    rates = machine_rates()
    with torch.no_grad():
        teacher_out = model(x)  # warm-up; teacher outputs are recomputed each step below

    def distill_step(forward: Any, opt: torch.optim.Optimizer) -> Any:
        """One distillation step: teacher forward, ``forward(x)``, KL, backward, Adam."""

        def step() -> None:
            with torch.no_grad():
                teacher = model(x)
            loss = distill_loss(forward(x), teacher, "kl", 2.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    student = copymod.deepcopy(model)
    for p in student.parameters():
        p.requires_grad_(True)
    plain_step = distill_step(student, torch.optim.Adam(student.parameters(), lr=1e-4, fused=True))
    qt = compress(model)
    gen, fm = qt.generator, qt.functional
    qt_opt = torch.optim.Adam(gen.parameters(), lr=1e-4, fused=True)
    qt_step = distill_step(fm, qt_opt)  # linear layers run on the factors (lowrank.py)
    dense_step = distill_step(lambda inp: fm(inp, generated=gen.generate_named()), qt_opt)

    parts: dict[str, list[float]] = {k: [] for k in ("qnn", "body", "heads", "model", "adam")}
    bits = gen._bits

    def split_step() -> None:
        t0 = time.perf_counter()
        probs = gen.qnn()
        t1 = time.perf_counter()
        p_leaf = probs.detach().requires_grad_()
        xin = transform_probs(p_leaf, gen.n_qubits, gen.prob_transform)[: gen.n_states]
        h = gen.body(torch.cat([bits, xin[:, None]], dim=1))
        t2 = time.perf_counter()
        h_leaf = h.detach().requires_grad_()
        made = [gen._tensor(h_leaf, i) for i in range(len(gen.views))]
        t3 = time.perf_counter()
        leaves = [t.detach().requires_grad_() for t in made]
        named = {n: t for s, t in zip(gen.layout.specs, leaves, strict=True) for n in s.names}
        with torch.no_grad():
            teacher = model(x)
        distill_loss(fm(x, generated=named), teacher, "kl", 2.0).backward()
        t4 = time.perf_counter()
        torch.autograd.backward(made, [t.grad for t in leaves])
        t5 = time.perf_counter()
        h.backward(h_leaf.grad)
        t6 = time.perf_counter()
        probs.backward(p_leaf.grad)
        t7 = time.perf_counter()
        qt_opt.step()
        qt_opt.zero_grad(set_to_none=True)
        t8 = time.perf_counter()
        for key, value in (
            ("qnn", (t1 - t0) + (t7 - t6)),
            ("body", (t2 - t1) + (t6 - t5)),
            ("heads", (t3 - t2) + (t5 - t4)),
            ("model", t4 - t3),
            ("adam", t8 - t7),
        ):
            parts[key].append(1000 * value)

    plain: list[float] = []
    qtt: list[float] = []
    dense: list[float] = []
    for i in range(repeats + 1):  # the first round is a warm-up
        for fn, out in ((plain_step, plain), (qt_step, qtt), (dense_step, dense)):
            t0 = time.perf_counter()
            fn()
            if i:
                out.append(1000 * (time.perf_counter() - t0))
    for _ in range(repeats + 1):
        split_step()
    parts = {k: v[1:] for k, v in parts.items()}
    m = gen.total
    macs = sum(gen.views[i][0] * gen.views[i][1] * k for i, k in enumerate(gen.ranks) if k)
    floor_ms = (
        max(
            3 * 2 * macs / (rates["gflops"] * 1e9),  # forward + two backward matmuls
            3 * 4 * m / (rates["gbps"] * 1e9),
        )
        * 1000
    )  # write W, read dW twice
    med = {k: statistics.median(v) for k, v in parts.items()}
    return {
        "kind": kind,
        "M": m,
        "trainable": gen.parameter_counts()["total"],
        "qubits": gen.n_qubits,
        "rank": gen.rank,
        "batch": int(x.shape[0]),
        "plain_ms": statistics.median(plain),
        "qt_ms": statistics.median(qtt),
        "dense_ms": statistics.median(dense),
        **{f"{k}_ms": v for k, v in med.items()},
        "generator_ms": med["qnn"] + med["body"] + med["heads"],
        "floor_ms": floor_ms,
        "gflops": rates["gflops"],
        "gbps": rates["gbps"],
        "peak_mib": _peak_mib(),
        "teacher_shape": list(teacher_out.shape),
    }


def measure_phase1(size: float, steps: int) -> dict[str, Any]:
    """Phase-1 steps of the rows generator on a ``size``-weight MLP: time and peak memory."""

    sys.path.insert(0, str(ROOT))
    from qtcompress import compress
    from qtcompress.qnn.backends import set_threads

    set_threads(THREADS)
    model, _ = build("mlp", size)
    weights_mib = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    rss_model = _rss_mib()
    t0 = time.perf_counter()
    qt = compress(model)
    setup_s = time.perf_counter() - t0
    rss_setup = _rss_mib()
    compress_peak = _status_mib("VmHWM")
    reset = _reset_peak()
    result = qt.fit_weights(steps=steps, lr=1e-3, progress=False)
    per_step = 1000 * result.elapsed_s / steps
    return {
        "M": qt.layout.total,
        "weights_mib": weights_mib,
        "rss_model_mib": rss_model,
        "rss_after_compress_mib": rss_setup,
        "peak_mib": _peak_mib(),
        "compress_peak_mib": compress_peak,
        "step_peak_mib": _status_mib("VmHWM") if reset else float("nan"),
        "compress_s": setup_s,
        "step_ms": per_step,
        "steps": steps,
        "trainable": qt.generator.parameter_counts()["total"],
    }


def measure_steps(kind: str, size: float, repeats: int) -> dict[str, float]:
    """Plain and QT step medians only (interleaved): the wait-policy sweep's measurement."""
    import copy as copymod

    import torch

    sys.path.insert(0, str(ROOT))
    from qtcompress import compress
    from qtcompress.qnn.backends import set_threads
    from qtcompress.train.objectives import distill_loss

    set_threads(THREADS)
    model, x = build(kind, size)
    student = copymod.deepcopy(model)
    for p in student.parameters():
        p.requires_grad_(True)
    qt = compress(model)
    runs: dict[str, tuple[Any, torch.optim.Optimizer]] = {
        "plain": (student, torch.optim.Adam(student.parameters(), lr=1e-4, fused=True)),
        "qt": (qt.functional, torch.optim.Adam(qt.generator.parameters(), lr=1e-4, fused=True)),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(repeats + 2):  # two warm-up rounds
        for name, (forward, opt) in runs.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                teacher = model(x)
            loss = distill_loss(forward(x), teacher, "kl", 2.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i > 1:
                times[name].append(1000 * (time.perf_counter() - t0))
    return {f"{k}_ms": statistics.median(v) for k, v in times.items()}


# OpenMP idle-thread settings compared by --wait (read once, when torch loads).
WAIT_VARIANTS: dict[str, dict[str, str]] = {
    "GOMP_SPINCOUNT=1000 (CLI default)": {"GOMP_SPINCOUNT": "1000"},
    "GOMP_SPINCOUNT=5000": {"GOMP_SPINCOUNT": "5000"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "nothing set (libgomp's default spin)": {},
}


def _competitor() -> subprocess.Popen[bytes]:
    """One competing 2-thread torch process (matrix products), given 2 s to start."""
    code = (
        "import torch, time\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\n"
        "t = time.time()\nwhile time.time() - t < 300: a @ a\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(2.0)
    return proc


def wait_sweep(kind: str, size: float, repeats: int) -> list[dict[str, Any]]:
    """Plain and QT steps under each of :data:`WAIT_VARIANTS`, quiet and next to a competitor."""
    rows = []
    for label, env in WAIT_VARIANTS.items():
        row: dict[str, Any] = {"variant": label}
        for state in ("quiet", "busy"):
            competitor = _competitor() if state == "busy" else None
            try:
                out = _child(["--one-steps", kind, str(size), "--repeats", str(repeats)], env=env)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
            row.update({f"{state}_{k}": v for k, v in out.items()})
        print(row, flush=True)
        rows.append(row)
    return rows


def measure_contention(repeats: int, variant: str) -> dict[str, float]:
    """QNN forward + adjoint gradient (13 qubits, 8 layers) through the public API, quiet and
    next to one competing 2-thread process; torch imported first, no environment variables.

    Compares the default backend (small simulations on one qsim thread) with two qsim threads
    (the default before, on this 2-core machine).
    """
    import torch  # as a user would: torch first

    sys.path.insert(0, str(ROOT))
    from qtcompress.qnn import QNN, Ansatz, QsimBackend

    # One variant per process: an OpenMP team made by the other would skew this one.
    backend = QsimBackend(2) if variant == "2 qsim threads" else "qsim"
    qnns = {variant: QNN(Ansatz(n_qubits=13, n_layers=8), backend=backend)}
    weights = torch.arange(1 << 13, dtype=torch.float32)

    def median_ms(qnn: Any) -> float:
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            (qnn() * weights).sum().backward()
            if i:
                times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)

    out = {}
    for state in ("quiet", "busy"):
        competitor = None
        if state == "busy":
            competitor = _competitor()
        try:
            for name, qnn in qnns.items():
                out[f"{name}, {state}"] = median_ms(qnn)
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    return out


# -- report ------------------------------------------------------------------------------------
def table(
    rows: list[dict[str, Any]],
    phase1: dict[str, Any] | None,
    repeats: int,
    contention: dict[str, float] | None = None,
    waits: list[dict[str, Any]] | None = None,
) -> str:
    """Markdown for docs/benchmarks.md."""
    lines = [
        f"QT fine-tuning step vs the plain distillation step of the same model (all weights "
        f"trainable), interleaved in one process per model, medians of {repeats}. Rows scheme, "
        f"default budget (5% of M). Threads: torch {THREADS}, qsim {THREADS}, "
        f"OMP/OpenBLAS {THREADS}, GOMP_SPINCOUNT=1000 (as the CLI sets it). "
        f"Measured {machine()}; written by "
        "`tools/bench_step.py`.",
        "",
        "| model | M | batch | qubits | rank | plain (ms) | QT (ms) | QT / plain | "
        "QT, dense W (ms) | QNN | body | heads | model | Adam | generator f+b | floor | "
        "peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['M']:,} | {r['batch']} | {r['qubits']} | {r['rank']} | "
            f"{r['plain_ms']:.1f} | {r['qt_ms']:.1f} | {r['qt_ms'] / r['plain_ms']:.2f}x | "
            f"{r['dense_ms']:.1f} | {r['qnn_ms']:.1f} | {r['body_ms']:.1f} | {r['heads_ms']:.1f} | "
            f"{r['model_ms']:.1f} | {r['adam_ms']:.1f} | {r['generator_ms']:.1f} | "
            f"{r['floor_ms']:.1f} | {r['peak_mib']:.0f} |"
        )
    if rows:
        lines += [
            "",
            f"Machine rates measured in the same runs: sgemm up to "
            f"{max(r['gflops'] for r in rows):.0f} GFLOP/s, copy up to "
            f"{max(r['gbps'] for r in rows):.1f} GB/s. *floor*: the heads' multiply-adds "
            "(forward and both backward products) at that sgemm rate, or writing the "
            "weights and reading their gradient twice at that bandwidth, whichever is "
            "larger. *QT*: linear layers run on the low-rank factors "
            "(`qtcompress/lowrank.py`); *QT, dense W*: the same step with every weight "
            "materialised first (the step before that change), interleaved with the "
            "other two. QNN / body / heads / model / Adam: one split step with dense "
            "weights, run separately (ms).",
        ]
    if phase1:
        p = phase1
        lines += [
            "",
            f"Phase 1 at {p['M']:,} weights (MLP, {p['weights_mib']:.0f} MiB of "
            f"float32 weights, {p['trainable']:,} generator parameters): "
            f"`compress()` {p['compress_s']:.1f} s (least-squares heads), "
            f"{p['step_ms']:.0f} ms per weight-loss step (mean of {p['steps']}); resident "
            f"memory {p['rss_model_mib']:.0f} MiB with the model built, "
            f"{p['rss_after_compress_mib']:.0f} MiB after `compress()` (peak "
            f"{p['compress_peak_mib']:.0f} MiB during it), peak during the steps "
            f"{p['step_peak_mib']:.0f} MiB. Extra over the built model: "
            f"{(p['rss_after_compress_mib'] - p['rss_model_mib']) / p['weights_mib']:.1f}x "
            f"the weights' bytes held by `compress()`, "
            f"{(p['step_peak_mib'] - p['rss_model_mib']) / p['weights_mib']:.1f}x at the "
            "steps' peak.",
        ]
    if contention:
        c = contention
        lines += [
            "",
            "QNN forward + adjoint gradient, 13 qubits x 8 layers, through "
            "`qtcompress.qnn.QNN` with torch imported first and no environment variables "
            "set, median ms, quiet and next to one competing 2-thread torch process:",
            "",
            "| qsim threads | quiet (ms) | one competing process (ms) | slow-down |",
            "|---|---|---|---|",
        ]
        for name in ("default", "2 qsim threads"):
            q, b = c[f"{name}, quiet"], c[f"{name}, busy"]
            label = (
                "default (1 thread up to 16 qubits)"
                if name == "default"
                else "2 (the default before)"
            )
            lines.append(f"| {label} | {q:.2f} | {b:.2f} | {b / q:.1f}x |")
    if waits:
        lines += [
            "",
            "OpenMP idle threads, MLP 1e6 (batch 64), QT and plain steps in fresh "
            "processes (torch 2 threads), quiet and next to one competing 2-thread torch "
            "process, medians (ms). Idle threads that spin hold a core the other process "
            "needs; threads that sleep at once pay a wake-up on every parallel operator:",
            "",
            "| idle threads | plain quiet | QT quiet | QT / plain | plain busy | QT busy |",
            "|---|---|---|---|---|---|",
        ]
        for w in waits:
            lines.append(
                f"| {w['variant']} | {w['quiet_plain_ms']:.1f} | "
                f"{w['quiet_qt_ms']:.1f} | "
                f"{w['quiet_qt_ms'] / w['quiet_plain_ms']:.2f}x | "
                f"{w['busy_plain_ms']:.1f} | {w['busy_qt_ms']:.1f} |"
            )
    return "\n".join(lines)


def _child(
    args: list[str], clean_env: bool = False, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run this script in a fresh process; ``env`` replaces the OpenMP wait settings."""
    full = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OMP_", "OPENBLAS_", "MKL_", "GOMP_"))
    }
    if not clean_env:
        full.update(ENV)
    if env is not None:
        full = {k: v for k, v in full.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        full.update(env)
    res = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=full
    )
    if res.returncode != 0:
        raise SystemExit(f"bench_step child {args} failed:\n{res.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="*", default=["mlp", "cnn", "lstm", "transformer"])
    ap.add_argument("--sizes", type=float, nargs="*", default=[1e5, 1e6, 1e7])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--phase1", type=float, default=None, help="also time phase 1 at this M")
    ap.add_argument("--phase1-steps", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # child: kind size
    ap.add_argument("--one-phase1", type=float, help=argparse.SUPPRESS)
    ap.add_argument(
        "--contention",
        action="store_true",
        help="also time the QNN quiet and next to a competing process",
    )
    ap.add_argument("--one-contention", help=argparse.SUPPRESS)
    ap.add_argument(
        "--wait",
        action="store_true",
        help="also sweep OpenMP wait settings (MLP 1e6, quiet and busy)",
    )
    ap.add_argument("--one-steps", nargs=2, help=argparse.SUPPRESS)  # child: kind size
    a = ap.parse_args(argv)
    if a.one_steps:
        print(json.dumps(measure_steps(a.one_steps[0], float(a.one_steps[1]), a.repeats)))
        return
    if a.one:
        print(json.dumps(measure(a.one[0], float(a.one[1]), a.repeats)))
        return
    if a.one_phase1:
        print(json.dumps(measure_phase1(a.one_phase1, a.phase1_steps)))
        return
    if a.one_contention:
        print(json.dumps(measure_contention(max(a.repeats, 21), a.one_contention)))
        return
    rows = []
    for size in a.sizes:
        for kind in a.models:
            rows.append(_child(["--one", kind, str(size), "--repeats", str(a.repeats)]))
            r = rows[-1]
            print(
                f"{kind} M={r['M']:,}: plain {r['plain_ms']:.1f} ms, QT {r['qt_ms']:.1f} ms "
                f"({r['qt_ms'] / r['plain_ms']:.2f}x), dense W {r['dense_ms']:.1f} ms; "
                f"generator {r['generator_ms']:.1f} ms, "
                f"floor {r['floor_ms']:.1f} ms",
                flush=True,
            )
    phase1 = None
    if a.phase1:
        phase1 = _child(["--one-phase1", str(a.phase1), "--phase1-steps", str(a.phase1_steps)])
        print(phase1, flush=True)
    contention = None
    if a.contention:
        contention = {}
        for variant in ("default", "2 qsim threads"):
            contention.update(
                _child(["--one-contention", variant, "--repeats", str(a.repeats)], clean_env=True)
            )
        print(contention, flush=True)
    waits = wait_sweep("mlp", 1e6, a.repeats) if a.wait else None
    text = table(rows, phase1, a.repeats, contention, waits)
    print(text)
    if not a.no_write:
        write_section("bench_step", "QT step vs plain step (`tools/bench_step.py`)", text)


if __name__ == "__main__":
    main()
