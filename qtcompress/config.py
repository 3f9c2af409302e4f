"""`QTConfig`: everything that defines a compression's generator, validated and JSON round-trips."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from qtcompress.errors import ConfigError
from qtcompress.mapping import ACTIVATIONS, PROB_TRANSFORMS
from qtcompress.qnn import MAX_QUBITS

CONFIG_VERSION = 1
MAPPINGS = ("mlp", "mps")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class QTConfig:
    """Settings of a Quantum-Train compression.

    Attributes:
        target: Parameter-name patterns to generate (``None``: all trainable parameters); see
            :mod:`qtcompress.targets`.
        exclude: Patterns removed from the selection.
        include_frozen: Also generate parameters with ``requires_grad=False``.
        chunk: Weights per basis state; ``None`` picks the smallest power of two that keeps the
            QNN at or below ``max_qubits``.
        max_qubits: Qubit cap used when ``chunk`` is ``None``.
        n_layers: QNN layers.
        n_qubits: QNN qubits; ``None``: the fewest that cover M.
        mapping: ``"mlp"`` or ``"mps"``.
        hidden: MLP hidden widths.
        activation: MLP activation.
        bond_dim: MPS bond dimension.
        prob_transform: Mapping input transform of the probabilities.
        per_tensor_affine: Train a scale and offset per generated tensor.
        standardize: Standardise each tensor's raw mapping outputs before the affine, so
            generated tensors keep the pretrained mean and std.
        backend: QNN simulator backend name.
        block_states: States mapped per streamed block (``None``: automatic).
        seed: Seeds the QNN and mapping initialisation.
        version: Format version of this description.
    """

    target: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    include_frozen: bool = False
    chunk: int | None = 1
    max_qubits: int = 16
    n_layers: int = 8
    n_qubits: int | None = None
    mapping: str = "mlp"
    hidden: tuple[int, ...] = (16, 16)
    activation: str = "tanh"
    bond_dim: int = 4
    prob_transform: str = "scaled"
    per_tensor_affine: bool = True
    standardize: bool = True
    backend: str = "qsim"
    block_states: int | None = None
    seed: int = 0
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        # Lists from JSON or callers become tuples so the config stays hashable and frozen.
        for name in ("target", "exclude", "hidden"):
            v = getattr(self, name)
            if v is None and name == "target":
                continue
            if isinstance(v, str) or not isinstance(v, (list, tuple)):
                raise ConfigError(f"{name} must be a list, got {v!r}.")
            object.__setattr__(self, name, tuple(v))
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"QTConfig version {self.version} is not supported (this qtcompress "
                              f"reads version {CONFIG_VERSION}).")
        for name in ("n_layers", "max_qubits", "bond_dim", "seed"):
            v = getattr(self, name)
            if not _is_int(v) or v < (0 if name == "seed" else 1):
                kind = "non-negative" if name == "seed" else "positive"
                raise ConfigError(f"{name} must be a {kind} integer, got {v!r}.")
        for name in ("chunk", "n_qubits", "block_states"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {v!r}.")
        if self.max_qubits > MAX_QUBITS or (self.n_qubits or 0) > MAX_QUBITS:
            raise ConfigError(f"At most {MAX_QUBITS} qubits are supported.")
        if not self.hidden or not all(_is_int(h) and h >= 1 for h in self.hidden):
            raise ConfigError(f"hidden must list positive integer widths, got {self.hidden!r}.")
        if self.mapping not in MAPPINGS:
            raise ConfigError(f"Unknown mapping {self.mapping!r}; choose from {MAPPINGS}.")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"Unknown activation {self.activation!r}; choose from "
                              f"{tuple(ACTIVATIONS)}.")
        if self.prob_transform not in PROB_TRANSFORMS:
            raise ConfigError(f"Unknown prob_transform {self.prob_transform!r}; choose from "
                              f"{PROB_TRANSFORMS}.")
        for name in ("include_frozen", "per_tensor_affine", "standardize"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}.")
        if not isinstance(self.backend, str):
            raise ConfigError(f"backend must be a name, got {self.backend!r}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples become lists)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def to_json(self) -> str:
        """Serialise to a JSON string (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QTConfig:
        """Rebuild from :meth:`to_dict`; unknown keys are an error, missing keys take defaults."""
        if not isinstance(data, dict):
            raise ConfigError(f"A QTConfig must be a JSON object, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise ConfigError(f"Unknown QTConfig keys {extra}.")
        if data.get("version", CONFIG_VERSION) != CONFIG_VERSION:
            raise ConfigError(f"QTConfig version {data.get('version')} is not supported.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> QTConfig:
        """Rebuild from :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"QTConfig is not valid JSON: {exc}.") from exc
        return cls.from_dict(data)

    def resolve_chunk(self, total: int) -> int:
        """The chunk size for M = ``total`` weights."""
        if self.chunk is not None:
            return self.chunk
        k = 1
        while (total + k - 1) // k > 2**self.max_qubits:
            k *= 2
        return k
