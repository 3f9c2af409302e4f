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
  PL fwd        PennyLane, ``lightning.qubit`` (complex64): the probability vector, a QNode
                returning ``qml.probs`` (no differentiation)
  PL fwd+grad   PennyLane, ``lightning.qubit``, ``diff_method="adjoint"``: ``qml.grad`` of the
                same linear functional ``g . p`` of the probabilities that qtcompress
                differentiates (``qml.expval`` of ``SparseHamiltonian(diag(g))``)
  TQ fwd        TorchQuantum (``tq.QuantumDevice``, complex64): the probability vector under
                ``torch.no_grad()``
  TQ fwd+bwd    TorchQuantum: forward with autograd, then ``(g . p).backward()``; skipped where
                the tape it keeps (about two states per gate) would exceed --tq-memory-limit GB

The PennyLane and TorchQuantum circuits are built gate by gate from the same compiled
``Ansatz.paper(n, L).program()`` qtcompress runs (same gates, order, qubits and angle layout;
qubit 0 is the most significant bit in all three), and are checked before timing: at n=4, L=2
(random angles and g) their probabilities must match qtcompress's ``simulate`` and their
gradients its ``adjoint_gradient`` to 1e-5, else the tool stops with an error; every timed row
is checked again against the qtcompress results of that row. Their cells read "time (ratio)",
the ratio being to qtcompress's fwd, respectively fwd + grad.

Both are optional (``pip install -e .[bench]`` for PennyLane): a framework that does not import
is left out of the table with a one-line "not installed" note giving the import error.
TorchQuantum (``torchquantum`` 0.1.8 on PyPI) is not in the ``bench`` extra: its normal install
replaces the CPU torch with torch 2.15 + CUDA and pulls TensorFlow, and ``import torchquantum``
needs ``torchvision``, whose only wheel for torch 2.13 is a CUDA build that fails against
torch 2.13.0+cpu ("RuntimeError: operator torchvision::nms does not exist"). It imports in a
separate environment on torch 2.14.1 with torchvision 0.29.1 (both on this machine's disk; the
CUDA build, run on the CPU here), which is where the table in ``docs/benchmarks.md`` was
measured::

    python3 -m venv /tmp/tq && . /tmp/tq/bin/activate
    pip install torch==2.14.1 torchvision==0.29.1
    pip install --no-deps torchquantum==0.1.8
    pip install opt_einsum qiskit==0.46.3 "qiskit-aer<0.14" qiskit-ibm-runtime==0.18.0 \
        torchpack tqdm matplotlib pathos torchdiffeq
    pip install --only-binary=:all: qsimcirq==0.22.1 cirq-core==1.7.0 sympy \
        pennylane==0.45.1 pennylane-lightning==0.45.0
    # last, as other installs upgrade them: pkg_resources (qiskit's), torchquantum's dill pin
    pip install --no-deps "setuptools<70" dill==0.3.4
    OMP_NUM_THREADS=2 PYTHONPATH=. python tools/bench_qnn.py

Usage:
    python tools/bench_qnn.py                 # full grid, writes docs/benchmarks.md
    python tools/bench_qnn.py --quick --no-write
    python tools/bench_qnn.py --no-compare    # qtcompress only
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import qsimcirq

from qtcompress.qnn import (
    Ansatz,
    Program,
    QsimBackend,
    adjoint_gradient,
    parameter_shift_gradient,
    simulate,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdoc import DOC, machine, write_section  # noqa: E402

# The case every other framework must reproduce before anything is timed.
CHECK_QUBITS, CHECK_LAYERS, CHECK_TOL = 4, 2, 1e-5


def best_ms(fn: Callable[[], object], min_total_s: float = 0.3, max_repeats: int = 50) -> float:
    """Best wall time of fn in milliseconds, after one warm-up call."""
    fn()
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_total_s and len(times) < max_repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def timed(fn: Callable[[], Any], **kwargs: Any) -> tuple[float, Any]:
    """``best_ms(fn)`` and fn's last result (so a timed output can be checked for free)."""
    last: list[Any] = [None]

    def call() -> None:
        last[0] = fn()

    return best_ms(call, **kwargs), last[0]


# -- other simulators, optional ------------------------------------------------------------------
class Framework:
    """Another simulator running a compiled :class:`Program`: probabilities and a gradient.

    ``build`` returns ``(forward, forward_grad)``: ``forward()`` gives the probability vector,
    shape ``(2**n,)``, in qtcompress's order (qubit 0 most significant); ``forward_grad()`` the
    gradient of ``g . p`` with respect to the angles, shape ``(num_params,)``.
    """

    key = ""
    label = ""
    version = ""

    def build(
        self, program: Program, angles: np.ndarray, g: np.ndarray
    ) -> tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]:
        raise NotImplementedError

    def skip_reason(self, program: Program) -> str | None:
        """Why forward_grad is not timed for this program (None: it is)."""
        return None


