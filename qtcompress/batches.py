"""Model inputs and outputs of any shape of call.

A :class:`Batch` is one mini-batch of model inputs: positional inputs, keyword inputs and
optional labels. :meth:`Batch.call` runs a model on it as ``fn(*args, **kwargs)``, so models
called as ``model(x)``, ``model(x, state)`` or ``model(input_ids=..., attention_mask=...)`` are
all handled the same way. Inputs may be nested tuples, lists and dicts of tensors (an LSTM state
``(h, c)``); every tensor with at least one dimension is split along dim 0, which is the batch
dimension. Zero-dimensional tensors and non-tensor values (``use_cache=False``) are constants:
every batch passes them unchanged.

An :class:`InputSource` is training or evaluation data in any of the accepted forms (see
:meth:`InputSource.of`) and hands out batches: by step for training (:meth:`InputSource.batch_at`),
in order for evaluation (:meth:`InputSource.batches`), and the first few examples for example
inputs and fail-fast checks (:meth:`InputSource.head`).

:func:`select_output` picks the tensor to train on from whatever the model returns (a tensor, a
tuple, a dict, a Hugging Face ``ModelOutput``, a dataclass or a namedtuple), and
:func:`check_call` runs a model once on a small batch and turns a wrong call into a one-line
:class:`~qtcompress.errors.ConfigError` naming the model's ``forward`` signature and the inputs.

Labels inside dataset items or batches (the ``labels_in_items`` rule):

- ``labels_in_items=False`` (default): items hold only inputs. Labels, if any, come from the
  ``labels`` argument (in-memory data and map-style datasets, aligned by index) or from items
  that are :class:`Batch` objects with labels.
- ``labels_in_items=True``: every item (dataset example, loader batch, or the in-memory tuple or
  list) is a tuple or list of at least two elements whose **last element is the label**; the
  elements before it are the inputs. A single remaining element is read as an ordinary item (a
  tensor is one positional input, a tuple or list are positional inputs, a dict keyword inputs),
  several remaining elements are positional inputs. So ``TensorDataset(x, y)`` gives
  ``model(x)``, ``TensorDataset(x, s, y)`` gives ``model(x, s)``, and items
  ``({"input_ids": ..., "attention_mask": ...}, y)`` give keyword inputs.
- ``labels_in_items="labels"`` (any string): every item is a dict and that key holds the label;
  it is removed from the keyword inputs (the Hugging Face convention).

This module imports only torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from qtcompress.errors import ConfigError, NonFiniteError, QTCompressError

__all__ = [
    "ACCEPTED_FORMS",
    "Batch",
    "InputSource",
    "batch_indices",
    "check_call",
    "forward_signature",
    "select_output",
]

ACCEPTED_FORMS = (
    "a tensor (one positional input), a tuple or list of tensors (positional inputs), a dict of "
    "tensors (keyword inputs), a Batch, a map-style torch Dataset, a DataLoader, or a "
    "re-iterable of batches (a list, or an object whose __iter__ starts a new pass)"
)
"""The forms :meth:`InputSource.of` accepts, as quoted in its error messages."""

DEFAULT_OUTPUT_KEYS = ("logits", "last_hidden_state")
"""Keys and attributes :func:`select_output` tries, in order, when no key is given."""


# -- nested structures of tensors ---------------------------------------------------------------
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


def _check_batch(batch: Batch, where: str) -> Batch:
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
        raise ConfigError(f"The {where} differ in length along dim 0: {listed}.")
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


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


# -- sources ------------------------------------------------------------------------------------
class InputSource:
    """Training or evaluation data in any of the accepted forms; build with :meth:`of`.

    Attributes:
        n: Number of examples when known, else ``None``.
        exact_resume: Whether :meth:`batch_at` is a pure function of its arguments (in-memory
            data and map-style datasets). Loaders and other iterables are cycled through in
            their own order, so a resumed fit does not see the same batches as an
            uninterrupted one.
    """

    n: int | None = None
    exact_resume: bool = True

    @classmethod
    def of(
        cls, data: Any, labels: torch.Tensor | None = None, *, labels_in_items: bool | str = False
    ) -> InputSource:
        """Wrap ``data`` in the matching source.

        Accepted forms:

        - a tensor: one positional input;
        - a tuple, or a list whose first item is a tensor: positional inputs (nested tuples,
          lists and dicts of tensors allowed);
        - a dict (any mapping with string keys): keyword inputs;
        - a :class:`Batch`;
        - a map-style ``torch.utils.data.Dataset`` (with ``__len__``): items are read like a
          batch (tensor, tuple, dict) and collated with ``default_collate``;
        - a ``DataLoader``, or any re-iterable of batches (a list whose first item is not a
          tensor, or an object whose ``__iter__`` starts a new pass): each yielded batch is a
          tensor, tuple, list, dict or :class:`Batch`.

        In-memory forms are checked at once: every batched tensor has the same dim 0 (> 0), the
        labels match it, and floating-point inputs are finite. Batches from datasets and
        iterables get the same checks when they are produced.

        Args:
            data: The inputs.
            labels: ``(N, ...)`` labels for in-memory data and map-style datasets (aligned by
                index); not allowed with loaders and iterables (put them in the batches).
            labels_in_items: Labels inside the items; see the module docstring for the rule.

        Returns:
            The source; an :class:`InputSource` passed in is returned as it is.

        Raises:
            ConfigError: An unaccepted form, sizes that differ, or labels given twice.
            NonFiniteError: In-memory floating-point inputs or labels hold NaN or Inf.
        """
        if labels is not None and not isinstance(labels, torch.Tensor):
            raise ConfigError(f"labels must be a tensor, got {type(labels).__name__}.")
        if labels is not None and labels_in_items is not False:
            raise ConfigError(
                "Pass labels either as `labels` or inside the items (labels_in_items), not both."
            )
        if not isinstance(labels_in_items, (bool, str)):
            raise ConfigError(f"labels_in_items must be a bool or a key, got {labels_in_items!r}.")
        if isinstance(data, InputSource):
            if labels is not None or labels_in_items is not False:
                raise ConfigError(
                    "An InputSource already fixes its labels; do not pass labels "
                    "or labels_in_items with it."
                )
            return data
        in_memory = isinstance(data, (Batch, torch.Tensor, tuple, Mapping)) or (
            isinstance(data, list) and bool(data) and isinstance(data[0], torch.Tensor)
        )
        if in_memory:
            if isinstance(data, torch.Tensor) and labels_in_items is not False:
                raise ConfigError(
                    "labels_in_items needs a tuple or dict of inputs, not a "
                    "single tensor; pass labels=... instead."
                )
            batch = Batch.of(data, labels_in_items=labels_in_items)
            if labels is not None:
                if batch.labels is not None:
                    raise ConfigError("The Batch already holds labels; do not pass labels too.")
                batch = dataclasses.replace(batch, labels=labels)
            return _InMemory(_check_batch(batch, "inputs"))
        if isinstance(data, DataLoader):
            if labels is not None:
                raise ConfigError(
                    "Labels cannot be aligned with a DataLoader's batches; yield "
                    "them in the batches and pass labels_in_items."
                )
            return _Iterated(data, labels_in_items, _loader_size(data))
        if isinstance(data, IterableDataset):
            raise ConfigError(
                "An IterableDataset yields single examples; wrap it in a "
                "torch.utils.data.DataLoader(dataset, batch_size=...) first."
            )
        if isinstance(data, Dataset):
            if not hasattr(data, "__len__"):
                raise ConfigError(
                    f"The dataset {type(data).__name__} has no __len__; give it "
                    "one or wrap it in a DataLoader."
                )
            return _MapDataset(data, labels, labels_in_items)
        if isinstance(data, (str, bytes)) or type(data).__module__ == "numpy":
            hint = (
                " Convert arrays with torch.from_numpy." if type(data).__module__ == "numpy" else ""
            )
            raise ConfigError(
                f"Cannot use data of type {type(data).__name__} as model inputs; "
                f"accepted: {ACCEPTED_FORMS}.{hint}"
            )
        if isinstance(data, Iterable):
            if iter(data) is data:
                raise ConfigError(
                    f"A {type(data).__name__} can be read only once, but training "
                    "cycles through the data; pass a list of batches, a "
                    "DataLoader, or an object whose __iter__ starts a new pass."
                )
            if labels is not None:
                raise ConfigError(
                    "Labels cannot be aligned with an iterable's batches; put "
                    "them in the batches and pass labels_in_items."
                )
            if isinstance(data, list):
                if not data:
                    raise ConfigError("The list of batches is empty.")
                batches = [
                    _check_batch(
                        Batch.of(b, labels_in_items=labels_in_items), f"inputs of batch {i}"
                    )
                    for i, b in enumerate(data)
                ]
                return _Iterated(batches, False, sum(len(b) for b in batches))
            return _Iterated(data, labels_in_items, None)
        raise ConfigError(
            f"Cannot use data of type {type(data).__name__} as model inputs; "
            f"accepted: {ACCEPTED_FORMS}."
        )

    def batch_at(self, step: int, batch_size: int, seed: int) -> Batch:
        """The training batch of ``step``.

        In-memory data and map-style datasets: a pure function of the arguments (the rows of
        :func:`batch_indices`), so a resumed fit sees the same batches. Loaders and iterables:
        the next batch of a cycle through them (``batch_size`` and ``seed`` are not used, and
        repeating the last step returns the same batch); resume is then not exact.

        Args:
            step: Training step (0-based).
            batch_size: Examples per batch.
            seed: Seeds the order.
        """
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """One ordered pass over the data (for evaluation).

        Args:
            batch_size: Examples per batch (loaders and iterables keep their own batches).
        """
        raise NotImplementedError

    def head(self, k: int) -> Batch:
        """The first ``k`` examples (fewer when the data has fewer), as one batch.

        For loaders and iterables these are the first examples of a new pass (batches are
        concatenated, or the first batch is cut, as needed).
        """
        raise NotImplementedError


class _InMemory(InputSource):
    """All inputs in one checked :class:`Batch`."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.n = len(batch)

    def __repr__(self) -> str:
        return f"InputSource({self.batch.describe()})"

    def batch_at(self, step: int, batch_size: int, seed: int) -> Batch:  # noqa: D102
        _check_size("batch_size", batch_size)
        assert self.n is not None
        return self.batch.take(batch_indices(step, self.n, batch_size, seed))

    def batches(self, batch_size: int) -> Iterator[Batch]:  # noqa: D102
        _check_size("batch_size", batch_size)
        assert self.n is not None
        for i in range(0, self.n, batch_size):
            yield self.batch.take(torch.arange(i, min(i + batch_size, self.n)))

    def head(self, k: int) -> Batch:  # noqa: D102
        _check_size("k", k)
        assert self.n is not None
        return self.batch.take(torch.arange(min(k, self.n)))


