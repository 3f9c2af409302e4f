"""One mini-batch of model inputs (:class:`Batch`), for any shape of call.

A :class:`Batch` is one mini-batch of model inputs: positional inputs, keyword inputs and
optional labels. :meth:`Batch.call` runs a model on it as ``fn(*args, **kwargs)``, so models
called as ``model(x)``, ``model(x, state)`` or ``model(input_ids=..., attention_mask=...)`` are
all handled the same way. Inputs may be nested tuples, lists and dicts of tensors (an LSTM state
``(h, c)``); every tensor with at least one dimension is split along dim 0, which is the batch
dimension. Zero-dimensional tensors and non-tensor values (``use_cache=False``) are constants:
every batch passes them unchanged.

This module imports only torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qtcompress.errors import ConfigError, NonFiniteError


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in nested tuples, lists and dicts; keep everything else."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _named_tensors(obj: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(path, tensor)`` for every tensor in a nested structure, in order."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from _named_tensors(v, f"{name}[{i}]")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _named_tensors(v, f"{name}[{k!r}]")


def _shape(t: torch.Tensor) -> str:
    """``64x14x28 float32`` (``scalar`` for a 0-d tensor; non-CPU devices appended)."""
    dims = "x".join(str(d) for d in t.shape) if t.ndim else "scalar"
    dtype = str(t.dtype).removeprefix("torch.")
    device = "" if t.device.type == "cpu" else f" {t.device}"
    return f"{dims} {dtype}{device}"


def _describe_value(obj: Any) -> str:
    """Short description of one input value: shapes for tensors, nested in parentheses."""
    if isinstance(obj, torch.Tensor):
        return _shape(obj)
    if isinstance(obj, (tuple, list)):
        return "(" + ", ".join(_describe_value(v) for v in obj) + ")"
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{k}: {_describe_value(v)}" for k, v in obj.items()) + "}"
    text = repr(obj)
    return text if len(text) <= 24 else text[:21] + "..."


# -- Batch --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Batch:
    """One mini-batch of model inputs, called as ``fn(*args, **kwargs)``.

    Tensors may be nested in tuples, lists and dicts. Every tensor with at least one dimension
    is batched along dim 0; 0-d tensors and non-tensor values are constants that :meth:`take`
    keeps as they are.

    Attributes:
        args: Positional inputs.
        kwargs: Keyword inputs.
        labels: ``(B, ...)`` labels, or ``None``; never passed to the model.
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.args, tuple):
            if not isinstance(self.args, list):
                raise ConfigError(f"Batch.args must be a tuple, got {type(self.args).__name__}.")
            object.__setattr__(self, "args", tuple(self.args))
        if not isinstance(self.kwargs, Mapping) or not all(isinstance(k, str) for k in self.kwargs):
            raise ConfigError("Batch.kwargs must be a dict with string keys (keyword inputs).")
        if not isinstance(self.kwargs, dict):
            object.__setattr__(self, "kwargs", dict(self.kwargs))
        if self.labels is not None and not isinstance(self.labels, torch.Tensor):
            raise ConfigError(
                f"Batch.labels must be a tensor or None, got {type(self.labels).__name__}."
            )

    @classmethod
    def of(cls, item: Any, *, labels_in_items: bool | str = False) -> Batch:
        """Read one batch (or one dataset item) in any of the accepted forms.

        Args:
            item: A :class:`Batch`, a tensor (one positional input), a tuple or list
                (positional inputs) or a mapping with string keys (keyword inputs).
            labels_in_items: Where the label is inside ``item``; see the module docstring.

        Returns:
            The batch.

        Raises:
            ConfigError: ``item`` has another form, or lacks the label it should hold.
        """
        if isinstance(item, Batch):
            return item
        labels: Any = None
        if labels_in_items is True:
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise ConfigError(
                    f"With labels_in_items=True every item must be a tuple or list (inputs..., "
                    f"label) of at least 2 elements; "
                    f"got {_type_summary(item)}."
                )
            *inputs, labels = item
            item = inputs[0] if len(inputs) == 1 else tuple(inputs)
        elif isinstance(labels_in_items, str):
            if not isinstance(item, Mapping) or labels_in_items not in item:
                raise ConfigError(
                    f"With labels_in_items={labels_in_items!r} every item must be a dict holding "
                    f"{labels_in_items!r}; got {_type_summary(item)}."
                )
            item = dict(item)
            labels = item.pop(labels_in_items)
        if labels is not None and not isinstance(labels, torch.Tensor):
            raise ConfigError(f"Labels must be a tensor, got {type(labels).__name__}.")
        if isinstance(item, torch.Tensor):
            return cls((item,), {}, labels)
        if isinstance(item, (tuple, list)):
            return cls(tuple(item), {}, labels)
        if isinstance(item, Mapping):
            if not all(isinstance(k, str) for k in item):
                raise ConfigError(
                    "A dict of inputs must have string keys (keyword names); got "
                    f"keys {list(item)[:4]}."
                )
            return cls((), dict(item), labels)
        raise ConfigError(
            f"Cannot read a batch from {_type_summary(item)}; a batch is a tensor, "
            "a tuple or list of inputs, a dict of keyword inputs, or a Batch."
        )

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every input tensor with its name: ``args[0]``, ``args[1][0]``, ``input_ids``, ...

        Labels are not included.
        """
        out = list(_named_tensors(self.args, "args"))
        for k, v in self.kwargs.items():
            out.extend(_named_tensors(v, k))
        return out

    def __len__(self) -> int:
        """Batch size: dim 0 of the first input tensor with at least one dimension.

        Raises:
            ConfigError: No input is a tensor with a batch dimension.
        """
        for _, t in self.named_tensors():
            if t.ndim >= 1:
                return int(t.shape[0])
        raise ConfigError(f"The batch holds no tensor with a batch dimension: {self.describe()}.")

    def call(self, fn: Callable[..., Any]) -> Any:
        """Return ``fn(*args, **kwargs)``."""
        return fn(*self.args, **self.kwargs)

    def take(self, index: torch.Tensor) -> Batch:
        """The rows ``index`` (along dim 0) of every batched tensor and of the labels.

        Args:
            index: Integer indices or a boolean mask, as for ``tensor[index]``.

        Returns:
            A new batch; constants (0-d tensors, non-tensors) are shared.
        """

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t[index.to(t.device)] if t.ndim >= 1 else t

        return Batch(
            _map_tensors(self.args, rows),
            _map_tensors(self.kwargs, rows),
            None if self.labels is None else rows(self.labels),
        )

    def to(self, device: torch.device | str) -> Batch:
        """Copy every tensor (labels included) to ``device``."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device)

        return Batch(
            _map_tensors(self.args, move),
            _map_tensors(self.kwargs, move),
            None if self.labels is None else self.labels.to(device),
        )

    def describe(self) -> str:
        """The inputs in words, for messages (labels are not included).

        Example: ``2 positional inputs (64x14x28 float32, 64x2x256 float32)`` or
        ``keyword inputs input_ids (64x64 int64), attention_mask (64x64 int64)``.
        """
        parts = []
        if self.args:
            noun = "input" if len(self.args) == 1 else "inputs"
            inner = ", ".join(_describe_value(v) for v in self.args)
            parts.append(f"{len(self.args)} positional {noun} ({inner})")
        if self.kwargs:
            inner = ", ".join(
                f"{k} ({_describe_value(v)})"
                if isinstance(v, torch.Tensor)
                else f"{k} {_describe_value(v)}"
                for k, v in self.kwargs.items()
            )
            parts.append(f"keyword inputs {inner}")
        return " and ".join(parts) if parts else "no inputs"