def _angle(gate: Any, theta: Any) -> Any:
    """The gate's angle from the parameter vector, adding no operation for the plain case."""
    if gate.param is None:
        return gate.offset
    if gate.scale == 1.0 and gate.offset == 0.0:
        return theta[gate.param]
    return gate.offset + gate.scale * theta[gate.param]


class PennyLane(Framework):
    """PennyLane on ``lightning.qubit`` (complex64), adjoint differentiation."""

    key, label = "pl", "PennyLane"

    def __init__(self) -> None:
        import pennylane as qml  # optional: imported only here
        from pennylane import numpy as pnp

        qml.device("lightning.qubit", wires=1)  # fails here if the plugin is missing
        self.qml, self.pnp = qml, pnp
        self.version = (
            f"PennyLane {qml.__version__}, "
            f"pennylane-lightning {importlib.metadata.version('pennylane_lightning')}"
        )

    def build(
        self, program: Program, angles: np.ndarray, g: np.ndarray
    ) -> tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]:
        import scipy.sparse

        qml, n = self.qml, program.n_qubits
        ops = {
            "rx": qml.RX,
            "ry": qml.RY,
            "rz": qml.RZ,
            "cx": qml.CNOT,
            "cz": qml.CZ,
        }
        unknown = {gate.kind for gate in program.gates} - ops.keys()
        if unknown:
            raise ValueError(f"No PennyLane gate for {sorted(unknown)}.")
        gates = program.gates
        wires = list(range(n))

        def circuit(theta: Any) -> None:
            for gate in gates:
                if gate.kind in ("cx", "cz"):
                    ops[gate.kind](wires=list(gate.qubits))
                else:
                    ops[gate.kind](_angle(gate, theta), wires=gate.qubits[0])

        dev = qml.device("lightning.qubit", wires=n, c_dtype=np.complex64)

        @qml.qnode(dev, diff_method=None)
        def probs(theta: Any) -> Any:
            circuit(theta)
            return qml.probs(wires=wires)

        # g . p = <psi| diag(g) |psi>: the loss whose gradient qtcompress's adjoint pass computes.
        observable = qml.SparseHamiltonian(
            scipy.sparse.diags(np.asarray(g, dtype=np.float64), format="csr"), wires=wires
        )

        @qml.qnode(dev, diff_method="adjoint")
        def loss(theta: Any) -> Any:
            circuit(theta)
            return qml.expval(observable)

        plain = np.asarray(angles, dtype=np.float64)
        trainable = self.pnp.array(plain, requires_grad=True)
        grad = qml.grad(loss)
        return (
            lambda: np.asarray(probs(plain)),
            lambda: np.asarray(grad(trainable)),
        )


