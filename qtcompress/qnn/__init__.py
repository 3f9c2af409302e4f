"""The quantum neural network: Cirq ansatz, qsim simulation, exact fast gradients."""

from qtcompress.qnn.ansatz import (
    MAX_QUBITS,
    Ansatz,
    Gate,
    Program,
    ansatz_names,
    compile_circuit,
    make_ansatz,
    register_ansatz,
)
from qtcompress.qnn.backends import (
    CirqBackend,
    NumpyBackend,
    QsimBackend,
    StateBackend,
    check_qubit_limit,
    make_backend,
    max_qubits_for_memory,
)
from qtcompress.qnn.basis import bit_matrix, bits_to_index, index_to_bits, z_expectations
from qtcompress.qnn.gradients import adjoint_gradient, parameter_shift_gradient, simulate
from qtcompress.qnn.layer import QNN, QNNEngine, qnn_probabilities

__all__ = [
    "MAX_QUBITS",
    "QNN",
    "Ansatz",
    "CirqBackend",
    "Gate",
    "NumpyBackend",
    "Program",
    "QNNEngine",
    "QsimBackend",
    "StateBackend",
    "adjoint_gradient",
    "ansatz_names",
    "bit_matrix",
    "bits_to_index",
    "check_qubit_limit",
    "compile_circuit",
    "index_to_bits",
    "make_ansatz",
    "make_backend",
    "max_qubits_for_memory",
    "parameter_shift_gradient",
    "qnn_probabilities",
    "register_ansatz",
    "simulate",
    "z_expectations",
]
