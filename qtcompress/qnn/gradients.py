"""Exact gradients of a loss on the QNN's probability vector, with the state work done by a backend.

The QNN maps angles ``theta`` to probabilities ``p = |psi|^2`` with ``psi = U(theta)|0...0>``.
Given ``g = dloss/dp`` (shape ``(2**n,)``) we want ``dloss/dtheta``.

Reverse mode (adjoint)
----------------------
Write the circuit as moments ``U = W_K ... W_1``. For a rotation ``R(a) = exp(-i a P / 2)`` on
qubit q in moment m, with ``chi_m`` the state after moment m and ``mu_m = W_{m+1}^† ... W_K^† lam``
the adjoint vector at the same point, where ``lam = g * psi``::

    dloss/da = 2 Re <lam| W_K..W_{m+1} (-i/2) P_q |chi_m> = Im <mu_m| P_q |chi_m>.

Polarisation turns that cross term into two expectation values of single-qubit Paulis::

    Im <mu|P|chi> = (<u|P|u> - <v|P|v>) / 4,   u = chi + i mu,   v = chi - i mu,

and ``u``, ``v`` can be propagated backwards by the simulator itself, because ``W^†`` is linear:
``W^† u = W^† chi + i W^† mu``. To read ``<P_q>`` for *all* qubits in one cheap pass we keep the
vectors in the measurement frame ``B = prod_q B_q`` with ``B_q P_q B_q^† = Z_q``
(``RX(pi/2)`` for ``P = Y``, ``RY(-pi/2)`` for ``P = X``, nothing for ``Z``): then
``<P_q> = <Z_q>`` of ``B u``, and all n values come from the probabilities of ``B u`` folded in
two passes (:func:`~qtcompress.qnn.basis.z_expectations`). The frame changes are single-qubit
gates that the simulator fuses into neighbouring gates, so each backward step costs about one
forward moment.

For real circuits (RY, CNOT, CZ: the paper's ansatz) ``chi`` and ``mu`` are real, ``v = conj(u)``
and ``<v|Y|v> = -<u|Y|u>``: a single vector ``u`` suffices and ``dloss/da = <u|Y|u> / 2``.

Cost of one gradient: one forward simulation plus one backward sweep of the same gates (two for
complex circuits) and O(2**n) folds per parameterised moment. Parameter shift, kept as a
reference, costs ``2 * num_params`` forward simulations.
"""

from __future__ import annotations

import math

import numpy as np

from qtcompress.errors import NonFiniteError
from qtcompress.qnn.ansatz import Gate, Program
from qtcompress.qnn.backends import StateBackend
from qtcompress.qnn.basis import z_expectations

# Measurement-frame change per rotation axis: B with B P B^dagger = Z.
_FRAME = {
    "rx": Gate("ry", (0,), None, offset=-math.pi / 2),
    "ry": Gate("rx", (0,), None, offset=math.pi / 2),
    "rz": None,
}


def _frame_gates(moment: tuple[Gate, ...], undo: bool = False) -> list[Gate]:
    """Gates that move into (or, with ``undo``, out of) the measurement frame of a moment."""
    gates = []
    for gate in moment:
        frame = _FRAME.get(gate.kind) if gate.param is not None else None
        if frame is not None:
            placed = Gate(frame.kind, gate.qubits, None, offset=frame.offset)
            gates.append(placed.inverse() if undo else placed)
    return gates


# adjoint_sweep's results by program: the gate lists depend on the circuit only, and building
# them (inverses, frame gates) was a third of a small QNN's backward pass. Bounded: tests and
# sweeps make many programs.
_SWEEPS: dict[int, tuple[Program, tuple[tuple[int, tuple[Gate, ...]], ...]]] = {}
_MAX_SWEEPS = 64


def adjoint_sweep(program: Program) -> tuple[tuple[int, tuple[Gate, ...]], ...]:
    """The reverse sweep's steps: ``(m, gates)`` per parameterised moment ``m``, last first.

    ``gates`` carries the adjoint vectors from the previous step's point (after the moment
    before it, in that moment's measurement frame) back to the point after moment ``m``, in
    moment ``m``'s frame: undo the previous frame, invert moments ``m+1..end-1``, enter the
    frame of ``m``. Cached per program (the gate tuples are stable, so backends can cache the
    circuits they build from them).
    """
    hit = _SWEEPS.get(id(program))
    if hit is not None and hit[0] is program:
        return hit[1]
    moments = program.moments
    param_moments = [i for i, m in enumerate(moments) if any(g.param is not None for g in m)]
    steps = []
    end = len(moments)  # vectors are at the point after moment end-1 (in moment `frame`'s frame)
    frame: tuple[Gate, ...] = ()
    for m in reversed(param_moments):
        gates = _frame_gates(frame, undo=True)
        for moment in reversed(moments[m + 1 : end]):
            gates.extend(g.inverse() for g in moment)
        gates.extend(_frame_gates(moments[m]))
        steps.append((m, tuple(gates)))
        end, frame = m + 1, moments[m]
    if len(_SWEEPS) >= _MAX_SWEEPS:
        _SWEEPS.clear()
    _SWEEPS[id(program)] = (program, tuple(steps))
    return _SWEEPS[id(program)][1]