class TorchQuantum(Framework):
    """TorchQuantum (``tq.QuantumDevice``, complex64 state), torch autograd."""

    key, label = "tq", "TorchQuantum"

    def __init__(self, memory_limit_gb: float = 8.0) -> None:
        import torch
        import torchquantum as tq  # optional: imported only here
        import torchquantum.functional as tqf

        self.torch, self.tq, self.tqf = torch, tq, tqf
        self.memory_limit_gb = memory_limit_gb
        self.version = f"TorchQuantum {importlib.metadata.version('torchquantum')}"

    def tape_gb(self, program: Program) -> float:
        """Memory autograd keeps for one backward pass: about two states per gate (measured)."""
        return 2 * len(program.gates) * 8 * 2**program.n_qubits / 2**30

    def skip_reason(self, program: Program) -> str | None:
        gb = self.tape_gb(program)
        return f"autograd tape ~{gb:.3g} GB" if gb > self.memory_limit_gb else None

    def build(
        self, program: Program, angles: np.ndarray, g: np.ndarray
    ) -> tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]:
        torch, tq, tqf = self.torch, self.tq, self.tqf
        ops = {"rx": tqf.rx, "ry": tqf.ry, "rz": tqf.rz, "cx": tqf.cnot, "cz": tqf.cz}
        unknown = {gate.kind for gate in program.gates} - ops.keys()
        if unknown:
            raise ValueError(f"No TorchQuantum gate for {sorted(unknown)}.")
        n, gates = program.n_qubits, program.gates

        def probs(theta: Any) -> Any:
            qdev = tq.QuantumDevice(n_wires=n, bsz=1, device="cpu")
            for gate in gates:
                if gate.kind in ("cx", "cz"):
                    ops[gate.kind](qdev, wires=list(gate.qubits))
                else:
                    ops[gate.kind](qdev, wires=gate.qubits[0], params=_angle(gate, theta))
            state = qdev.get_states_1d()[0]
            return state.real**2 + state.imag**2

        weights = torch.as_tensor(np.asarray(g, dtype=np.float32))

        def forward() -> np.ndarray:
            with torch.no_grad():
                return probs(torch.as_tensor(angles, dtype=torch.float32)).numpy()

        def forward_grad() -> np.ndarray:
            theta = torch.tensor(angles, dtype=torch.float32, requires_grad=True)
            (probs(theta) @ weights).backward()
            return theta.grad.numpy()  # type: ignore[union-attr]

        return forward, forward_grad


def load_frameworks(
    names: list[str], tq_memory_limit_gb: float
) -> tuple[list[Framework], list[str]]:
    """The frameworks among ``names`` that import, and a "not installed" note per other one."""
    makers: dict[str, tuple[str, Callable[[], Framework]]] = {
        "pennylane": ("PennyLane (lightning.qubit)", PennyLane),
        "torchquantum": ("TorchQuantum", partial(TorchQuantum, tq_memory_limit_gb)),
    }
    found: list[Framework] = []
    notes: list[str] = []
    for name in names:
        label, make = makers[name]
        try:
            found.append(make())
        except Exception as exc:  # an optional import can fail in any way (broken builds too)
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            notes.append(f"{label}: not installed ({reason}).")
    return found, notes


