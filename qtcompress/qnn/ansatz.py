"""QNN ansätze: a small JSON-serialisable description that builds a parameterised Cirq circuit.

The description (:class:`Ansatz`) is the data stored in artifacts; the Cirq circuit it builds, with
one sympy symbol per angle, is the definition of the QNN; :func:`compile_circuit` turns any circuit
made of supported gates into the flat :class:`Program` that the simulator backends execute.

Angle layout: ``angles[(layer * len(rotations) + r) * n_qubits + q]`` is the angle of rotation
``rotations[r]`` on qubit ``q`` in layer ``layer``; its symbol is named ``theta_{index}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import cirq
import numpy as np
import sympy

from qtcompress.constants import MAX_QUBITS
from qtcompress.errors import ConfigError
from qtcompress.plugins import Registry

ANSATZ_FORMAT_VERSION = 1

ROTATIONS = ("rx", "ry", "rz")
ENTANGLERS = ("chain", "ring", "none")

# Hard ceiling independent of memory: 2**31 amplitudes overflow qsim's 32-bit-indexed paths.


@dataclass(frozen=True)
class Ansatz:
    """A layered hardware-efficient ansatz.

    Each layer applies, for every entry of ``rotations``, that rotation on every qubit (one
    trainable angle each), then a ladder of CNOTs given by ``entangler``: ``"chain"`` is
    CNOT(q0,q1) ... CNOT(q_{n-2},q_{n-1}) (the paper's ansatz), ``"ring"`` adds CNOT(q_{n-1},q0),
    ``"none"`` adds nothing.

    Attributes:
        n_qubits: Number of qubits n (>= 1).
        n_layers: Number of layers L (>= 1).
        rotations: Rotation gates applied per layer, in order, each on every qubit.
        entangler: CNOT pattern after the rotations of each layer.
    """

    n_qubits: int
    n_layers: int
    rotations: tuple[str, ...] = ("ry",)
    entangler: str = "chain"
    version: int = field(default=ANSATZ_FORMAT_VERSION, compare=False)

    def __post_init__(self) -> None:
        for name in ("n_qubits", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"{name} must be an integer, got {value!r}.")
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}.")
        if self.n_qubits > MAX_QUBITS:
            raise ConfigError(
                f"n_qubits={self.n_qubits} exceeds the hard limit of {MAX_QUBITS}; "
                "generate several weights per basis state (chunked generation) to use fewer qubits."
            )
        object.__setattr__(self, "rotations", tuple(self.rotations))
        if not self.rotations:
            raise ConfigError("rotations must name at least one of " + ", ".join(ROTATIONS) + ".")
        for rot in self.rotations:
            if rot not in ROTATIONS:
                raise ConfigError(f"Unknown rotation {rot!r}; choose from {', '.join(ROTATIONS)}.")
        if self.entangler not in ENTANGLERS:
            raise ConfigError(
                f"Unknown entangler {self.entangler!r}; choose from {', '.join(ENTANGLERS)}."
            )
        if self.version != ANSATZ_FORMAT_VERSION:
            raise ConfigError(
                f"Ansatz description version {self.version} is not supported "
                f"(this qtcompress reads version {ANSATZ_FORMAT_VERSION})."
            )

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def paper(cls, n_qubits: int, n_layers: int) -> Ansatz:
        """The paper's ansatz: L layers of RY on every qubit followed by a CNOT chain."""
        return cls(n_qubits, n_layers, ("ry",), "chain")

    @classmethod
    def ry_rz_ring(cls, n_qubits: int, n_layers: int) -> Ansatz:
        """A second ansatz: RY then RZ on every qubit, followed by a ring of CNOTs."""
        return cls(n_qubits, n_layers, ("ry", "rz"), "ring")

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        """Number of trainable angles: ``n_layers * len(rotations) * n_qubits``."""
        return self.n_layers * len(self.rotations) * self.n_qubits

    @property
    def num_states(self) -> int:
        """Number of computational basis states, ``2 ** n_qubits``."""
        return 1 << self.n_qubits

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary that :meth:`from_dict` rebuilds identically."""
        return {
            "version": self.version,
            "n_qubits": int(self.n_qubits),
            "n_layers": int(self.n_layers),
            "rotations": list(self.rotations),
            "entangler": self.entangler,
        }

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ansatz:
        """Rebuild from :meth:`to_dict` output, rejecting unknown or missing keys."""
        if not isinstance(data, dict):
            raise ConfigError(f"An ansatz description must be a JSON object, got {type(data)}.")
        expected = {"version", "n_qubits", "n_layers", "rotations", "entangler"}
        missing, extra = expected - data.keys(), data.keys() - expected
        if missing or extra:
            raise ConfigError(
                f"Ansatz description keys mismatch: missing {sorted(missing)}, "
                f"unexpected {sorted(extra)}."
            )
        return cls(
            n_qubits=data["n_qubits"],
            n_layers=data["n_layers"],
            rotations=tuple(data["rotations"]),
            entangler=data["entangler"],
            version=data["version"],
        )

    @classmethod
    def from_json(cls, text: str) -> Ansatz:
        """Rebuild from :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"Ansatz description is not valid JSON: {exc}.") from exc
        return cls.from_dict(data)

    # -- Cirq -----------------------------------------------------------------------------------
    def qubits(self) -> list[cirq.LineQubit]:
        """The circuit's qubits, ``LineQubit(0) ... LineQubit(n-1)``; qubit 0 is the MSB."""
        return cirq.LineQubit.range(self.n_qubits)

    def symbols(self) -> list[sympy.Symbol]:
        """One symbol per angle, in angle-layout order."""
        return [sympy.Symbol(f"theta_{i}") for i in range(self.num_params)]

    def entangling_pairs(self) -> list[tuple[int, int]]:
        """(control, target) pairs of the CNOTs that close each layer."""
        n = self.n_qubits
        pairs = [(q, q + 1) for q in range(n - 1)] if self.entangler != "none" else []
        if self.entangler == "ring" and n > 2:
            pairs.append((n - 1, 0))
        return pairs

    def circuit(self) -> cirq.Circuit:
        """Build the parameterised Cirq circuit (one sympy symbol per angle)."""
        qubits, symbols = self.qubits(), self.symbols()
        gate_of = {"rx": cirq.rx, "ry": cirq.ry, "rz": cirq.rz}
        moments: list[cirq.Moment] = []
        k = 0
        for _layer in range(self.n_layers):
            for rot in self.rotations:
                moments.append(
                    cirq.Moment(
                        gate_of[rot](symbols[k + q]).on(qubits[q]) for q in range(self.n_qubits)
                    )
                )
                k += self.n_qubits
            # Each CNOT of the ladder shares a qubit with the next, so each gets its own moment.
            moments.extend(
                cirq.Moment(cirq.CNOT(qubits[c], qubits[t])) for c, t in self.entangling_pairs()
            )
        return cirq.Circuit(moments)

    def resolver(self, angles: Sequence[float] | np.ndarray) -> cirq.ParamResolver:
        """A Cirq parameter resolver binding each symbol to its angle."""
        values = np.asarray(angles, dtype=np.float64).reshape(-1)
        if values.shape[0] != self.num_params:
            raise ConfigError(f"Expected {self.num_params} angles, got {values.shape[0]}.")
        symbols = self.symbols()
        return cirq.ParamResolver({s: float(v) for s, v in zip(symbols, values, strict=True)})

    def program(self) -> Program:
        """Compile :meth:`circuit` into the backend-neutral :class:`Program` (cached)."""
        cached = _PROGRAM_CACHE.get(self)
        if cached is None:
            cached = compile_circuit(self.circuit(), self.symbols())
            _PROGRAM_CACHE[self] = cached
        return cached


