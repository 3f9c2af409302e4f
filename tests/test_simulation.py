import cirq
import numpy as np
import pytest
import qsimcirq
import torch
from hypothesis import given
from hypothesis import strategies as st

from qtcompress.errors import (
    ConfigError,
    NonFiniteError,
    ResourceLimitError,
    SimulationError,
)
from qtcompress.qnn import (
    QNN,
    Ansatz,
    CirqBackend,
    NumpyBackend,
    QsimBackend,
    bit_matrix,
    bits_to_index,
    check_qubit_limit,
    index_to_bits,
    make_backend,
    max_qubits_for_memory,
    simulate,
    z_expectations,
)

ANSATZE = [Ansatz.paper, Ansatz.ry_rz_ring]


def cirq_oracle_probs(ansatz: Ansatz, angles: np.ndarray) -> np.ndarray:
    """Probabilities of the *symbolic Cirq circuit* from cirq.Simulator in complex128."""
    circuit = cirq.resolve_parameters(ansatz.circuit(), ansatz.resolver(angles))
    sim = cirq.Simulator(dtype=np.complex128)
    state = sim.simulate(circuit, qubit_order=ansatz.qubits()).final_state_vector
    return np.abs(state) ** 2


@pytest.mark.parametrize("make", ANSATZE)
@pytest.mark.parametrize("n", range(1, 9))
def test_qsim_probabilities_match_cirq_simulator(make, n):
    rng = np.random.default_rng(n)
    ansatz = make(n, 3)
    for _ in range(3):
        angles = rng.uniform(-np.pi, np.pi, ansatz.num_params)
        expected = cirq_oracle_probs(ansatz, angles)
        got = np.abs(simulate(QsimBackend(), ansatz.program(), angles)) ** 2
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        assert abs(got.sum() - 1) < 1e-5


@pytest.mark.parametrize("make", ANSATZE)
def test_direct_qsim_matches_qsimcirq_on_the_cirq_circuit(make):
    """Our pybind-built qsim circuit equals qsimcirq's own translation of the Cirq circuit."""
    ansatz = make(7, 4)
    angles = np.random.default_rng(0).uniform(-np.pi, np.pi, ansatz.num_params)
    via_cirq = (
        qsimcirq.QSimSimulator()
        .simulate(ansatz.circuit(), ansatz.resolver(angles), qubit_order=ansatz.qubits())
        .final_state_vector
    )
    direct = simulate(QsimBackend(), ansatz.program(), angles)
    np.testing.assert_allclose(direct, via_cirq, atol=1e-6)


@pytest.mark.parametrize("backend", ["cirq", "numpy"])
def test_reference_backends_agree(backend):
    ansatz = Ansatz.ry_rz_ring(5, 2)
    angles = np.random.default_rng(1).uniform(-np.pi, np.pi, ansatz.num_params)
    got = simulate(make_backend(backend), ansatz.program(), angles)
    np.testing.assert_allclose(np.abs(got) ** 2, cirq_oracle_probs(ansatz, angles), atol=1e-12)


def test_basis_index_is_big_endian_qubit0_most_significant():
    # RY(pi) on qubit 0 only flips it: the state is |100>, index 4 = 0b100.
    ansatz = Ansatz(3, 1, ("ry",), "none")
    probs = np.abs(simulate(QsimBackend(), ansatz.program(), np.array([np.pi, 0, 0]))) ** 2
    assert int(np.argmax(probs)) == 4 and probs[4] == pytest.approx(1, abs=1e-6)
    assert index_to_bits(4, 3) == "100" and bits_to_index("100") == 4
    np.testing.assert_array_equal(bit_matrix(3)[4], [1, 0, 0])
    # ...and the same convention as Cirq's state vector
    cirq_probs = cirq_oracle_probs(ansatz, np.array([np.pi, 0, 0]))
    assert int(np.argmax(cirq_probs)) == 4


