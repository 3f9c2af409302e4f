"""Generator schemes, registered in one place: ``register_scheme(name, resolve=..., build=...)``.

A scheme is a :class:`~qtcompress.generator.common.Generator` subclass plus two functions:

- ``resolve(config, layout, pretrained) -> QTConfig``: every automatic size fixed for this
  layout (what a generator file records), and a :class:`ConfigError` for a field the scheme does
  not use;
- ``build(layout, resolved_config) -> Generator``: the generator that config describes, exactly
  (a file is rebuilt by it before its stored values are loaded).

:meth:`QTConfig.resolve` and :func:`build_generator` dispatch on ``config.scheme``; adding a
scheme touches its own module, one ``register_scheme`` call and its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from qtcompress.constants import DEFAULT_FINETUNE_LR
from qtcompress.errors import ConfigError
from qtcompress.plugins import Registry

if TYPE_CHECKING:
    import torch

    from qtcompress.config import QTConfig
    from qtcompress.generator.common import Generator
    from qtcompress.targets import Layout

Resolver = Callable[["QTConfig", "Layout", "torch.Tensor | None"], "QTConfig"]
Builder = Callable[["Layout", "QTConfig"], "Generator"]


@dataclass(frozen=True)
class Scheme:
    """A registered generator scheme.

    Attributes:
        name: ``QTConfig.scheme`` value.
        resolve: Fixes automatic sizes (see the module docstring).
        build: Builds the generator from a resolved config.
        fields: The :class:`QTConfig` fields the scheme reads, beyond those every scheme
            reads (``target``, ``exclude``, ``include_frozen``, ``backend``, ``seed``); any
            other field set away from its default is a :class:`ConfigError` (``budget`` too:
            the flat scheme is sized by its chunk, not a budget).
        summary: One line for ``--help`` and errors.
        finetune_lr: The scheme's default phase-2 peak learning rate (measured per scheme).
        default_budget: The scheme's size when ``QTConfig.budget`` is ``None``, as a fraction
            of M (measured per scheme; docs/benchmarks.md).
        stateful_lr: The default phase-2 rate for a model that carries its state from call
            to call; ``None``: ``finetune_lr`` for every model.
    """

    name: str
    resolve: Resolver
    build: Builder
    fields: frozenset[str]
    summary: str
    finetune_lr: float = DEFAULT_FINETUNE_LR
    default_budget: float = 0.05
    stateful_lr: float | None = None

    def default_lr(self, stateful: bool = False) -> tuple[float, str]:
        """The phase-2 peak rate when none is given, and why (one phrase).

        Args:
            stateful: The model carries its state from call to call (a state link).
        """
        if self.stateful_lr is None or not stateful:
            return self.finetune_lr, f"the {self.name} scheme's default"
        return self.stateful_lr, f"the {self.name} scheme's rate for a model that carries state"


COMMON_FIELDS = frozenset(
    {"scheme", "target", "exclude", "include_frozen", "backend", "seed", "version"}
)
_SCHEMES: Registry[Scheme] = Registry("scheme")


def register_scheme(
    name: str,
    *,
    resolve: Resolver,
    build: Builder,
    fields: set[str],
    summary: str,
    finetune_lr: float = DEFAULT_FINETUNE_LR,
    default_budget: float = 0.05,
    stateful_lr: float | None = None,
) -> None:
    """Register a generator scheme under ``name`` (see the module docstring)."""
    _SCHEMES.add(
        name,
        Scheme(
            name,
            resolve,
            build,
            frozenset(fields),
            summary,
            finetune_lr,
            default_budget,
            stateful_lr,
        ),
    )


def scheme_names() -> tuple[str, ...]:
    """Registered scheme names, in registration order."""
    return _SCHEMES.names()


def get_scheme(name: str) -> Scheme:
    """The registered scheme ``name``.

    Raises:
        ConfigError: No scheme of that name is registered.
    """
    return _SCHEMES[name]


def check_fields(config: QTConfig, scheme: Scheme) -> None:
    """Refuse fields that ``scheme`` does not read but that were set away from their default.

    Raises:
        ConfigError: Names the fields and the schemes that read them.
    """
    from qtcompress.config import QTConfig

    default = QTConfig()
    unused = [
        f.name
        for f in fields(config)
        if f.name not in COMMON_FIELDS
        and f.name not in scheme.fields
        and getattr(config, f.name) != getattr(default, f.name)
    ]
    if unused:
        users = {
            n: [s.name for s in _SCHEMES.values() if n in s.fields] or ["none"] for n in unused
        }
        said = "; ".join(f"{n} ({'/'.join(users[n])})" for n in unused)
        raise ConfigError(
            f"The {scheme.name} scheme does not use {said}: drop them, or choose the scheme "
            "that reads them."
        )


def build_generator(
    layout: Layout, config: QTConfig, pretrained: torch.Tensor | None = None
) -> Generator:
    """The generator ``config`` describes for ``layout`` (automatic sizes resolved first).

    Args:
        layout: The generated tensors.
        config: A :class:`~qtcompress.config.QTConfig`.
        pretrained: Flat pretrained weights (the rows scheme spends its budget by their spectra).
    """
    resolved = config.resolve(layout, pretrained)
    return get_scheme(resolved.scheme).build(layout, resolved)


def _register_builtin() -> None:
    from qtcompress.config import DEFAULT_LAYERS
    from qtcompress.generator.flat import QTGenerator, resolve_flat
    from qtcompress.generator.hashed import HashedGenerator, resolve_hashed
    from qtcompress.generator.ranks import resolve_rows
    from qtcompress.generator.rows import RowGenerator

    register_scheme(
        "rows",
        resolve=resolve_rows,
        build=lambda layout, c: RowGenerator(
            layout,
            ranks=c.ranks or (),
            n_layers=c.n_layers or DEFAULT_LAYERS,
            n_qubits=c.n_qubits,
            hidden=tuple(c.hidden or ()),
            activation=c.activation,
            prob_transform=c.prob_transform,
            backend=c.backend,
            seed=c.seed,
            ansatz=c.ansatz,
        ),
        fields={"budget", "rank", "ranks", "n_layers", "n_qubits", "hidden", "activation"}
        | {"prob_transform", "ansatz"},
        summary="one basis state per tensor row, a low-rank head per tensor (>= ~2% of M)",
        # The suite benchmark (docs/benchmarks.md): 5% was the rows scheme's best point.
        default_budget=0.05,
    )
    register_scheme(
        "flat",
        resolve=resolve_flat,
        build=lambda layout, c: QTGenerator(
            layout,
            chunk=c.resolve_chunk(layout.total),
            n_layers=c.n_layers or DEFAULT_LAYERS,
            n_qubits=c.n_qubits,
            mapping=c.mapping,
            hidden=tuple(c.hidden or ()),
            activation=c.activation,
            bond_dim=c.bond_dim,
            prob_transform=c.prob_transform,
            backend=c.backend,
            train_affine=c.train_affine,
            standardize=c.standardize,
            block_states=c.block_states,
            seed=c.seed,
            ansatz=c.ansatz,
        ),
        fields={"chunk", "chunk_max_qubits", "n_layers", "n_qubits", "mapping", "hidden"}
        | {"activation", "bond_dim", "prob_transform", "train_affine", "standardize"}
        | {"block_states", "ansatz"},
        summary="the paper's flat index in chunk-sized pieces, one shared head",
    )
    register_scheme(
        "hashed",
        resolve=resolve_hashed,
        build=lambda layout, c: HashedGenerator(
            layout,
            values=c.values,
            n_qubits=int(c.n_qubits or 1),
            n_layers=c.n_layers or DEFAULT_LAYERS,
            allowance=int(c.allowance or 1),
            row_scales=bool(c.row_scales),
            hashed_vectors=bool(c.hashed_vectors),
            backend=c.backend,
            seed=c.seed,
            ansatz=c.ansatz,
        ),
        fields={"budget", "values", "n_qubits", "n_layers", "row_scales", "hashed_vectors"}
        | {"allowance", "ansatz"},
        summary="every weight a signed, scaled shared value from the QNN (0.05-5% of M)",
        # tools/bench_frontier.py's sweep at 0.5% of M: 1e-2 beat 3e-3 for the QNN and the table
        # on the CNN (98.3% vs 98.1%, 99.2% vs 97.8%) and for the table on the encoder.
        finetune_lr=1e-2,
        # A model that carries its state applies its weights' error at every step of an
        # unbounded stream: at 1e-2 the streaming LSTM fell from 96.7% to 94.8% between 0.5%
        # and 1% of M (3e-3: 97.2%, 96.8%; bench_wide.py, 3 seeds), and the voice-activity
        # model streamed free-running reached 62-88% over four generator seeds (3e-3:
        # 90.3-91.9%; bench_audio_stream.py). A recurrent layer alone is not the reason: the
        # CTC recogniser's BiLSTM (no carried state) lost at 3e-3 (CER 2.65% / 5.61% against
        # 2.04% / 2.22%), and the encoder wants 1e-2 (0.970 against 0.944).
        stateful_lr=3e-3,
        # The frontier (docs/benchmarks.md): at 0.5% of M the hashed QNN generator beat the rows
        # scheme's 5% default on the CNN, the streaming LSTM and the encoder; from 0.5% to 1%
        # it gained at most 1.3 points (the encoder's QNN is capped below 1%).
        default_budget=0.005,
    )


_register_builtin()