def _type_summary(obj: Any) -> str:
    """``a tuple of 3 items``, ``a Tensor 64x10 float32``, ``a str``: for error messages."""
    if isinstance(obj, torch.Tensor):
        return f"a Tensor {_shape(obj)}"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} item{'' if len(obj) == 1 else 's'}"
    if isinstance(obj, Mapping):
        return f"a {type(obj).__name__} with keys {list(obj)[:6]}"
    return f"a {type(obj).__name__}"


def check_batch(batch: Batch, where: str) -> Batch:
    """Check that every batched tensor and the labels agree on dim 0 (> 0) and are finite.

    Args:
        batch: The batch to check.
        where: Whose inputs, for messages (``"inputs"``, ``"inputs of batch 3"``).

    Returns:
        ``batch``.

    Raises:
        ConfigError: No batched tensor, an empty batch, or sizes that differ.
        NonFiniteError: A floating-point input or label holds NaN or Inf.
    """
    named = [(n, t) for n, t in batch.named_tensors() if t.ndim >= 1]
    if not named:
        raise ConfigError(f"The {where} hold no tensor with a batch dimension: {batch.describe()}.")
    sizes = {n: int(t.shape[0]) for n, t in named}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{n} {s}" for n, s in sizes.items())
        extra = (
            [int(batch.labels.shape[0])] if batch.labels is not None and batch.labels.ndim else []
        )
        # The most common size is the batch (ties: the labels', else the first input's).
        ref = Counter([*extra, *sizes.values()]).most_common(1)[0][0]
        hint = batch_dim_hint(named, ref)
        raise ConfigError(f"The {where} differ in length along dim 0: {listed}{hint}.")
    n = next(iter(sizes.values()))
    if n < 1:
        raise ConfigError(f"The {where} are empty (0 examples).")
    if batch.labels is not None:
        if batch.labels.ndim < 1 or batch.labels.shape[0] != n:
            got = batch.labels.shape[0] if batch.labels.ndim else "a scalar"
            raise ConfigError(f"The {where} have {n} examples but the labels have {got}.")
        named.append(("labels", batch.labels))
    for name, t in named:
        if (t.dtype.is_floating_point or t.dtype.is_complex) and not torch.isfinite(t).all():
            raise NonFiniteError(f"The {where} hold NaN or Inf in {name}.")
    return batch


