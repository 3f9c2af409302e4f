"""The QNN as a PyTorch module: angles in, basis-state probabilities out, exact gradients back.

Example:
    >>> from qtcompress.qnn import QNN, Ansatz
    >>> qnn = QNN(Ansatz.paper(n_qubits=4, n_layers=2), seed=0)
    >>> probs = qnn()  # (16,) float32, sums to 1, differentiable w.r.t. qnn.angles
    >>> probs.shape
    torch.Size([16])
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from qtcompress.errors import ConfigError, NonFiniteError
from qtcompress.qnn.ansatz import Ansatz
from qtcompress.qnn.backends import StateBackend, check_qubit_limit, make_backend
from qtcompress.qnn.gradients import adjoint_gradient, parameter_shift_gradient, simulate

GRADIENT_METHODS = ("adjoint", "parameter-shift")


class QNNEngine:
    """Simulation and gradients of one ansatz on one backend, with a small state cache.

    Args:
        ansatz: The circuit description.
        backend: ``"qsim"`` (default), ``"cirq"``, ``"numpy"`` or a :class:`StateBackend`.
        gradient: ``"adjoint"`` (default; about two forward simulations) or
            ``"parameter-shift"`` (reference; ``2 * num_params`` simulations).
        shots: If set, the forward probabilities are estimated from this many measurement
            shots (seeded); gradients stay exact (a straight-through estimator).
        seed: Seed of the shot sampler.
        cache_size: Number of recent (angles -> state) results kept, so that repeated forward
            passes with unchanged angles skip the simulation. 0 disables the cache.
    """

    def __init__(
        self,
        ansatz: Ansatz,
        backend: str | StateBackend = "qsim",
        gradient: str = "adjoint",
        shots: int | None = None,
        seed: int = 0,
        cache_size: int = 1,
    ) -> None:
        if gradient not in GRADIENT_METHODS:
            raise ConfigError(
                f"Unknown gradient method {gradient!r}; choose from {', '.join(GRADIENT_METHODS)}."
            )
        if shots is not None and (isinstance(shots, bool) or int(shots) != shots or shots < 1):
            raise ConfigError(f"shots must be a positive integer or None, got {shots!r}.")
        if cache_size < 0:
            raise ConfigError(f"cache_size must be >= 0, got {cache_size}.")
        self.backend = make_backend(backend)
        check_qubit_limit(ansatz.n_qubits, self.backend.dtype.itemsize)
        self.ansatz = ansatz
        self.program = ansatz.program()
        self.gradient = gradient
        self.shots = shots
        self.rng = np.random.default_rng(seed)
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def state(self, angles: np.ndarray) -> np.ndarray:
        """Final state vector for these angles (from the cache when possible)."""
        key = angles.tobytes()
        psi = self._cache.get(key)
        if psi is None:
            psi = simulate(self.backend, self.program, angles)
            if self.cache_size:
                self._cache[key] = psi
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return psi

    def probabilities(self, angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(psi, probs)``; ``probs`` is exact, or shot-sampled if ``shots`` is set."""
        psi = self.state(angles)
        probs = psi.real.astype(np.float64) ** 2 + psi.imag.astype(np.float64) ** 2
        if self.shots is not None:
            exact = probs / probs.sum()
            probs = self.rng.multinomial(self.shots, exact).astype(np.float64) / self.shots
        return psi, probs

    def grad(self, angles: np.ndarray, psi: np.ndarray, grad_probs: np.ndarray) -> np.ndarray:
        """``dloss/dangles`` given ``dloss/dprobs``, by the configured method."""
        if not np.all(np.isfinite(grad_probs)):
            raise NonFiniteError(
                "The loss gradient reaching the QNN holds NaN or Inf; lower the learning rate "
                "or check the loss."
            )
        if self.gradient == "adjoint":
            return adjoint_gradient(self.backend, self.program, angles, psi, grad_probs)
        return parameter_shift_gradient(self.backend, self.program, angles, grad_probs)


class _QNNProbabilities(torch.autograd.Function):
    """Autograd bridge: numpy simulation forward, adjoint (or shift) gradient backward."""

    @staticmethod
    def forward(ctx: Any, angles: torch.Tensor, engine: QNNEngine) -> torch.Tensor:
        theta = angles.detach().to("cpu", torch.float64).numpy().copy()  # (P,)
        psi, probs = engine.probabilities(theta)  # (2^n,), (2^n,)
        ctx.engine, ctx.theta, ctx.psi = engine, theta, psi
        ctx.angle_dtype, ctx.angle_device = angles.dtype, angles.device
        return torch.from_numpy(probs.astype(np.float32)).to(angles.device)

    @staticmethod
    def backward(ctx: Any, grad_probs: torch.Tensor) -> tuple[torch.Tensor, None]:
        g = grad_probs.detach().to("cpu", torch.float64).numpy()  # (2^n,)
        grad = ctx.engine.grad(ctx.theta, ctx.psi, g)  # (P,)
        return torch.from_numpy(grad).to(ctx.angle_device, ctx.angle_dtype), None


def qnn_probabilities(angles: torch.Tensor, engine: QNNEngine) -> torch.Tensor:
    """Differentiable probabilities of all ``2**n`` basis states for the given angles.

    Args:
        angles: Shape ``(num_params,)``, any float dtype, must be finite.
        engine: The simulation engine.

    Returns:
        Shape ``(2**n,)`` float32 tensor, indexed as in :mod:`qtcompress.qnn.basis`.
    """
    if angles.ndim != 1 or angles.shape[0] != engine.program.num_params:
        raise ConfigError(
            f"Expected angles of shape ({engine.program.num_params},), got {tuple(angles.shape)}."
        )
    out: torch.Tensor = _QNNProbabilities.apply(angles, engine)
    return out


class QNN(nn.Module):
    """A trainable quantum neural network whose forward pass returns basis-state probabilities.

    Args:
        ansatz: The circuit description (qubits, layers, gates).
        backend: Simulator name or instance; ``"qsim"`` by default.
        gradient: ``"adjoint"`` (default) or ``"parameter-shift"``.
        shots: Optional finite-shot sampling of the forward probabilities.
        seed: Seeds the initial angles (uniform in [-pi, pi]) and the shot sampler.
        cache_size: See :class:`QNNEngine`.

    Attributes:
        angles: ``nn.Parameter`` of shape ``(ansatz.num_params,)``.
    """

    def __init__(
        self,
        ansatz: Ansatz,
        *,
        backend: str | StateBackend = "qsim",
        gradient: str = "adjoint",
        shots: int | None = None,
        seed: int = 0,
        cache_size: int = 1,
    ) -> None:
        super().__init__()
        self.ansatz = ansatz
        self.engine = QNNEngine(ansatz, backend, gradient, shots, seed, cache_size)
        generator = torch.Generator().manual_seed(seed)
        init = (torch.rand(ansatz.num_params, generator=generator) * 2 - 1) * torch.pi
        self.angles = nn.Parameter(init)

    @property
    def n_qubits(self) -> int:
        """Number of qubits."""
        return self.ansatz.n_qubits

    def forward(self) -> torch.Tensor:
        """Probabilities of all ``2**n`` basis states, shape ``(2**n,)``, float32."""
        return qnn_probabilities(self.angles, self.engine)

    def extra_repr(self) -> str:
        """Summary shown by ``print(module)``."""
        a = self.ansatz
        return (
            f"n_qubits={a.n_qubits}, n_layers={a.n_layers}, rotations={a.rotations}, "
            f"entangler={a.entangler!r}, backend={self.engine.backend.name!r}, "
            f"gradient={self.engine.gradient!r}"
        )