# -- compiled form -----------------------------------------------------------------------------
# -- the registry of named ansätze ----------------------------------------------------------------
AnsatzFactory = Callable[[int, int], Ansatz]
_ANSATZE: Registry[AnsatzFactory] = Registry("ansatz", "An")
DEFAULT_ANSATZ = "paper"


def register_ansatz(name: str, factory: AnsatzFactory) -> None:
    """Register ``factory(n_qubits, n_layers) -> Ansatz`` as ``QTConfig(ansatz=name)``.

    Raises:
        ConfigError: An ansatz of that name is already registered.
    """
    _ANSATZE.add(name, factory)


def ansatz_names() -> tuple[str, ...]:
    """Registered ansätze, in registration order."""
    return _ANSATZE.names()


def check_ansatz(name: str) -> str:
    """Validate an ansatz name (a :class:`ConfigError` naming the registered ones)."""
    return _ANSATZE.check(name)


def make_ansatz(name: str, n_qubits: int, n_layers: int) -> Ansatz:
    """The registered ansatz ``name`` at this size."""
    return _ANSATZE[name](n_qubits, n_layers)


def angles_per_layer(name: str, n_qubits: int) -> int:
    """Trainable angles one layer of ansatz ``name`` costs on ``n_qubits`` (budget accounting)."""
    return make_ansatz(name, n_qubits, 1).num_params


register_ansatz("paper", Ansatz.paper)
register_ansatz("ry-rz-ring", Ansatz.ry_rz_ring)