class _MapDataset(InputSource):
    """A map-style dataset: items by index, collated with ``default_collate``."""

    def __init__(
        self, dataset: Any, labels: torch.Tensor | None, labels_in_items: bool | str
    ) -> None:
        self.dataset = dataset
        self.labels = labels
        self.labels_in_items = labels_in_items
        self.n = len(dataset)
        if self.n < 1:
            raise ConfigError(f"The dataset {type(dataset).__name__} is empty.")
        if labels is not None and (labels.ndim < 1 or labels.shape[0] != self.n):
            got = labels.shape[0] if labels.ndim else "a scalar"
            raise ConfigError(f"The dataset has {self.n} examples but the labels have {got}.")
        self._collate(torch.arange(1), "inputs of example 0")  # fail fast on the item form

    def __repr__(self) -> str:
        return f"InputSource({type(self.dataset).__name__} of {self.n} examples)"

    def _collate(self, index: torch.Tensor, where: str) -> Batch:
        items = [self.dataset[i] for i in index.tolist()]
        batch = Batch.of(default_collate(items), labels_in_items=self.labels_in_items)
        if self.labels is not None:
            batch = dataclasses.replace(batch, labels=self.labels[index])
        return _check_batch(batch, where)

    def batch_at(self, step: int, batch_size: int, seed: int) -> Batch:  # noqa: D102
        _check_size("batch_size", batch_size)
        assert self.n is not None
        index = batch_indices(step, self.n, batch_size, seed)
        return self._collate(index, f"inputs of step {step}")

    def batches(self, batch_size: int) -> Iterator[Batch]:  # noqa: D102
        _check_size("batch_size", batch_size)
        assert self.n is not None
        for i in range(0, self.n, batch_size):
            yield self._collate(
                torch.arange(i, min(i + batch_size, self.n)),
                f"inputs of examples {i}..{min(i + batch_size, self.n) - 1}",
            )

    def head(self, k: int) -> Batch:  # noqa: D102
        _check_size("k", k)
        assert self.n is not None
        return self._collate(torch.arange(min(k, self.n)), "inputs of the first examples")


