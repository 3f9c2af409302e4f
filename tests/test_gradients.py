import numpy as np
import pytest
import torch

from qtcompress.errors import NonFiniteError
from qtcompress.qnn import (
    QNN,
    Ansatz,
    NumpyBackend,
    QsimBackend,
    adjoint_gradient,
    parameter_shift_gradient,
    simulate,
)

ANSATZE = [
    Ansatz.paper(5, 3),
    Ansatz.ry_rz_ring(4, 3),
    Ansatz(4, 2, ("rx", "rz", "ry"), "ring"),  # every rotation axis
    Ansatz(1, 2, ("ry",), "chain"),  # one qubit: no CNOTs at all
]


def loss_grad(n: int, seed: int) -> np.ndarray:
    """dloss/dp of a generic nonlinear loss: random weights, like a mapping network would give."""
    return np.random.default_rng(seed).normal(size=2**n)


def finite_difference(backend, program, angles, g, eps=1e-6):
    out = np.zeros_like(angles)
    for i in range(angles.size):
        up, down = angles.copy(), angles.copy()
        up[i] += eps
        down[i] -= eps
        f_up = g @ np.abs(simulate(backend, program, up)) ** 2
        f_down = g @ np.abs(simulate(backend, program, down)) ** 2
        out[i] = (f_up - f_down) / (2 * eps)
    return out


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def ansatz_id(a: Ansatz) -> str:
    return f"{'-'.join(a.rotations)}-{a.entangler}-{a.n_qubits}"


@pytest.mark.parametrize("ansatz", ANSATZE, ids=ansatz_id)
def test_adjoint_matches_finite_differences_float64(ansatz):
    backend, program = NumpyBackend(), ansatz.program()
    angles = np.random.default_rng(0).uniform(-np.pi, np.pi, ansatz.num_params)
    g = loss_grad(ansatz.n_qubits, 1)
    psi = simulate(backend, program, angles)
    adjoint = adjoint_gradient(backend, program, angles, psi, g)
    fd = finite_difference(backend, program, angles, g)
    assert rel_err(adjoint, fd) < 1e-4
    shift = parameter_shift_gradient(backend, program, angles, g)
    assert rel_err(shift, fd) < 1e-4


@pytest.mark.parametrize(
    "ansatz", [Ansatz.paper(8, 4), Ansatz.ry_rz_ring(6, 3)], ids=["paper", "ry-rz-ring"]
)
def test_qsim_adjoint_matches_parameter_shift_and_float64(ansatz):
    program = ansatz.program()
    angles = np.random.default_rng(2).uniform(-np.pi, np.pi, ansatz.num_params)
    g = loss_grad(ansatz.n_qubits, 3)
    qsim = QsimBackend()
    adjoint = adjoint_gradient(qsim, program, angles, simulate(qsim, program, angles), g)
    shift = parameter_shift_gradient(qsim, program, angles, g)
    reference = adjoint_gradient(
        NumpyBackend(), program, angles, simulate(NumpyBackend(), program, angles), g
    )
    # qsim works in float32: agreement to ~1e-6 relative is the expected precision.
    assert rel_err(adjoint, reference) < 1e-4
    assert rel_err(shift, reference) < 1e-4


def test_shared_symbol_gradients_accumulate():
    """A parameter used by several gates gets the sum of their derivatives (chain rule)."""
    import cirq
    import sympy

    from qtcompress.qnn import compile_circuit

    q = cirq.LineQubit.range(2)
    t = sympy.Symbol("t")
    circuit = cirq.Circuit(
        cirq.ry(t).on(q[0]), cirq.ry(-2 * t + 0.3).on(q[1]), cirq.CNOT(*q), cirq.rx(t).on(q[1])
    )
    program = compile_circuit(circuit, [t])
    angles, g = np.array([0.7]), loss_grad(2, 4)
    backend = NumpyBackend()
    adjoint = adjoint_gradient(backend, program, angles, simulate(backend, program, angles), g)
    np.testing.assert_allclose(adjoint, finite_difference(backend, program, angles, g), rtol=1e-6)


def loss_fn(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((p - target) ** 2).sum() + torch.log(p + 1e-3).mean()


def test_torch_backward_through_qnn_equals_float64_reference():
    ansatz = Ansatz.paper(6, 3)
    target = torch.softmax(torch.randn(64, generator=torch.Generator().manual_seed(0)), 0)
    grads = {}
    for method in ("adjoint", "parameter-shift"):
        qnn = QNN(ansatz, seed=5, gradient=method)
        loss_fn(qnn(), target).backward()
        grads[method] = qnn.angles.grad.clone()
        assert qnn.angles.grad.dtype == torch.float32
    torch.testing.assert_close(grads["adjoint"], grads["parameter-shift"], rtol=1e-3, atol=1e-5)
    # float64 reference: autograd for dloss/dp, then the numpy adjoint for dp/dangles.
    angles = QNN(ansatz, seed=5).angles.detach().double().numpy()
    psi = simulate(NumpyBackend(), ansatz.program(), angles)
    p = torch.tensor(np.abs(psi) ** 2, requires_grad=True)
    loss_fn(p, target.double()).backward()
    ref = adjoint_gradient(NumpyBackend(), ansatz.program(), angles, psi, p.grad.numpy())
    np.testing.assert_allclose(grads["adjoint"].numpy(), ref, rtol=1e-3, atol=1e-5)


def test_zero_loss_gradient_gives_zero_angle_gradient():
    ansatz = Ansatz.paper(3, 2)
    backend, program = QsimBackend(), ansatz.program()
    angles = np.ones(ansatz.num_params)
    psi = simulate(backend, program, angles)
    assert not adjoint_gradient(backend, program, angles, psi, np.zeros(8)).any()


def test_non_finite_loss_gradient_raises():
    qnn = QNN(Ansatz.paper(3, 2))
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        (qnn() * torch.tensor(float("inf"))).sum().backward()