def check_finite_angles(angles: np.ndarray) -> None:
    """Raise :class:`NonFiniteError` naming the first bad angle."""
    bad = np.flatnonzero(~np.isfinite(angles))
    if bad.size:
        raise NonFiniteError(
            f"QNN angle {int(bad[0])} is {angles[bad[0]]} ({bad.size} non-finite angles in all); "
            "check the learning rate and the loss for overflow."
        )


def simulate(backend: StateBackend, program: Program, angles: np.ndarray) -> np.ndarray:
    """Final state ``psi`` of shape ``(2**n,)`` from |0...0>."""
    check_finite_angles(angles)
    return backend.run(program.n_qubits, program.gates, angles)


def adjoint_gradient(
    backend: StateBackend,
    program: Program,
    angles: np.ndarray,
    psi: np.ndarray,
    grad_probs: np.ndarray,
) -> np.ndarray:
    """``dloss/dtheta`` by one reverse sweep (see the module docstring).

    Args:
        backend: Simulator that propagates the adjoint vectors.
        program: The compiled circuit.
        angles: Shape ``(num_params,)``.
        psi: Final state from :func:`simulate` with the same angles, shape ``(2**n,)``.
        grad_probs: ``dloss/dp``, shape ``(2**n,)``, real.

    Returns:
        Shape ``(num_params,)`` float64 gradient.
    """
    n = program.n_qubits
    grads = np.zeros(program.num_params, dtype=np.float64)
    lam = grad_probs.astype(psi.real.dtype, copy=False) * psi  # (2^n,) = g * psi
    scale = float(np.linalg.norm(lam))
    if scale == 0.0:
        return grads
    if not math.isfinite(scale):
        raise NonFiniteError("The loss gradient with respect to the probabilities is not finite.")
    # Normalise mu so |chi| = |mu| = 1: the cross term is then not swamped by rounding in the
    # |chi|^2 + |mu|^2 terms that cancel.
    mu = (lam / scale).astype(psi.dtype, copy=False)
    real = program.is_real
    vectors = [psi + 1j * mu] if real else [psi + 1j * mu, psi - 1j * mu]  # u (, v)

    for m, gates in adjoint_sweep(program):
        vectors = [backend.run(n, gates, angles, vec) for vec in vectors]
        expectations = [
            z_expectations((vec.real**2 + vec.imag**2), n) for vec in vectors
        ]  # each (n,): <P_q> of u (and v) after moment m
        if real:
            d_angle = expectations[0] / 2.0
        else:
            d_angle = (expectations[0] - expectations[1]) / 4.0
        for gate in program.moments[m]:
            if gate.param is not None:
                grads[gate.param] += scale * gate.scale * d_angle[gate.qubits[0]]
    return grads


def _shifted(program: Program, moment: int, slot: int, shift: float) -> list[Gate]:
    gates = []
    for i, m in enumerate(program.moments):
        for j, gate in enumerate(m):
            if i == moment and j == slot:
                gate = Gate(gate.kind, gate.qubits, gate.param, gate.scale, gate.offset + shift)
            gates.append(gate)
    return gates


def parameter_shift_gradient(
    backend: StateBackend,
    program: Program,
    angles: np.ndarray,
    grad_probs: np.ndarray,
) -> np.ndarray:
    """Reference gradient by the parameter-shift rule: two simulations per rotation gate.

    ``dp/da = (p(a + pi/2) - p(a - pi/2)) / 2`` holds exactly for ``exp(-i a P / 2)`` gates.
    """
    check_finite_angles(angles)
    n = program.n_qubits
    grads = np.zeros(program.num_params, dtype=np.float64)
    g = grad_probs.astype(np.float64)
    for i, moment in enumerate(program.moments):
        for j, gate in enumerate(moment):
            if gate.param is None:
                continue
            plus = backend.run(n, _shifted(program, i, j, math.pi / 2), angles)
            minus = backend.run(n, _shifted(program, i, j, -math.pi / 2), angles)
            dp = (np.abs(plus) ** 2 - np.abs(minus) ** 2).astype(np.float64) / 2.0
            grads[gate.param] += gate.scale * float(g @ dp)
    return grads