def compare(what: str, got: np.ndarray, want: np.ndarray, tol: float) -> None:
    """Raise if ``got`` differs from ``want`` (shape, or entries beyond ``tol`` times scale)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise RuntimeError(f"{what}: shape {got.shape}, qtcompress gives {want.shape}.")
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    bound = tol * max(1.0, float(np.max(np.abs(want))) if want.size else 0.0)
    if not err <= bound:
        raise RuntimeError(
            f"{what}: differs from qtcompress by {err:.3g} (tolerance {bound:.3g}), so it does "
            "not simulate the same circuit; its timings would not be comparable."
        )


def check_equivalence(
    framework: Framework,
    n_qubits: int = CHECK_QUBITS,
    n_layers: int = CHECK_LAYERS,
    tol: float = CHECK_TOL,
    seed: int = 1,
) -> tuple[float, float]:
    """Check a framework runs qtcompress's circuit: probabilities and gradient of ``g . p``.

    Returns:
        The largest differences ``(probabilities, gradient)``.

    Raises:
        RuntimeError: Where either differs by more than ``tol`` (relative to the largest entry
            where that exceeds 1).
    """
    rng = np.random.default_rng(seed)
    ansatz = Ansatz.paper(n_qubits, n_layers)
    program = ansatz.program()
    angles = rng.uniform(-np.pi, np.pi, ansatz.num_params)
    g = rng.normal(size=2**n_qubits).astype(np.float32)
    backend = QsimBackend()
    psi = simulate(backend, program, angles)
    probs = (psi.real**2 + psi.imag**2).astype(np.float64)
    grad = adjoint_gradient(backend, program, angles, psi, g)
    forward, forward_grad = framework.build(program, angles, g)
    got_probs, got_grad = forward(), forward_grad()
    case = f"{framework.label}, paper ansatz n={n_qubits} L={n_layers}"
    compare(f"{case}: probabilities", got_probs, probs, tol)
    compare(f"{case}: gradient of g . p", got_grad, grad, tol)
    return (
        float(np.max(np.abs(np.asarray(got_probs) - probs))),
        float(np.max(np.abs(np.asarray(got_grad) - grad))),
    )


# -- the benchmark -------------------------------------------------------------------------------
def run(
    qubits: list[int],
    layers: list[int],
    shift_limit_s: float,
    frameworks: list[Framework] | None = None,
    threads: int = 2,
) -> list[dict[str, object]]:
    frameworks = frameworks or []
    rng = np.random.default_rng(0)
    backend = QsimBackend(threads=threads)
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
            row: dict[str, object] = {
                "n": n,
                "L": n_layers,
                "params": ansatz.num_params,
                "fwd": fwd,
                "fwd_cirq": fwd_cirq,
                "grad": grad,
                "shift": shift,
                "estimate_s": estimate_s,
            }
            other_text = ""
            if frameworks:
                probs = (psi.real**2 + psi.imag**2).astype(np.float64)
                ref_grad = adjoint_gradient(backend, program, angles, psi, g)
            for fw in frameworks:
                forward, forward_grad = fw.build(program, angles, g)
                case = f"{fw.label}, n={n} L={n_layers}"
                ms, out = timed(forward, max_repeats=10)
                compare(f"{case}: probabilities", out, probs, 1e-4)
                row[f"{fw.key}_fwd"] = ms
                skip = fw.skip_reason(program)
                if skip is None:
                    ms_grad, out = timed(forward_grad, max_repeats=10)
                    compare(f"{case}: gradient", out, ref_grad, 1e-4)
                    row[f"{fw.key}_grad"] = ms_grad
                    grad_text = f"{ms_grad:8.2f} ms"
                else:
                    row[f"{fw.key}_grad"] = None
                    row[f"{fw.key}_skip"] = skip
                    grad_text = f"skip({skip})"
                other_text += f"  {fw.key} fwd {ms:8.2f} ms  {fw.key} fwd+grad {grad_text}"
            rows.append(row)
            shift_text = f"{shift:10.1f}" if shift is not None else f"skip(~{estimate_s:.0f}s)"
            print(
                f"n={n:2d} L={n_layers:2d}  fwd {fwd:8.2f} ms  fwd-cirq {fwd_cirq:8.2f} ms  "
                f"grad {grad:8.2f} ms  grad/fwd {grad / fwd:5.2f}  shift {shift_text}" + other_text,
                flush=True,
            )
    return rows


def _other_cells(row: dict[str, object], key: str) -> str:
    """One framework's cells, "ms (ratio)": forward vs fwd, forward + gradient vs fwd + grad."""
    fwd, grad = float(row["fwd"]), float(row["grad"])  # type: ignore[arg-type]
    ms = float(row[f"{key}_fwd"])  # type: ignore[arg-type]
    cells = f"{ms:.2f} ({ms / fwd:.1f}x)"
    ms_grad = row.get(f"{key}_grad")
    if ms_grad is None:
        cells += f" | skipped ({row.get(f'{key}_skip', '')})"
    else:
        cells += f" | {float(ms_grad):.2f} ({float(ms_grad) / (fwd + grad):.1f}x)"  # type: ignore[arg-type]
    return cells


OTHER_HEADERS = {"pl": ("PennyLane fwd", "PennyLane fwd+grad"), "tq": ("TQ fwd", "TQ fwd+bwd")}