def _loader_size(loader: DataLoader[Any]) -> int | None:
    """Examples in one pass of ``loader`` when its sampler has a length, else ``None``."""
    if loader.batch_size is None:
        return None
    try:
        count = len(loader.sampler)  # type: ignore[arg-type]
    except TypeError:
        return None
    return count // loader.batch_size * loader.batch_size if loader.drop_last else count


class _Iterated(InputSource):
    """A DataLoader or another re-iterable of batches, cycled through for training."""

    exact_resume = False

    def __init__(self, data: Iterable[Any], labels_in_items: bool | str, n: int | None) -> None:
        self.data = data
        self.labels_in_items = labels_in_items
        self.n = n
        self._it: Iterator[Any] | None = None
        self._last: tuple[int, Batch] | None = None
        self._count = 0

    def __repr__(self) -> str:
        return f"InputSource({type(self.data).__name__}, {self.n or 'unknown'} examples)"

    def _read(self, item: Any, where: str) -> Batch:
        return _check_batch(Batch.of(item, labels_in_items=self.labels_in_items), where)

    def batch_at(self, step: int, batch_size: int, seed: int) -> Batch:  # noqa: D102
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.data)
            try:
                item = next(self._it)
                break
            except StopIteration:
                self._it = None
        else:
            raise ConfigError(f"The {type(self.data).__name__} yielded no batch.")
        batch = self._read(item, f"inputs of step {step}")
        self._last = (step, batch)
        return batch

    def batches(self, batch_size: int) -> Iterator[Batch]:  # noqa: D102
        for i, item in enumerate(self.data):
            yield self._read(item, f"inputs of batch {i}")

    def head(self, k: int) -> Batch:  # noqa: D102
        _check_size("k", k)
        parts: list[Batch] = []
        have = 0
        for b in self.batches(k):
            parts.append(b.take(torch.arange(min(len(b), k - have))))
            have += len(parts[-1])
            if have >= k:
                break
        if not parts:
            raise ConfigError(f"The {type(self.data).__name__} yielded no batch.")
        return parts[0] if len(parts) == 1 else _concat(parts)


