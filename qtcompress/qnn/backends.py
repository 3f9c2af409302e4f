"""State-vector simulator backends behind one small protocol.

A backend applies a list of compiled :class:`~qtcompress.qnn.ansatz.Gate` to a state vector and
returns the new state, indexed in Cirq's big-endian order (see :mod:`qtcompress.qnn.basis`).

* :class:`QsimBackend` (default): qsim's C++ kernels, with the qsim circuit built directly through
  qsimcirq's pybind API: no Cirq resolve/translate per call, which dominates small circuits.
* :class:`CirqBackend`: ``cirq.Simulator`` in complex128, the test oracle.
* :class:`NumpyBackend`: a plain complex128 NumPy simulator, the float64 reference used to check
  gradients against finite differences.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import cirq
import numpy as np
import qsimcirq

from qtcompress.errors import ConfigError, ResourceLimitError, SimulationError
from qtcompress.memory import available_memory_bytes
from qtcompress.qnn.ansatz import MAX_QUBITS, Gate

# Copies of the state vector alive at once during a gradient (state, two adjoint vectors, and the
# simulator's input and output buffers); used for the memory check.
STATE_COPIES_DURING_GRADIENT = 6


@runtime_checkable
class StateBackend(Protocol):
    """What the QNN needs from a simulator."""

    name: str
    dtype: np.dtype

    def run(
        self,
        n_qubits: int,
        gates: Sequence[Gate],
        angles: np.ndarray,
        state: np.ndarray | None = None,
    ) -> np.ndarray:
        """Apply ``gates`` (angles bound from ``angles``) to ``state`` (``None``: |0...0>)."""
        ...


def usable_cpu_count() -> int:
    """CPUs this process may run on (respects affinity masks, unlike ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Simulations of at most this many qubits run on one qsim thread (QsimBackend.threads_for).
SMALL_SIMULATION_QUBITS = 16

# Threads of QsimBackend instances built without an explicit count (set by set_threads).
_default_threads: int | None = None


def set_threads(threads: int | None) -> None:
    """Threads for everything that computes: torch's intra-op pool and qsim.

    ``None`` restores the defaults (all usable cores). Call it before building models; it does
    not change backends that already exist. For BLAS and OpenMP's own settings
    (``OPENBLAS_NUM_THREADS``, ``OMP_WAIT_POLICY``), set the environment before starting
    Python: the command line does so (``--threads``).

    Raises:
        ConfigError: ``threads`` < 1.
    """
    import torch

    global _default_threads
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer, got {threads!r}.")
    _default_threads = threads
    torch.set_num_threads(threads or usable_cpu_count())


def max_qubits_for_memory(bytes_per_amplitude: int = 8, memory: int | None = None) -> int:
    """Largest n whose gradient's state vectors fit in memory (and at most ``MAX_QUBITS``)."""
    memory = available_memory_bytes() if memory is None else memory
    per_state = STATE_COPIES_DURING_GRADIENT * bytes_per_amplitude
    return min(MAX_QUBITS, int(math.floor(math.log2(max(memory // per_state, 1)))))


def check_qubit_limit(
    n_qubits: int, bytes_per_amplitude: int = 8, memory: int | None = None
) -> None:
    """Raise :class:`ResourceLimitError` if an n-qubit simulation would not fit in memory.

    The limit is the largest n for which ``6 * 2**n * bytes_per_amplitude`` bytes fit in the memory
    available now (28 qubits with 24 GiB free at complex64), and never more than 30.

    Args:
        n_qubits: Qubits of the planned simulation.
        bytes_per_amplitude: 8 for complex64 (qsim), 16 for complex128.
        memory: Bytes to plan with; default: the memory available now.
    """
    limit = max_qubits_for_memory(bytes_per_amplitude, memory)
    if n_qubits > limit:
        need = STATE_COPIES_DURING_GRADIENT * bytes_per_amplitude * (1 << n_qubits)
        raise ResourceLimitError(
            f"{n_qubits} qubits need about {need / 2**30:.1f} GiB of state vectors, more than "
            f"this machine has available (limit here: {limit} qubits). Use fewer qubits, e.g. by "
            "generating a block of several weights per basis state (chunked generation)."
        )


def _validate_state(state: np.ndarray, n_qubits: int) -> None:
    if state.shape != (1 << n_qubits,):
        raise SimulationError(
            f"State vector has shape {state.shape}, expected ({1 << n_qubits},) for "
            f"{n_qubits} qubits."
        )


# One gate as qsim takes it: (qsim kind, time slot, qsim qubits, the rotation or None).
_PlannedGate = tuple[Any, int, list[int], Gate | None]
_MAX_PLANS = 256


class QsimBackend:
    """qsim (qsimcirq) state-vector simulation in complex64.

    Args:
        threads: CPU threads for qsim; default: :func:`set_threads`'s, else all usable cores.
        max_fused_gate_size: qsim's gate-fusion limit (2..4); larger fuses more gates per pass
            over the state vector.
    """

    name = "qsim"
    dtype = np.dtype(np.complex64)

    _KINDS = {"rx": "kXPowGate", "ry": "kYPowGate", "rz": "kZPowGate", "cx": "kCX", "cz": "kCZ"}

    def __init__(self, threads: int | None = None, max_fused_gate_size: int = 2) -> None:
        if not 1 <= max_fused_gate_size <= 6:
            raise ConfigError(f"max_fused_gate_size must be in 1..6, got {max_fused_gate_size}.")
        self.explicit_threads = threads is not None
        self.threads = threads or _default_threads or usable_cpu_count()
        self.max_fused_gate_size = max_fused_gate_size
        self._qsim = qsimcirq.qsim
        self._kinds = {k: getattr(self._qsim, v) for k, v in self._KINDS.items()}
        self._options = qsimcirq.QSimOptions(
            max_fused_gate_size=max_fused_gate_size, cpu_threads=self.threads
        ).as_dict()
        self._options["s"] = 0  # seed: unused by full-state simulation, but required
        # Gate tuples (a program's gates, its adjoint sweep) -> their time slots and qubits:
        # the layout depends on the circuit only, and recomputing it every call was most of a
        # small simulation's cost.
        self._plans: dict[tuple[int, int], tuple[Sequence[Gate], list[_PlannedGate]]] = {}

    def threads_for(self, n_qubits: int) -> int:
        """Threads qsim uses for one simulation of ``n_qubits``.

        Up to :data:`SMALL_SIMULATION_QUBITS` qubits a simulation runs on one thread unless
        this backend was given a count: such a state vector is too small to gain from a
        second thread, and an OpenMP team next to torch's own pool spin-waits against it.
        Measured on a 2-core machine with one competing 2-thread process (n=13, 8 layers,
        forward + adjoint gradient): 124 ms on 2 qsim threads, 2.5 ms on one.
        """
        if self.explicit_threads or n_qubits > SMALL_SIMULATION_QUBITS:
            return self.threads
        return 1

    def _plan(self, n_qubits: int, gates: Sequence[Gate]) -> list[_PlannedGate]:
        """Each gate's qsim kind, time slot and qsim qubits (cached for tuples of gates)."""
        key = (id(gates), n_qubits)
        hit = self._plans.get(key)
        if hit is not None and hit[0] is gates:
            return hit[1]
        # qsim wants gates in time order; give each gate the earliest slot after its qubits'
        # previous gates so that independent gates share a time step.
        free_at = [0] * n_qubits
        top = n_qubits - 1
        plan = []
        for gate in gates:
            time = max(free_at[q] for q in gate.qubits)
            for q in gate.qubits:
                free_at[q] = time + 1
            rotation = gate.kind not in ("cx", "cz")
            plan.append(
                (
                    self._kinds[gate.kind],
                    time,
                    [top - q for q in gate.qubits],
                    gate if rotation else None,
                )
            )
        if isinstance(gates, tuple):  # lists can change in place: never cached
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            self._plans[key] = (gates, plan)
        return plan

    def build_circuit(self, n_qubits: int, gates: Sequence[Gate], angles: np.ndarray) -> object:
        """Build qsim's native circuit, mapping Cirq qubit k to qsim qubit n-1-k."""
        qsim = self._qsim
        circuit = qsim.Circuit()
        circuit.num_qubits = n_qubits
        no_params: dict[str, float] = {}
        for kind, time, targets, rotation in self._plan(n_qubits, gates):
            if rotation is None:
                qsim.add_gate(kind, time, targets, no_params, circuit)
            else:
                # cirq.rx/ry/rz(a) == XPow/YPow/ZPow(exponent=a/pi, global_shift=-1/2).
                params = {"exponent": rotation.angle(angles) / math.pi, "global_shift": -0.5}
                qsim.add_gate(kind, time, targets, params, circuit)
        return circuit

    def run(
        self,
        n_qubits: int,
        gates: Sequence[Gate],
        angles: np.ndarray,
        state: np.ndarray | None = None,
    ) -> np.ndarray:
        """Apply the gates with qsim; returns a new complex64 state vector."""
        if state is not None:
            _validate_state(state, n_qubits)
            if not gates:
                return np.array(state, dtype=np.complex64)
        options = dict(self._options)
        options["t"] = self.threads_for(n_qubits)
        options["c"] = self.build_circuit(n_qubits, gates, angles)
        if state is None:
            initial: int | np.ndarray = 0
        else:
            initial = np.ascontiguousarray(state, dtype=np.complex64).view(np.float32)
        try:
            out = self._qsim.qsim_simulate_fullstate(options, initial)
        except Exception as exc:  # pybind raises plain RuntimeError/ValueError
            raise SimulationError(f"qsim failed on a {n_qubits}-qubit circuit: {exc}") from exc
        return out.view(np.complex64)


class CirqBackend:
    """``cirq.Simulator`` in complex128: slow, independent, the oracle for tests."""

    name = "cirq"
    dtype = np.dtype(np.complex128)

    def __init__(self) -> None:
        self._sim = cirq.Simulator(dtype=np.complex128)

    @staticmethod
    def to_cirq(n_qubits: int, gates: Sequence[Gate], angles: np.ndarray) -> cirq.Circuit:
        """Build a resolved Cirq circuit from compiled gates."""
        qubits = cirq.LineQubit.range(n_qubits)
        rot = {"rx": cirq.rx, "ry": cirq.ry, "rz": cirq.rz}
        ops: list[cirq.Operation] = []
        for gate in gates:
            qs = [qubits[q] for q in gate.qubits]
            if gate.kind == "cx":
                ops.append(cirq.CNOT(*qs))
            elif gate.kind == "cz":
                ops.append(cirq.CZ(*qs))
            else:
                ops.append(rot[gate.kind](gate.angle(angles)).on(*qs))
        return cirq.Circuit(ops)

    def run(
        self,
        n_qubits: int,
        gates: Sequence[Gate],
        angles: np.ndarray,
        state: np.ndarray | None = None,
    ) -> np.ndarray:
        """Apply the gates with ``cirq.Simulator``; returns a new complex128 state vector."""
        initial = 0 if state is None else np.array(state, dtype=np.complex128)
        if state is not None:
            _validate_state(state, n_qubits)
        result = self._sim.simulate(
            self.to_cirq(n_qubits, gates, angles),
            qubit_order=cirq.LineQubit.range(n_qubits),
            initial_state=initial,
        )
        return np.asarray(result.final_state_vector, dtype=np.complex128)


def gate_matrix(kind: str, angle: float = 0.0) -> np.ndarray:
    """The unitary of a single-qubit rotation, or of CX/CZ (control first), in complex128."""
    c, s = math.cos(angle / 2), math.sin(angle / 2)
    if kind == "rx":
        return np.array([[c, -1j * s], [-1j * s, c]])
    if kind == "ry":
        return np.array([[c, -s], [s, c]], dtype=np.complex128)
    if kind == "rz":
        return np.diag([complex(c, -s), complex(c, s)])
    if kind == "cx":
        return np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=complex)
    if kind == "cz":
        return np.diag([1, 1, 1, -1]).astype(np.complex128)
    raise ConfigError(f"Unknown gate kind {kind!r}.")


class NumpyBackend:
    """A plain NumPy complex128 simulator: the float64 reference for gradient checks."""

    name = "numpy"
    dtype = np.dtype(np.complex128)

    def run(
        self,
        n_qubits: int,
        gates: Sequence[Gate],
        angles: np.ndarray,
        state: np.ndarray | None = None,
    ) -> np.ndarray:
        """Apply the gates by tensor contraction; returns a new complex128 state vector."""
        if state is None:
            psi = np.zeros(1 << n_qubits, dtype=np.complex128)
            psi[0] = 1.0
        else:
            _validate_state(state, n_qubits)
            psi = np.array(state, dtype=np.complex128)
        cube = psi.reshape((2,) * n_qubits)  # axis k is qubit k
        for gate in gates:
            k = len(gate.qubits)
            mat = gate_matrix(gate.kind, gate.angle(angles)).reshape((2,) * (2 * k))
            # Contract the gate's input indices with the state's qubit axes, then put the
            # output axes back where the qubits were.
            cube = np.tensordot(mat, cube, axes=(list(range(k, 2 * k)), list(gate.qubits)))
            cube = np.moveaxis(cube, list(range(k)), list(gate.qubits))
        return np.ascontiguousarray(cube).reshape(-1)


BACKENDS: dict[str, type] = {"qsim": QsimBackend, "cirq": CirqBackend, "numpy": NumpyBackend}


def make_backend(backend: str | StateBackend) -> StateBackend:
    """Return a backend instance from a name (``"qsim"``, ``"cirq"``, ``"numpy"``) or instance."""
    if isinstance(backend, str):
        if backend not in BACKENDS:
            raise ConfigError(
                f"Unknown simulator backend {backend!r}; choose from {', '.join(BACKENDS)}."
            )
        return BACKENDS[backend]()
    if not isinstance(backend, StateBackend):
        raise ConfigError(f"{backend!r} does not implement the StateBackend protocol.")
    return backend