def to_markdown(
    rows: list[dict[str, object]],
    threads: int,
    frameworks: list[Framework] | None = None,
    notes: list[str] | None = None,
) -> str:
    frameworks, notes = frameworks or [], notes or []
    versions = "".join(f", {fw.version}" for fw in frameworks)
    if any(fw.key == "tq" for fw in frameworks):
        import torch

        # TorchQuantum's speed is torch's, and it needs its own environment (module docstring).
        versions += f"; torch {torch.__version__} (on the CPU) for every column"
    other_head = "".join(f" | {a} | {b}" for fw in frameworks for a, b in [OTHER_HEADERS[fw.key]])
    lines = [
        f"Measured {machine()} (qsim threads: {threads}), "
        f"qsimcirq {qsimcirq.__version__}{versions}. Paper ansatz (RY layer + CNOT chain), "
        "complex64 state. Best of several repeats; milliseconds.",
        "",
        "| n | L | angles | fwd | fwd via Cirq | adjoint grad | grad/fwd | (fwd+grad)/fwd "
        "| param-shift grad | shift/adjoint" + other_head + " |",
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * (2 * len(frameworks)),
    ]
    for r in rows:
        fwd, grad, shift = float(r["fwd"]), float(r["grad"]), r["shift"]  # type: ignore[arg-type]
        if shift is None:
            shift_cells = f"skipped (estimated {float(r['estimate_s']):.0f} s) | -"  # type: ignore[arg-type]
        else:
            shift_cells = f"{float(shift):.1f} | {float(shift) / grad:.0f}x"  # type: ignore[arg-type]
        other = "".join(f" | {_other_cells(r, fw.key)}" for fw in frameworks)
        lines.append(
            f"| {r['n']} | {r['L']} | {r['params']} | {fwd:.2f} | {float(r['fwd_cirq']):.2f} "  # type: ignore[arg-type]
            f"| {grad:.2f} | {grad / fwd:.2f} | {(fwd + grad) / fwd:.2f} | {shift_cells}"
            f"{other} |"
        )
    lines += [
        "",
        "*fwd* is one forward simulation as qtcompress runs it (qsim with the circuit built "
        "through qsimcirq's pybind API); *fwd via Cirq* is `QSimSimulator.simulate` on the "
        "resolved Cirq circuit (resolve and translate on every call). *adjoint grad* is the "
        "backward pass alone, given the forward state. Parameter shift needs 2 x angles forward "
        "simulations and is skipped where that estimate exceeds the limit.",
    ]
    if frameworks:
        threads_text = (
            f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} (PennyLane lightning)"
            if "OMP_NUM_THREADS" in os.environ
            else "OMP_NUM_THREADS unset (PennyLane lightning: one OpenMP thread per core)"
        )
        torch_threads = ""
        if any(fw.key == "tq" for fw in frameworks):
            import torch

            torch_threads = f", torch threads {torch.get_num_threads()}"
        lines += [
            "",
            "The same circuit (built gate by gate from the compiled program, checked against "
            "qtcompress's probabilities and adjoint gradient before and during timing) in other "
            'simulators, each cell "ms (ratio)": forward vs *fwd*, forward + gradient vs '
            "*fwd* + *adjoint grad*. *PennyLane fwd* is a `lightning.qubit` QNode (complex64) "
            "returning `qml.probs`; *PennyLane fwd+grad* is `qml.grad` of "
            '`qml.expval(SparseHamiltonian(diag(g)))` = g . p with `diff_method="adjoint"`.'
            + (
                " *TQ* is TorchQuantum (`tq.QuantumDevice`, complex64): forward under "
                "`torch.no_grad()`, then forward with autograd and `(g . p).backward()`."
                if torch_threads
                else ""
            )
            + f" Threads: qsim {threads} at every n, {threads_text}{torch_threads}.",
        ]
    if notes:
        lines += [""] + notes
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
    parser.add_argument(
        "--compare",
        nargs="*",
        choices=["pennylane", "torchquantum"],
        default=["pennylane", "torchquantum"],
        help="other simulators to time where installed (default: both)",
    )
    parser.add_argument(
        "--no-compare", action="store_true", help="time qtcompress only (same as --compare)"
    )
    parser.add_argument(
        "--tq-memory-limit",
        type=float,
        default=8.0,
        help="skip TorchQuantum's backward where its autograd tape would exceed this (GB)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="qsim threads at every n and torch threads (TorchQuantum), default 2; PennyLane "
        "lightning uses OpenMP's count (OMP_NUM_THREADS before start-up, else every core)",
    )
    parser.add_argument("--quick", action="store_true", help="small grid for a smoke test")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/")
    parser.add_argument("--output", type=Path, default=DOC)
    args = parser.parse_args(argv)
    if args.quick:
        args.qubits, args.layers, args.shift_limit = [6, 10], [2, 4], 5.0
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    import torch  # already loaded by qtcompress.qnn

    torch.set_num_threads(args.threads)
    frameworks, notes = load_frameworks(
        [] if args.no_compare else args.compare, args.tq_memory_limit
    )
    for note in notes:
        print(note)
    for fw in frameworks:
        err_p, err_g = check_equivalence(fw)
        print(
            f"{fw.label} runs the same circuit (n={CHECK_QUBITS}, L={CHECK_LAYERS}): "
            f"max |dp| {err_p:.1e}, max |dgrad| {err_g:.1e}"
        )
    rows = run(args.qubits, args.layers, args.shift_limit, frameworks, args.threads)
    markdown = to_markdown(rows, args.threads, frameworks, notes)
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