def _concat(parts: list[Batch]) -> Batch:
    """Concatenate batches of the same structure along dim 0 (constants from the first)."""

    def cat(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, torch.Tensor):
            return torch.cat(values) if first.ndim >= 1 else first
        if isinstance(first, tuple) and hasattr(first, "_fields"):
            return type(first)(*(cat(list(vs)) for vs in zip(*values, strict=True)))
        if isinstance(first, (tuple, list)):
            return type(first)(cat(list(vs)) for vs in zip(*values, strict=True))
        if isinstance(first, Mapping):
            return {k: cat([v[k] for v in values]) for k in first}
        return first

    try:
        labels = [p.labels for p in parts if p.labels is not None]
        return Batch(
            cat([p.args for p in parts]),
            cat([p.kwargs for p in parts]),
            torch.cat(labels) if len(labels) == len(parts) else None,
        )
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"Batches differ in structure and cannot be joined: "
            f"{parts[0].describe()} vs {parts[-1].describe()}."
        ) from exc


# -- outputs ------------------------------------------------------------------------------------
def _fields(out: Any) -> list[tuple[str | int, Any]] | None:
    """``(key, value)`` pairs of a structured output, or ``None`` for a leaf."""
    if isinstance(out, Mapping):  # dict, Hugging Face ModelOutput (an OrderedDict)
        return list(out.items())
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # namedtuple
        return [(f, getattr(out, f)) for f in out._fields]
    if isinstance(out, (tuple, list)):
        return list(enumerate(out))
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    if hasattr(out, "__dict__") and not isinstance(out, (torch.Tensor, type)):
        return [(k, v) for k, v in vars(out).items() if not k.startswith("_")]
    return None


def _value_summary(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "Tensor " + "x".join(str(d) for d in value.shape) if value.ndim else "Tensor scalar"
    if value is None:
        return "None"
    return type(value).__name__


def _or_list(options: list[str]) -> str:
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]


def _output_error(
    out: Any, fields: list[tuple[str | int, Any]] | None, problem: str
) -> ConfigError:
    """A ConfigError saying what ``out`` holds and which keys would select a tensor."""
    kind = type(out).__name__
    if fields is None:
        held = f"output is a {_value_summary(out)}"
        return ConfigError(f"{problem}; {held}.")
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
        held = f"output is a {kind} of ({', '.join(_value_summary(v) for _, v in fields)})"
    else:
        inner = ", ".join(f"{k} ({_value_summary(v)})" for k, v in fields)
        held = f"output is a {kind} with {inner}" if fields else f"output is an empty {kind}"
    keys = [repr(k) for k, v in fields if isinstance(v, torch.Tensor)]
    hint = f"pass output={_or_list(keys)}" if keys else "it holds no tensor"
    return ConfigError(f"{problem}; {held}; {hint}.")


