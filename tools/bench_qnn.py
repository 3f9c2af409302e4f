"""Benchmark the QNN core: qsim forward, adjoint gradient and parameter-shift gradient.

Every figure in one row is measured in the same run, side by side, so the ratios are meaningful
even on a noisy machine. Times are the best of several repeats after a warm-up.

Columns:
  fwd           one forward simulation through qtcompress (qsim, circuit built via pybind)
  fwd-cirq      the same circuit through qsimcirq's Cirq interface (resolve + translate per call)
  grad          the adjoint gradient alone, given the forward state (what backward() costs)
  grad/fwd      grad divided by fwd
  shift         parameter-shift gradient (2 * num_params forward simulations); skipped where the
                estimate exceeds --shift-limit seconds
  shift/grad    speed-up of the adjoint gradient over parameter shift

Usage:
    python tools/bench_qnn.py                 # full grid, writes docs/benchmarks.md
    python tools/bench_qnn.py --quick --no-write
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import qsimcirq

from qtcompress.qnn import Ansatz, QsimBackend, adjoint_gradient, parameter_shift_gradient, simulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdoc import DOC, machine, write_section  # noqa: E402


def best_ms(fn: Callable[[], object], min_total_s: float = 0.3, max_repeats: int = 50) -> float:
    """Best wall time of fn in milliseconds, after one warm-up call."""
    fn()
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_total_s and len(times) < max_repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def run(qubits: list[int], layers: list[int], shift_limit_s: float) -> list[dict[str, object]]:
    rng = np.random.default_rng(0)
    backend = QsimBackend()
    via_cirq = qsimcirq.QSimSimulator(qsimcirq.QSimOptions(cpu_threads=backend.threads))
    rows: list[dict[str, object]] = []
    for n in qubits:
        for n_layers in layers:
            ansatz = Ansatz.paper(n, n_layers)
            program = ansatz.program()
            angles = rng.uniform(-np.pi, np.pi, ansatz.num_params)
            g = rng.normal(size=2**n).astype(np.float32)
            psi = simulate(backend, program, angles)
            fwd = best_ms(partial(simulate, backend, program, angles))
            cirq_call = partial(via_cirq.simulate, ansatz.circuit(), ansatz.resolver(angles))
            fwd_cirq = best_ms(cirq_call, max_repeats=10)
            grad = best_ms(partial(adjoint_gradient, backend, program, angles, psi, g))
            estimate_s = 2 * ansatz.num_params * fwd / 1e3
            shift: float | None = None
            if estimate_s <= shift_limit_s:
                start = time.perf_counter()
                parameter_shift_gradient(backend, program, angles, g)
                shift = (time.perf_counter() - start) * 1e3
            row = {
                "n": n,
                "L": n_layers,
                "params": ansatz.num_params,
                "fwd": fwd,
                "fwd_cirq": fwd_cirq,
                "grad": grad,
                "shift": shift,
                "estimate_s": estimate_s,
            }
            rows.append(row)
            shift_text = f"{shift:10.1f}" if shift is not None else f"skip(~{estimate_s:.0f}s)"
            print(
                f"n={n:2d} L={n_layers:2d}  fwd {fwd:8.2f} ms  fwd-cirq {fwd_cirq:8.2f} ms  "
                f"grad {grad:8.2f} ms  grad/fwd {grad / fwd:5.2f}  shift {shift_text}",
                flush=True,
            )
    return rows


def to_markdown(rows: list[dict[str, object]], threads: int) -> str:
    lines = [
        f"Measured {machine()} (qsim threads: {threads}), "
        f"qsimcirq {qsimcirq.__version__}. Paper ansatz (RY layer + CNOT chain), complex64 "
        "state. Best of several repeats; milliseconds.",
        "",
        "| n | L | angles | fwd | fwd via Cirq | adjoint grad | grad/fwd | (fwd+grad)/fwd "
        "| param-shift grad | shift/adjoint |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fwd, grad, shift = float(r["fwd"]), float(r["grad"]), r["shift"]  # type: ignore[arg-type]
        if shift is None:
            shift_cells = f"skipped (estimated {float(r['estimate_s']):.0f} s) | -"  # type: ignore[arg-type]
        else:
            shift_cells = f"{float(shift):.1f} | {float(shift) / grad:.0f}x"  # type: ignore[arg-type]
        lines.append(
            f"| {r['n']} | {r['L']} | {r['params']} | {fwd:.2f} | {float(r['fwd_cirq']):.2f} "  # type: ignore[arg-type]
            f"| {grad:.2f} | {grad / fwd:.2f} | {(fwd + grad) / fwd:.2f} | {shift_cells} |"
        )
    lines += [
        "",
        "*fwd* is one forward simulation as qtcompress runs it (qsim with the circuit built "
        "through qsimcirq's pybind API); *fwd via Cirq* is `QSimSimulator.simulate` on the "
        "resolved Cirq circuit (resolve and translate on every call). *adjoint grad* is the "
        "backward pass alone, given the forward state. Parameter shift needs 2 x angles forward "
        "simulations and is skipped where that estimate exceeds the limit.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--qubits", type=int, nargs="+", default=[10, 13, 16, 18, 20])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument(
        "--shift-limit",
        type=float,
        default=60.0,
        help="skip parameter shift where it would take longer (seconds)",
    )
    parser.add_argument("--quick", action="store_true", help="small grid for a smoke test")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/")
    parser.add_argument("--output", type=Path, default=DOC)
    args = parser.parse_args(argv)
    if args.quick:
        args.qubits, args.layers, args.shift_limit = [6, 10], [2, 4], 5.0
    rows = run(args.qubits, args.layers, args.shift_limit)
    markdown = to_markdown(rows, QsimBackend().threads)
    if not args.no_write:
        write_section(
            "bench_qnn",
            "QNN simulation and gradients (`tools/bench_qnn.py`)",
            markdown,
            args.output,
        )
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