def batch_dim_hint(named: list[tuple[str, torch.Tensor]], batch: int) -> str:
    """``"; input 1 (2x40x8) has the batch of 40 in dimension 1: pass --batch-dim 1=1"``.

    Names the first top-level input whose dim 0 is not ``batch`` but another dimension is
    (an LSTM state ``(layers, batch, hidden)``); ``""`` when there is none.

    Args:
        named: ``(path, tensor)`` as :meth:`Batch.named_tensors` gives them.
        batch: The batch size the other inputs agree on.
    """
    for path, t in named:
        # Only top-level inputs can be named: args[1] is input 1, a keyword input its name.
        name = path[5:-1] if path.startswith("args[") and path.count("[") == 1 else path
        if "[" in name or t.ndim < 2 or t.shape[0] == batch:
            continue
        for dim in range(1, t.ndim):
            if t.shape[dim] == batch:
                return (
                    f"; input {name} ({_shape(t)}) has the batch of {batch} in dimension {dim}: "
                    f"pass --batch-dim {name}={dim} (batch_dims={{{name!r}: {dim}}})"
                )
    return ""


# -- mini-batch order ---------------------------------------------------------------------------
def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the mini-batch used at ``step``: a pure function of its arguments.

    Each epoch is a fresh permutation seeded by ``(seed, epoch)``, so resuming at any step
    needs no sampler state.

    Args:
        step: Training step (0-based).
        n: Number of examples.
        batch_size: Examples per batch; the last batch of an epoch may be smaller.
        seed: Seeds the permutations.

    Returns:
        ``(<= batch_size,)`` int64 indices into ``range(n)``.
    """
    per_epoch = math.ceil(n / batch_size)
    epoch, j = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[j * batch_size : (j + 1) * batch_size]