@given(st.integers(1, 16).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, 2**n - 1))))
def test_index_bits_round_trip(n_and_index):
    n, index = n_and_index
    bits = index_to_bits(index, n)
    assert len(bits) == n and bits_to_index(bits) == index
    assert list(bit_matrix(n)[index]) == [int(b) for b in bits]


def test_bad_basis_inputs():
    with pytest.raises(ConfigError, match="out of range"):
        index_to_bits(8, 3)
    with pytest.raises(ConfigError, match="0/1"):
        bits_to_index("012")


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_z_expectations_match_direct_sums(n):
    probs = np.random.default_rng(n).random(2**n)
    bits = bit_matrix(n).astype(float)
    expected = probs @ (1 - 2 * bits)
    np.testing.assert_allclose(z_expectations(probs, n), expected, rtol=1e-12)


def test_nan_angles_raise():
    qnn = QNN(Ansatz.paper(3, 2))
    with torch.no_grad():
        qnn.angles[4] = float("nan")
    with pytest.raises(NonFiniteError, match="angle 4 is nan"):
        qnn()


def test_qubit_limit_is_enforced():
    # 30 qubits need 6 * 8 * 2**30 bytes = 48 GiB of state vectors.
    with pytest.raises(ResourceLimitError, match="30 qubits need about 48.0 GiB") as info:
        check_qubit_limit(30, memory=24 * 2**30)
    assert isinstance(info.value, MemoryError)
    # 29 qubits need exactly 24 GiB; with a little less memory the limit drops to 28.
    assert max_qubits_for_memory(8, memory=24 * 2**30) == 29
    assert max_qubits_for_memory(8, memory=23 * 2**30) == 28
    check_qubit_limit(20, memory=24 * 2**30)  # fits: no error
    limit = max_qubits_for_memory()
    if limit < 30:  # on this machine's real memory
        with pytest.raises(ResourceLimitError, match=f"^{limit + 1} qubits need about "):
            QNN(Ansatz.paper(limit + 1, 1))


def test_wrong_state_shape_raises():
    with pytest.raises(SimulationError, match="expected \\(8,\\)"):
        QsimBackend().run(3, [], np.zeros(0), np.zeros(4, dtype=np.complex64))
    with pytest.raises(ConfigError, match="Unknown simulator backend 'gpu'"):
        make_backend("gpu")


def test_shots_converge_to_exact_probabilities():
    ansatz = Ansatz.paper(4, 2)
    exact = QNN(ansatz, seed=3)().detach().numpy()
    errors = []
    for shots in (100, 10_000, 1_000_000):
        sampled = QNN(ansatz, seed=3, shots=shots)().detach().numpy()
        assert sampled.sum() == pytest.approx(1.0, abs=1e-6)
        errors.append(0.5 * np.abs(sampled - exact).sum())  # total-variation distance
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.005
    # seeded: the same seed gives the same sample
    a = QNN(ansatz, seed=3, shots=500)().detach().numpy()
    b = QNN(ansatz, seed=3, shots=500)().detach().numpy()
    np.testing.assert_array_equal(a, b)


def test_bad_qnn_options():
    with pytest.raises(ConfigError, match="shots must be a positive integer"):
        QNN(Ansatz.paper(2, 1), shots=0)
    with pytest.raises(ConfigError, match="Unknown gradient method"):
        QNN(Ansatz.paper(2, 1), gradient="spsa")


def test_cache_reuses_state_for_unchanged_angles():
    qnn = QNN(Ansatz.paper(4, 2), cache_size=2)
    first = qnn()
    assert len(qnn.engine._cache) == 1
    key = next(iter(qnn.engine._cache))
    cached = qnn.engine._cache[key]
    second = qnn()
    assert next(iter(qnn.engine._cache.values())) is cached  # no new simulation
    torch.testing.assert_close(first, second)


def test_oracle_backend_class_is_cirq_simulator():
    assert isinstance(make_backend("cirq"), CirqBackend)
    assert isinstance(make_backend(NumpyBackend()), NumpyBackend)
