"""Documented maxima for every size a file or an option can ask for, and the checks against them.

Sizes come from untrusted places: a generator file's metadata, an ``.npy`` header, a command-line
option. Each is checked *before* anything is allocated against the documented maxima below (a
hostile or mistyped value such as ``--layers 100000`` is refused at once, whatever the machine);
:func:`check_config` then checks the planned generator against the memory available now
(:mod:`qtcompress.memory`).

A size over a limit raises :class:`~qtcompress.errors.ResourceLimitError` whose one-line message
names the value, the limit and the option (or file field) to change. The limits are listed in
``docs/format.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtcompress.constants import MAX_QUBITS  # the simulator's hard ceiling
from qtcompress.errors import ConfigError, ResourceLimitError
from qtcompress.memory import check_generator_memory

if TYPE_CHECKING:
    from qtcompress.config import QTConfig
    from qtcompress.targets import Layout

__all__ = [
    "MAX_BOND_DIM",
    "MAX_CHUNK",
    "MAX_GENERATED_WEIGHTS",
    "MAX_GENERATOR_PARAMS",
    "MAX_HIDDEN_LAYERS",
    "MAX_HIDDEN_WIDTH",
    "MAX_JSON_DEPTH",
    "MAX_LAYERS",
    "MAX_LAYOUT_TENSORS",
    "MAX_QUBITS",
    "MAX_RANK",
    "MAX_SEED",
    "MAX_STEPS",
    "MAX_TENSOR_RANK",
    "check_config",
    "check_count",
    "check_qnn_size",
    "plan_generator",
]

MAX_LAYERS = 256
"""QNN layers."""
MAX_CHUNK = 1 << 16
"""Weights generated per basis state."""
MAX_HIDDEN_WIDTH = 1 << 14
"""Width of one hidden layer of the mapping MLP."""
MAX_HIDDEN_LAYERS = 16
"""Hidden layers of the mapping MLP."""
MAX_BOND_DIM = 256
"""Bond dimension of the MPS mapping."""
MAX_RANK = 1 << 12
"""Per-row feature width of the rows scheme (``QTConfig.rank``)."""
MAX_GENERATED_WEIGHTS = 1 << 33
"""Generated weights M (8.6e9: 32 GiB as float32)."""
MAX_GENERATOR_PARAMS = 1 << 28
"""Trainable generator parameters (a generator is meant to be small)."""
MAX_TENSOR_RANK = 32
"""Dimensions of one generated tensor."""
MAX_LAYOUT_TENSORS = 1 << 20
"""Generated tensors in one layout."""
MAX_JSON_DEPTH = 32
"""Nesting depth of a metadata JSON value."""
MAX_SEED = (1 << 63) - 1
"""Largest seed (torch seeds are 64-bit)."""
MAX_STEPS = 10**9
"""Training steps of one phase."""

# How a user changes each size: the command-line option and the QTConfig field.
_OPTIONS = {
    "n_qubits": "--qubits (QTConfig.n_qubits)",
    "n_layers": "--layers (QTConfig.n_layers)",
    "chunk": "--chunk (QTConfig.chunk)",
    "hidden": "--hidden (QTConfig.hidden)",
    "bond_dim": "QTConfig.bond_dim",
    "total": "--target/--exclude (generate fewer weights)",
    "rank": "--rank / --budget (QTConfig.rank)",
    "tensors": "--target/--exclude (generate fewer tensors)",
    "params": "--budget, --hidden, --rank or --chunk",
}
# Where each size lives in a generator file (docs/format.md).
_FIELDS = {
    "n_qubits": "ansatz.n_qubits",
    "n_layers": "ansatz.n_layers",
    "chunk": "config.chunk",
    "hidden": "config.hidden",
    "bond_dim": "config.bond_dim",
    "total": "layout.total",
    "rank": "config.rank",
    "tensors": "layout.tensors",
    "params": "config (generator parameters)",
}


def _too_big(
    key: str, value: int, limit: int, unit: str, source: str | None, field: str | None = None
) -> ResourceLimitError:
    """The error for a size over its documented maximum (one line, value + limit + fix).

    Sizes from options name the option to lower; sizes from a file name the field (``field``,
    default the ``_FIELDS`` entry) and say the file is corrupt or hostile.
    """
    if source is None:
        return ResourceLimitError(
            f"{key} = {value:,} exceeds the limit of {limit:,} {unit}; lower {_OPTIONS[key]}."
        )
    return ResourceLimitError(
        f"{source}: {field or _FIELDS[key]} = {value:,} exceeds the limit of {limit:,} {unit}; "
        "the file is corrupt or hostile: regenerate it within the limits of docs/format.md."
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- plain counts -----------------------------------------------------------------------------
def check_count(value: Any, name: str, *, maximum: int, minimum: int = 0) -> int:
    """Check an integer option such as a step count: an int in ``minimum..maximum``.

    Args:
        value: The value given.
        name: How the user sets it, e.g. ``"--fit-steps"``.
        maximum: Largest accepted value (e.g. :data:`MAX_STEPS`).
        minimum: Smallest accepted value.

    Returns:
        The value.

    Raises:
        ConfigError: Not an integer, or below ``minimum`` (e.g. a negative step count).
        ResourceLimitError: Above ``maximum``.
    """
    if not _is_int(value):
        raise ConfigError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}.")
    if value > maximum:
        raise ResourceLimitError(
            f"{name} = {value:,} exceeds the limit of {maximum:,}; lower {name}."
        )
    return int(value)


# -- the QNN and the generator ----------------------------------------------------------------
def check_qnn_size(
    n_qubits: int | None, n_layers: int | None, *, source: str | None = None, prefix: str = "ansatz"
) -> None:
    """Check a QNN's qubits and layers against the documented maxima.

    Memory for the state vectors is checked when the QNN is built
    (:func:`qtcompress.qnn.check_qubit_limit`) and by :func:`check_config`.

    Args:
        n_qubits: Qubits (``None``: not known yet, only the layers are checked).
        n_layers: Layers (``None``: not known yet).
        source: The file the sizes come from (``None``: command-line options / QTConfig).
        prefix: The file's metadata field holding them (``ansatz`` or ``config``).

    Raises:
        ResourceLimitError: A size over :data:`MAX_QUBITS` or :data:`MAX_LAYERS`.
    """
    if n_qubits is not None and n_qubits > MAX_QUBITS:
        raise _too_big("n_qubits", n_qubits, MAX_QUBITS, "qubits", source, f"{prefix}.n_qubits")
    if n_layers is not None and n_layers > MAX_LAYERS:
        raise _too_big("n_layers", n_layers, MAX_LAYERS, "QNN layers", source, f"{prefix}.n_layers")


def plan_generator(config: QTConfig, layout: Layout, *, source: str | None = None) -> Any:
    """Check the sizes a config sets, then build its generator on the ``meta`` device.

    Checks every size against the documented maxima (the QNN's layers and qubits first: the
    circuit is compiled while building), then runs
    :func:`~qtcompress.generator.registry.build_generator` under
    ``torch.device("meta")``: every tensor gets its shape and dtype but no memory, so the
    parameter count is known exactly, whatever the generator's scheme.

    Args:
        config: The settings.
        layout: The generated tensors.
        source: The file the config comes from (``None``: command-line options / QTConfig).

    Returns:
        The generator on the meta device.

    Raises:
        ConfigError: A value out of range (e.g. ``seed``) or an inconsistent config.
        ResourceLimitError: A size over its documented maximum.
    """
    import torch

    from qtcompress.generator.registry import build_generator

    total = layout.total
    if total > MAX_GENERATED_WEIGHTS:
        raise _too_big("total", total, MAX_GENERATED_WEIGHTS, "generated weights", source)
    if len(layout.specs) > MAX_LAYOUT_TENSORS:
        raise _too_big(
            "tensors", len(layout.specs), MAX_LAYOUT_TENSORS, "generated tensors", source
        )
    if config.seed > MAX_SEED:
        raise ConfigError(
            f"seed = {config.seed} is out of range 0..{MAX_SEED}; use a smaller "
            "--seed (QTConfig.seed)."
        )
    check_qnn_size(config.n_qubits, config.n_layers, source=source, prefix="config")
    hidden = tuple(config.hidden or ())
    if len(hidden) > MAX_HIDDEN_LAYERS:
        raise _too_big(
            "hidden", len(hidden), MAX_HIDDEN_LAYERS, "hidden layers", source, "config.hidden"
        )
    if max(hidden, default=0) > MAX_HIDDEN_WIDTH:
        raise _too_big(
            "hidden",
            max(hidden),
            MAX_HIDDEN_WIDTH,
            "units in a hidden layer",
            source,
            "config.hidden",
        )
    if config.bond_dim > MAX_BOND_DIM:
        raise _too_big(
            "bond_dim",
            config.bond_dim,
            MAX_BOND_DIM,
            "(MPS bond dimension)",
            source,
            "config.bond_dim",
        )
    rank = getattr(config, "rank", None)  # the rows scheme's feature width
    if isinstance(rank, int) and rank > MAX_RANK:
        raise _too_big("rank", rank, MAX_RANK, "(per-row feature width)", source, "config.rank")
    chunk = config.resolve_chunk(total) if config.chunk is None else config.chunk
    if getattr(config, "scheme", "flat") == "flat" and chunk > MAX_CHUNK:
        raise _too_big("chunk", chunk, MAX_CHUNK, "weights per basis state", source, "config.chunk")
    # Automatic sizes are resolved on the CPU (resolving may compute with real tensors); only
    # the build runs on the meta device.
    resolve = getattr(config, "resolve", None)
    resolved = resolve(layout) if callable(resolve) else config
    ranks = getattr(resolved, "ranks", None) or ()
    if max(ranks, default=0) > MAX_RANK:
        raise _too_big(
            "rank", max(ranks), MAX_RANK, "(per-row feature width)", source, "config.ranks"
        )
    with torch.device("meta"):
        planned = build_generator(layout, resolved)
    count = sum(p.numel() for p in planned.parameters())
    if count > MAX_GENERATOR_PARAMS:
        raise _too_big("params", count, MAX_GENERATOR_PARAMS, "generator parameters", source)
    return planned


def check_config(
    config: QTConfig,
    layout: Layout,
    *,
    training: bool = True,
    source: str | None = None,
    available: int | None = None,
) -> Any:
    """Check the generator a :class:`~qtcompress.config.QTConfig` describes, before building it.

    :func:`plan_generator` (documented maxima, exact parameter count on the meta device), then
    :func:`~qtcompress.memory.check_generator_memory`. Call it right before
    :func:`~qtcompress.generator.registry.build_generator`.

    Args:
        config: The settings.
        layout: The generated tensors.
        training: Plan for fitting (default) rather than regeneration only.
        source: The file the config comes from (``None``: command-line options / QTConfig).
        available: Bytes to plan with (default: the memory available now).

    Returns:
        The generator on the meta device.

    Raises:
        ConfigError: A value out of range (e.g. ``seed``) or an inconsistent config.
        ResourceLimitError: A size over its documented maximum, or an estimated peak over the
            memory available.
    """
    planned = plan_generator(config, layout, source=source)
    check_generator_memory(planned, layout, training=training, source=source, available=available)
    return planned
