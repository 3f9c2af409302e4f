"""`QTConfig`: everything that defines a compression's generator, validated and JSON round-trips."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar

from qtcompress.constants import ACTIVATION_NAMES, MAX_QUBITS, PROB_TRANSFORMS
from qtcompress.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from qtcompress.targets import Layout

# Version 2 added the row-factorised scheme, ``rank`` and ``budget``; version-1 files describe
# the flat scheme and are read as such. Version 3 renamed two fields whose names misled:
# ``max_qubits`` (only used when ``chunk`` is automatic) -> ``chunk_max_qubits`` and
# ``per_tensor_affine`` (the affine always applies; this says whether it trains) ->
# ``train_affine``. Older descriptions are read with their old names translated.
# Version 4 added the hashed scheme's fields (``values``, ``row_scales``, ``hashed_vectors``,
# ``allowance``);
# version-3 files have none of them and read unchanged.
# Version 5 made the hashed scheme the default and ``n_layers`` automatic (``None``); an older
# description without a ``scheme`` key is the rows scheme, its default then.
# Version 6 added ``ansatz`` (a registered circuit); older descriptions are the paper's
# ansatz, its default, and read unchanged.
CONFIG_VERSION = 6
_RENAMED_IN_3 = {"max_qubits": "chunk_max_qubits", "per_tensor_affine": "train_affine"}
# The default scheme, chosen from the frontier in docs/benchmarks.md (fidelity against bytes on
# the real-shaped suite); each scheme registers its own default budget
# (qtcompress.generator.registry).
DEFAULT_SCHEME = "hashed"
# QNN layers of the rows and flat schemes when QTConfig.n_layers is None.
DEFAULT_LAYERS = 8
DEFAULT_HIDDEN = {"rows": (32,), "flat": (16, 16)}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class QTConfig:
    """Settings of a Quantum-Train compression.

    The default is the hashed generator (:class:`~qtcompress.generator.HashedGenerator`) at
    0.5% of M; :meth:`resolve` turns a budget into concrete sizes.

    Attributes:
        scheme: ``"hashed"`` (every weight a signed, scaled shared value from the QNN; the
            default), ``"rows"`` (one basis state per tensor row, a head per tensor) or
            ``"flat"`` (the paper's flat index cut into ``chunk``-sized pieces, one shared head).
        budget: Size of the generator: a fraction of M in (0, 1] or a parameter count (> 1);
            ``None``: the scheme's default (0.5% of M for hashed, 5% for rows) unless ``rank``
            is given. Sizes the hashed and rows schemes (the flat scheme refuses it).
        rank: Rows scheme: the same rank for every matrix; ``None``: ranks allocated to the
            budget.
        ranks: Rows scheme: one rank per generated tensor (layout order), as resolved; this is
            what a generator file records.
        target: Parameter-name patterns to generate (``None``: all trainable parameters); see
            :mod:`qtcompress.targets`.
        exclude: Patterns removed from the selection.
        include_frozen: Also generate parameters with ``requires_grad=False``.
        chunk: Weights per basis state; ``None`` picks the smallest power of two that keeps the
            QNN at or below ``chunk_max_qubits``.
        chunk_max_qubits: Qubit cap used only when ``chunk`` is ``None`` (automatic chunk).
        n_layers: QNN layers; ``None``: :data:`DEFAULT_LAYERS` for rows and flat, from the
            budget for hashed.
        n_qubits: QNN qubits; ``None``: the fewest that cover M.
        ansatz: The QNN's circuit, a name registered in :mod:`qtcompress.qnn.ansatz`
            (``"paper"``: RY on every qubit and a CNOT chain per layer; ``"ry-rz-ring"``).
        mapping: Flat scheme: a mapping registered in :mod:`qtcompress.generator.common`
            (``"mlp"`` or ``"mps"``).
        hidden: Mapping hidden widths; ``None``: ``(32,)`` for rows, ``(16, 16)`` for flat.
        activation: MLP activation.
        bond_dim: MPS bond dimension.
        prob_transform: Mapping input transform of the probabilities.
        train_affine: Train each generated tensor's scale and offset (flat scheme). The affine
            always applies; with ``False`` it stays at its initial values.
        standardize: Standardise each tensor's raw mapping outputs before the affine, so
            generated tensors keep the pretrained mean and std.
        backend: QNN simulator backend name.
        block_states: States mapped per streamed block (``None``: automatic).
        seed: Seeds the QNN and mapping initialisation.
        values: Hashed scheme: where the shared values come from: ``"qnn"`` (QT), or a control
            (``"mps"``, ``"table"``, ``"frozen"``, ``"zeros"``; see
            :mod:`qtcompress.generator.values`).
        row_scales: Hashed scheme: one scale per matrix row (``True``) or per tensor;
            ``None``: rows while they cost at most a quarter of the budget.
        hashed_vectors: Hashed scheme: hash the vectors (biases, norms) too, with a scale and
            an offset each; ``None``: exact while they cost at most half the budget.
        allowance: Hashed scheme: parameters the shared-value source may use, as resolved
            from the budget (what a generator file records).
        version: Format version of this description.
    """

    scheme: str = DEFAULT_SCHEME
    budget: float | int | None = None
    rank: int | None = None
    ranks: tuple[int, ...] | None = None
    target: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    include_frozen: bool = False
    chunk: int | None = 1
    chunk_max_qubits: int = 16
    n_layers: int | None = None
    n_qubits: int | None = None
    ansatz: str = "paper"
    mapping: str = "mlp"
    hidden: tuple[int, ...] | None = None
    activation: str = "tanh"
    bond_dim: int = 4
    prob_transform: str = "scaled"
    train_affine: bool = True
    standardize: bool = True
    backend: str = "qsim"
    block_states: int | None = None
    seed: int = 0
    values: str = "qnn"
    row_scales: bool | None = None
    hashed_vectors: bool | None = None
    allowance: int | None = None
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        # Lists from JSON or callers become tuples so the config stays hashable and frozen.
        for name in ("target", "exclude", "hidden", "ranks"):
            v = getattr(self, name)
            if v is None and name in ("target", "hidden", "ranks"):
                continue
            if isinstance(v, str) or not isinstance(v, (list, tuple)):
                raise ConfigError(f"{name} must be a list, got {v!r}.")
            object.__setattr__(self, name, tuple(v))
        if self.version != CONFIG_VERSION:
            raise ConfigError(
                f"QTConfig version {self.version} is not supported (this qtcompress "
                f"reads version {CONFIG_VERSION})."
            )
        for name in ("chunk_max_qubits", "bond_dim", "seed"):
            v = getattr(self, name)
            if not _is_int(v) or v < (0 if name == "seed" else 1):
                kind = "non-negative" if name == "seed" else "positive"
                raise ConfigError(f"{name} must be a {kind} integer, got {v!r}.")
        for name in ("chunk", "n_qubits", "n_layers", "block_states", "allowance"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {v!r}.")
        if self.chunk_max_qubits > MAX_QUBITS or (self.n_qubits or 0) > MAX_QUBITS:
            raise ConfigError(f"At most {MAX_QUBITS} qubits are supported.")
        from qtcompress.generator.registry import get_scheme

        get_scheme(self.scheme)  # a registered scheme, or a ConfigError naming them
        b = self.budget
        if b is not None and (
            isinstance(b, bool)
            or not isinstance(b, (int, float))
            or not b > 0
            or b != b
            or b == float("inf")
            or (isinstance(b, float) and 1.0 < b and not b.is_integer())
        ):
            raise ConfigError(
                f"budget must be a fraction of M in (0, 1] or a parameter count, got {b!r}."
            )
        if self.ranks is not None and not all(_is_int(k) and k >= 0 for k in self.ranks):
            raise ConfigError(f"ranks must list non-negative integers, got {self.ranks!r}.")
        if self.rank is not None and (not _is_int(self.rank) or self.rank < 1):
            raise ConfigError(f"rank must be a positive integer or None, got {self.rank!r}.")
        if self.hidden is not None and (
            not self.hidden or not all(_is_int(h) and h >= 1 for h in self.hidden)
        ):
            raise ConfigError(f"hidden must list positive integer widths, got {self.hidden!r}.")
        for name in ("ansatz", "mapping"):  # registered names, checked by resolve()
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a registered name, got {getattr(self, name)!r}.")
        if self.activation not in ACTIVATION_NAMES:
            raise ConfigError(
                f"Unknown activation {self.activation!r}; choose from {ACTIVATION_NAMES}."
            )
        if self.prob_transform not in PROB_TRANSFORMS:
            raise ConfigError(
                f"Unknown prob_transform {self.prob_transform!r}; choose from {PROB_TRANSFORMS}."
            )
        for name in ("include_frozen", "train_affine", "standardize"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}.")
        for name in ("row_scales", "hashed_vectors"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ConfigError(f"{name} must be a bool or None, got {v!r}.")
        if not isinstance(self.values, str):
            raise ConfigError(f"values must be a source name, got {self.values!r}.")
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
        """Rebuild from :meth:`to_dict`; missing keys take defaults.

        Unknown keys (written by a newer qtcompress) are ignored with a warning, so files stay
        readable forwards; a version-1 description is the flat scheme, a version-2 to -4 one
        without a scheme the rows scheme, and version-1 and -2 names renamed in version 3 are
        translated.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"A QTConfig must be a JSON object, got {type(data).__name__}.")
        version = data.get("version", CONFIG_VERSION)
        # Before the key check: no misleading warning.
        if version not in (1, 2, 3, 4, 5, CONFIG_VERSION):
            raise ConfigError(
                f"QTConfig version {version!r} is not supported (this qtcompress "
                f"reads versions 1 to {CONFIG_VERSION})."
            )
        if version in (1, 2):
            data = {_RENAMED_IN_3.get(k, k): v for k, v in data.items()}
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            warnings.warn(
                f"Ignoring unknown QTConfig keys {extra} (written by a newer qtcompress?).",
                stacklevel=2,
            )
        data = {k: v for k, v in data.items() if k in known}
        if version == 1:
            data = {
                "scheme": "flat",
                "hidden": list(DEFAULT_HIDDEN["flat"]),
                **data,
                "version": CONFIG_VERSION,
            }
        elif version in (2, 3, 4):  # the default scheme was rows
            data = {"scheme": "rows", **data, "version": CONFIG_VERSION}
        config = cls(**data)
        if version < CONFIG_VERSION:
            # Before version 4 a scheme ignored the fields it did not read (a rows file may
            # say chunk=4); they now raise, so an older file's are reset to their defaults.
            from qtcompress.generator.registry import COMMON_FIELDS, get_scheme

            used = get_scheme(config.scheme).fields | COMMON_FIELDS
            default = cls()
            config = replace(
                config,
                **{f.name: getattr(default, f.name) for f in fields(cls) if f.name not in used},
            )
        return config

    @classmethod
    def from_json(cls, text: str) -> QTConfig:
        """Rebuild from :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"QTConfig is not valid JSON: {exc}.") from exc
        return cls.from_dict(data)

    def resolve(self, layout: Layout, pretrained: torch.Tensor | None = None) -> QTConfig:
        """The same config with every automatic size fixed for ``layout``.

        Each registered scheme resolves its own sizes
        (:mod:`qtcompress.generator.registry`): the rows scheme its ranks
        (:func:`~qtcompress.generator.ranks.resolve_rows`), the flat scheme its chunk, the
        hashed scheme its scales, qubits and layers
        (:func:`~qtcompress.generator.hashed.resolve_hashed`).

        Raises:
            ConfigError: A field the scheme does not use is set, or an explicit budget is
                below the smallest generator for this model.
        """
        from qtcompress.generator.registry import check_fields, get_scheme

        scheme = get_scheme(self.scheme)
        check_fields(self, scheme)
        self.check_registered()
        return scheme.resolve(self, layout, pretrained)

    def check_registered(self) -> None:
        """Refuse an ansatz, mapping or value source that is not registered.

        Not in the constructor: the registries live beside torch and Cirq, which importing
        this module must not load. :meth:`resolve` calls it; the CLI calls it before it
        touches any file.

        Raises:
            ConfigError: Naming the unknown name and the registered ones.
        """
        from qtcompress.generator.common import check_mapping
        from qtcompress.generator.values import check_values
        from qtcompress.qnn.ansatz import check_ansatz

        check_ansatz(self.ansatz)
        check_mapping(self.mapping)
        check_values(self.values)

    def scheme_config(self) -> SchemeConfig:
        """This config as its scheme's own class (only the fields that scheme reads).

        Raises:
            ConfigError: A scheme registered without a config class.
        """
        cls = SCHEME_CONFIGS.get(self.scheme)
        if cls is None:
            raise ConfigError(f"The {self.scheme} scheme has no config class; use QTConfig.")
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls)})

    def budget_params(self, total: int) -> int:
        """The budget as a parameter count for M = ``total`` weights."""
        from qtcompress.generator.registry import get_scheme

        b = get_scheme(self.scheme).default_budget if self.budget is None else self.budget
        return int(b * total) if isinstance(b, float) and b <= 1.0 else int(b)

    def resolve_chunk(self, total: int) -> int:
        """The chunk size for M = ``total`` weights."""
        if self.chunk is not None:
            return self.chunk
        k = 1
        while (total + k - 1) // k > 2**self.chunk_max_qubits:
            k *= 2
        return k


# -- one config class per scheme (PEFT style): only the fields that scheme reads ----------------
@dataclass(frozen=True)
class SchemeConfig:
    """The fields every scheme reads; a scheme's class adds its own (see :class:`QTConfig`).

    A scheme config holds nothing its scheme ignores, validates by the same rules as
    :class:`QTConfig` at construction, and becomes one with :meth:`to_qtconfig` (what
    :func:`~qtcompress.compress` does with it, and what a generator file records).

    Attributes:
        target: Parameter-name patterns to generate (``None``: all trainable parameters).
        exclude: Patterns removed from the selection.
        include_frozen: Also generate parameters with ``requires_grad=False``.
        backend: QNN simulator backend name.
        seed: Seeds the generator's initialisation.
    """

    scheme: ClassVar[str] = ""
    target: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    include_frozen: bool = False
    backend: str = "qsim"
    seed: int = 0

    def __post_init__(self) -> None:
        self.to_qtconfig()  # one set of rules: QTConfig's

    def to_qtconfig(self) -> QTConfig:
        """The :class:`QTConfig` with this scheme and these fields (the rest at defaults)."""
        return QTConfig(scheme=self.scheme, **{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True)
class HashedConfig(SchemeConfig):
    """The hashed scheme (the default): every weight a signed, scaled shared value.

    Attributes:
        budget: A fraction of M in (0, 1] or a parameter count; ``None``: 0.5% of M.
        values: Where the shared values come from: ``"qnn"`` (QT) or a registered control.
        n_qubits: QNN qubits; ``None``: from the budget.
        n_layers: QNN layers; ``None``: from the budget.
        ansatz: The QNN's registered circuit.
        row_scales: One scale per matrix row (``True``) or per tensor; ``None``: automatic.
        hashed_vectors: Hash biases and norms too; ``None``: automatic.
    """

    scheme: ClassVar[str] = "hashed"
    budget: float | int | None = None
    values: str = "qnn"
    n_qubits: int | None = None
    n_layers: int | None = None
    ansatz: str = "paper"
    row_scales: bool | None = None
    hashed_vectors: bool | None = None


@dataclass(frozen=True)
class RowsConfig(SchemeConfig):
    """The rows scheme: one basis state per tensor row, a low-rank head per tensor.

    Attributes:
        budget: A fraction of M in (0, 1] or a parameter count; ``None``: 5% of M.
        rank: The same rank for every matrix; ``None``: ranks allocated to the budget.
        n_layers: QNN layers; ``None``: :data:`DEFAULT_LAYERS`.
        n_qubits: QNN qubits; ``None``: the fewest that cover the rows.
        ansatz: The QNN's registered circuit.
        hidden: Mapping body widths; ``None``: ``(32,)``.
        activation: Mapping activation.
        prob_transform: Mapping input transform of the probabilities.
    """

    scheme: ClassVar[str] = "rows"
    budget: float | int | None = None
    rank: int | None = None
    n_layers: int | None = None
    n_qubits: int | None = None
    ansatz: str = "paper"
    hidden: tuple[int, ...] | None = None
    activation: str = "tanh"
    prob_transform: str = "scaled"


@dataclass(frozen=True)
class FlatConfig(SchemeConfig):
    """The flat scheme: the paper's flat index in ``chunk``-sized pieces, one shared mapping.

    Attributes:
        chunk: Weights per basis state; ``None``: the smallest power of two within
            ``chunk_max_qubits``.
        chunk_max_qubits: Qubit cap of the automatic chunk.
        n_layers: QNN layers; ``None``: :data:`DEFAULT_LAYERS`.
        n_qubits: QNN qubits; ``None``: the fewest that cover M.
        ansatz: The QNN's registered circuit.
        mapping: A registered mapping (``"mlp"``, ``"mps"``).
        hidden: Mapping widths; ``None``: ``(16, 16)``.
        activation: MLP activation.
        bond_dim: MPS bond dimension.
        prob_transform: Mapping input transform of the probabilities.
        train_affine: Train each tensor's scale and offset.
        standardize: Standardise each tensor's raw outputs before the affine.
        block_states: States mapped per streamed block (``None``: automatic).
    """

    scheme: ClassVar[str] = "flat"
    chunk: int | None = 1
    chunk_max_qubits: int = 16
    n_layers: int | None = None
    n_qubits: int | None = None
    ansatz: str = "paper"
    mapping: str = "mlp"
    hidden: tuple[int, ...] | None = None
    activation: str = "tanh"
    bond_dim: int = 4
    prob_transform: str = "scaled"
    train_affine: bool = True
    standardize: bool = True
    block_states: int | None = None


SCHEME_CONFIGS: dict[str, type[SchemeConfig]] = {
    c.scheme: c for c in (HashedConfig, RowsConfig, FlatConfig)
}
"""The built-in schemes' config classes, by scheme name."""