@dataclass(frozen=True)
class Gate:
    """One gate of a compiled program.

    Rotation gates (``rx``, ``ry``, ``rz``) have angle ``offset + scale * angles[param]`` when
    ``param`` is not None, else ``offset``. ``cx`` and ``cz`` have no angle.
    """

    kind: str
    qubits: tuple[int, ...]
    param: int | None = None
    scale: float = 1.0
    offset: float = 0.0

    def angle(self, angles: np.ndarray) -> float:
        """The rotation angle under the given parameter vector."""
        if self.param is None:
            return self.offset
        return self.offset + self.scale * float(angles[self.param])

    def inverse(self) -> Gate:
        """The inverse gate (rotations negate their angle; CX and CZ are self-inverse)."""
        if self.kind in ROTATIONS:
            return replace(self, scale=-self.scale, offset=-self.offset)
        return self


#: Real-valued gates: circuits made only of these keep a real state from |0...0>.
REAL_GATES = frozenset({"ry", "cx", "cz"})


@dataclass(frozen=True)
class Program:
    """A circuit compiled to moments of :class:`Gate` on qubits ``0..n_qubits-1``.

    Gates within one moment act on disjoint qubits, so each commutes with every other.
    """

    n_qubits: int
    num_params: int
    moments: tuple[tuple[Gate, ...], ...]

    @cached_property
    def is_real(self) -> bool:
        """True when every gate has a real matrix, so the state stays real."""
        return all(g.kind in REAL_GATES for m in self.moments for g in m)

    @cached_property
    def gates(self) -> tuple[Gate, ...]:
        """All gates in execution order (one tuple per program: backends cache by it)."""
        return tuple(g for m in self.moments for g in m)


_PROGRAM_CACHE: dict[Ansatz, Program] = {}


def _rotation_angle(
    exponent: Any, symbol_index: dict[sympy.Symbol, int]
) -> tuple[int | None, float, float]:
    """Split a rotation's angle ``exponent * pi`` into (param, scale, offset)."""
    angle = sympy.sympify(exponent) * sympy.pi
    free = angle.free_symbols
    if not free:
        return None, 1.0, float(angle)
    if len(free) != 1:
        raise ConfigError(f"A rotation angle may use one symbol, got {angle}.")
    (sym,) = free
    if sym not in symbol_index:
        raise ConfigError(f"Symbol {sym} is not in the parameter list.")
    poly = sympy.Poly(sympy.expand(angle), sym)
    if poly.degree() > 1:
        raise ConfigError(f"A rotation angle must be affine in its symbol, got {angle}.")
    scale = float(poly.coeff_monomial(sym))
    offset = float(poly.coeff_monomial(1))
    return symbol_index[sym], scale, offset


def compile_circuit(circuit: cirq.Circuit, symbols: Sequence[sympy.Symbol]) -> Program:
    """Compile a Cirq circuit of rotations, CNOTs and CZs on LineQubits to a :class:`Program`.

    Args:
        circuit: Circuit on ``LineQubit(0..n-1)`` using ``cirq.rx/ry/rz`` (angle affine in one
            symbol, or numeric), ``cirq.CNOT`` and ``cirq.CZ``.
        symbols: Parameter symbols; their order defines the angle vector.

    Returns:
        The compiled program.

    Raises:
        ConfigError: On an unsupported gate or angle expression.
    """
    symbol_index = {s: i for i, s in enumerate(symbols)}
    line_qubits: list[cirq.LineQubit] = []
    for q in circuit.all_qubits():
        if not isinstance(q, cirq.LineQubit):
            raise ConfigError(f"Only LineQubits are supported, got {q!r}.")
        line_qubits.append(q)
    n_qubits = (max(q.x for q in line_qubits) + 1) if line_qubits else 0
    rotation_kinds: dict[type, str] = {cirq.Rx: "rx", cirq.Ry: "ry", cirq.Rz: "rz"}
    moments: list[tuple[Gate, ...]] = []
    for moment in circuit:
        gates: list[Gate] = []
        for op in moment:
            gate = op.gate
            idx = tuple(q.x for q in op.qubits if isinstance(q, cirq.LineQubit))
            kind = rotation_kinds.get(type(gate))
            if kind is not None and isinstance(gate, cirq.EigenGate):
                param, scale, offset = _rotation_angle(gate.exponent, symbol_index)
                gates.append(Gate(kind, idx, param, scale, offset))
            elif gate == cirq.CNOT:
                gates.append(Gate("cx", idx))
            elif gate == cirq.CZ:
                gates.append(Gate("cz", idx))
            else:
                raise ConfigError(
                    f"Gate {op} is not supported by the QNN compiler; use rx/ry/rz, CNOT or CZ."
                )
        if gates:
            moments.append(tuple(gates))
    return Program(n_qubits=n_qubits, num_params=len(symbols), moments=tuple(moments))