def select_output(out: Any, key: str | int | None = None) -> torch.Tensor:
    """The tensor to train on from whatever a model returns.

    - a tensor: itself (``key`` must be ``None``);
    - a tuple or list: element ``key`` (an int), or the first tensor;
    - a dict or a Hugging Face ``ModelOutput``: ``out[key]`` (an int picks the ``key``-th
      value, as ``ModelOutput`` does), or ``logits``, then ``last_hidden_state``, then the
      first tensor value;
    - a namedtuple, a dataclass or another object with attributes: the field or attribute
      ``key`` (an int picks by position for namedtuples and dataclasses), or the same defaults.

    Args:
        out: The model output.
        key: Which element, key or attribute; ``None`` for the defaults.

    Returns:
        The selected tensor.

    Raises:
        ConfigError: No tensor could be found or ``key`` does not select one; the message lists
            what the output holds.
    """
    if isinstance(out, torch.Tensor):
        if key is None:
            return out
        raise ConfigError(
            f"output={key!r} selects nothing: output is a Tensor "
            f"{'x'.join(str(d) for d in out.shape)}; leave output unset."
        )
    fields = _fields(out)
    if fields is None:
        raise _output_error(out, None, "The model output holds no tensor")
    if key is None:
        by_name = {k: v for k, v in fields if isinstance(k, str)}
        for name in DEFAULT_OUTPUT_KEYS:
            if isinstance(by_name.get(name), torch.Tensor):
                return by_name[name]  # type: ignore[no-any-return]
        for _, v in fields:
            if isinstance(v, torch.Tensor):
                return v
        raise _output_error(out, fields, "The model output holds no tensor")
    value: Any = None
    found = False
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise ConfigError(f"output must be a name or an index, got {key!r}.")
    for k, v in fields:
        if k == key:
            value, found = v, True
            break
    if not found and isinstance(key, int) and -len(fields) <= key < len(fields):
        value, found = fields[key][1], True
    if found and isinstance(value, torch.Tensor):
        return value
    problem = (
        f"output={key!r} is {_value_summary(value)}, not a tensor"
        if found
        else f"output={key!r} is not in the model output"
    )
    raise _output_error(out, fields, problem)


# -- calling ------------------------------------------------------------------------------------
def forward_signature(model: nn.Module) -> str:
    """``Name.forward(x, state=None)``: the model's forward parameters without annotations."""
    name = f"{type(model).__name__}.forward"
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return f"{name}(...)"
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    plain = sig.replace(parameters=params, return_annotation=inspect.Signature.empty)
    return f"{name}{plain}"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@torch.no_grad()
def check_call(model: nn.Module, batch: Batch) -> Any:
    """Run ``model`` once on ``batch`` (a few examples) and return its output.

    The call is made without gradients and in eval mode (each module's training flag is
    restored afterwards), so BatchNorm statistics are not changed. ``batch`` must already be on
    the model's device.

    Args:
        model: The model.
        batch: Its inputs, e.g. ``source.head(8)``.

    Returns:
        The model output.

    Raises:
        ConfigError: The inputs do not fit ``model.forward`` (missing or extra arguments) or the
            call raised a ``TypeError``, ``ValueError``, ``IndexError`` or ``RuntimeError``
            (shape and dtype mismatches); one line naming the forward signature and
            :meth:`Batch.describe`. Memory errors and qtcompress errors pass through.
    """
    where = f"{forward_signature(model)} cannot take {batch.describe()}"
    if type(model).__call__ is nn.Module.__call__:  # hooks aside, the call binds to forward
        try:
            sig = inspect.signature(model.forward)
        except (TypeError, ValueError):
            sig = None
        if sig is not None:
            try:
                sig.bind(*batch.args, **batch.kwargs)
            except TypeError as exc:
                hint = ""
                if (
                    "too many positional" in str(exc)
                    and len(batch.args) > 1
                    and batch.labels is None
                ):
                    hint = " (if the last input is the label, pass labels_in_items=True)"
                raise ConfigError(f"{where}: {exc}{hint}.") from exc
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return batch.call(model)
    except (torch.cuda.OutOfMemoryError, MemoryError, QTCompressError):
        raise
    except (TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise ConfigError(f"{where}: {_one_line(exc)}") from exc
    finally:
        for m, training in modes:
            m.training = training
