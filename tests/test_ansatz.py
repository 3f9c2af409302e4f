import cirq
import numpy as np
import pytest
import sympy

from qtcompress.errors import ConfigError, QTCompressError
from qtcompress.qnn import MAX_QUBITS, Ansatz, Program, compile_circuit


def count_ops(circuit: cirq.Circuit, gate_type: type) -> int:
    return sum(1 for op in circuit.all_operations() if isinstance(op.gate, gate_type))


def test_paper_ansatz_structure():
    a = Ansatz.paper(5, 3)
    c = a.circuit()
    assert count_ops(c, cirq.Ry) == 15
    assert sum(1 for op in c.all_operations() if op.gate == cirq.CNOT) == 3 * 4
    # Layer order: RY on every qubit, then CNOT(q0,q1) ... CNOT(q3,q4).
    ops = list(c.all_operations())
    assert [op.qubits for op in ops[5:9]] == [
        (cirq.LineQubit(i), cirq.LineQubit(i + 1)) for i in range(4)
    ]
    assert a.num_params == 15 and len(cirq.parameter_symbols(c)) == 15


def test_second_ansatz_is_a_ring_of_ry_rz():
    a = Ansatz.ry_rz_ring(4, 2)
    c = a.circuit()
    assert count_ops(c, cirq.Ry) == 8 and count_ops(c, cirq.Rz) == 8
    assert sum(1 for op in c.all_operations() if op.gate == cirq.CNOT) == 2 * 4
    assert a.num_params == 16
    assert not a.program().is_real and Ansatz.paper(4, 2).program().is_real


@pytest.mark.parametrize("make", [Ansatz.paper, Ansatz.ry_rz_ring])
def test_json_round_trip_rebuilds_identical_circuit(make):
    a = make(6, 4)
    b = Ansatz.from_json(a.to_json())
    assert b == a
    assert b.circuit() == a.circuit()
    assert b.program() == a.program()


def test_angle_layout_and_resolver():
    a = Ansatz.ry_rz_ring(3, 2)
    angles = np.arange(a.num_params, dtype=float)
    resolved = cirq.resolve_parameters(a.circuit(), a.resolver(angles))
    first = list(resolved.all_operations())[:6]
    # layer 0: ry on q0..q2 take angles 0..2, rz take 3..5
    assert [type(op.gate) for op in first] == [cirq.Ry] * 3 + [cirq.Rz] * 3
    assert [op.gate._rads for op in first] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="Expected 12 angles"):
        a.resolver(np.zeros(5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_qubits": 0, "n_layers": 2}, "n_qubits must be >= 1"),
        ({"n_qubits": 3, "n_layers": 0}, "n_layers must be >= 1"),
        ({"n_qubits": 2.5, "n_layers": 1}, "n_qubits must be an integer"),
        ({"n_qubits": True, "n_layers": 1}, "n_qubits must be an integer"),
        ({"n_qubits": MAX_QUBITS + 1, "n_layers": 1}, "exceeds the hard limit"),
        ({"n_qubits": 3, "n_layers": 1, "rotations": ("ry", "u3")}, "Unknown rotation 'u3'"),
        ({"n_qubits": 3, "n_layers": 1, "rotations": ()}, "at least one"),
        ({"n_qubits": 3, "n_layers": 1, "entangler": "star"}, "Unknown entangler 'star'"),
        ({"n_qubits": 3, "n_layers": 1, "version": 99}, "version 99 is not supported"),
    ],
)
def test_bad_ansatz_raises_typed_error(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        Ansatz(**kwargs)
    assert isinstance(info.value, QTCompressError) and isinstance(info.value, ValueError)


def test_from_json_rejects_bad_descriptions():
    with pytest.raises(ConfigError, match="not valid JSON"):
        Ansatz.from_json("{")
    with pytest.raises(ConfigError, match=r"unexpected \['depth'\]"):
        Ansatz.from_dict({**Ansatz.paper(2, 1).to_dict(), "depth": 3})


def test_compile_affine_angles_and_constants():
    q = cirq.LineQubit.range(2)
    t = sympy.Symbol("t")
    circuit = cirq.Circuit(cirq.ry(2 * t + 0.5).on(q[0]), cirq.rx(0.25).on(q[1]), cirq.CZ(*q))
    program = compile_circuit(circuit, [t])
    assert isinstance(program, Program) and program.n_qubits == 2
    g = program.moments[0][0]
    assert (g.kind, g.param, g.scale, g.offset) == ("ry", 0, 2.0, 0.5)
    assert program.moments[0][1].param is None and program.moments[0][1].offset == 0.25
    assert program.moments[1][0].kind == "cz"


def test_compile_rejects_unsupported_gates():
    q = cirq.LineQubit.range(2)
    with pytest.raises(ConfigError, match="not supported"):
        compile_circuit(cirq.Circuit(cirq.H(q[0])), [])
    t = sympy.Symbol("t")
    with pytest.raises(ConfigError, match="affine"):
        compile_circuit(cirq.Circuit(cirq.ry(t**2).on(q[0])), [t])
