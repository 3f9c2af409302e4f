"""Training or evaluation data in any accepted form (:class:`InputSource`), handed out as batches.

Batches by step for training (:meth:`InputSource.batch_at`), in order for evaluation
(:meth:`InputSource.batches`), and the first few examples for example inputs and fail-fast
checks (:meth:`InputSource.head`).

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from qtcompress.data.batch import Batch, batch_indices, check_batch
from qtcompress.errors import ConfigError

ACCEPTED_FORMS = (
    "a tensor (one positional input), a tuple or list of tensors (positional inputs), a dict of "
    "tensors (keyword inputs), a Batch, a map-style torch Dataset, a DataLoader, or a "
    "re-iterable of batches (a list, or an object whose __iter__ starts a new pass)"
)
"""The forms :meth:`InputSource.of` accepts, as quoted in its error messages."""


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
        in_memory: All examples are held as tensors, so :meth:`batch_at` returns the rows
            ``batch_indices(step, n, batch_size, seed)`` exactly as stored (what lets the
            fine-tune compute the teacher's outputs once).
    """

    n: int | None = None
    exact_resume: bool = True
    in_memory: bool = False

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
            return _InMemory(check_batch(batch, "inputs"))
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
                    check_batch(
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

    def split(self, fraction: float, seed: int) -> tuple[InputSource, InputSource]:
        """A seeded random split: ``(the rest, a held-out fraction)``.

        Raises:
            ConfigError: The data are not in memory, or too few to leave both parts non-empty.
        """
        raise ConfigError(
            f"Holding out a validation split needs in-memory data, not {self!r}; pass tensors "
            "or an .npz, or give --budget."
        )

    def rows(self, index: torch.Tensor) -> InputSource:
        """The examples at ``index`` (in that order), as an in-memory source.

        Raises:
            ConfigError: The data are not in memory.
        """
        raise ConfigError(
            f"Selecting examples by row needs in-memory data, not {self!r}; pass tensors or an "
            ".npz."
        )

    def head(self, k: int) -> Batch:
        """The first ``k`` examples (fewer when the data has fewer), as one batch.

        For loaders and iterables these are the first examples of a new pass (batches are
        concatenated, or the first batch is cut, as needed).
        """
        raise NotImplementedError


class _InMemory(InputSource):
    """All inputs in one checked :class:`Batch`."""

    in_memory = True

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

    def rows(self, index: torch.Tensor) -> InputSource:  # noqa: D102
        return _InMemory(self.batch.take(index))

    def split(self, fraction: float, seed: int) -> tuple[InputSource, InputSource]:  # noqa: D102
        assert self.n is not None
        held = int(round(self.n * fraction))
        if not 0 < held < self.n:
            raise ConfigError(
                f"Cannot hold out {fraction:.0%} of {self.n} training examples for validation; "
                "give more training data or --budget."
            )
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
        rest, val = order[held:].sort().values, order[:held].sort().values
        return _InMemory(self.batch.take(rest)), _InMemory(self.batch.take(val))


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
        return check_batch(batch, where)

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
        return check_batch(Batch.of(item, labels_in_items=self.labels_in_items), where)

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
