"""Inputs and outputs whose batch is not dimension 0 (:class:`BatchLayout`).

Everything inside qtcompress takes dimension 0 as the batch: splitting, batching, indexing,
stream state, fidelity. A model as shipped may carry its batch elsewhere, e.g. an LSTM state
``(num_layers, batch, hidden)`` in ``forward(x, state) -> (y, state)``. The user says so with
``--batch-dim 1=1`` (``PipelineSettings.batch_dims={"1": 1}``), and the batch is moved once
where the data enter (``movedim(dim, 0)``); every call of the model moves it back to the model's
own layout, and moves each declared output's batch to the front again. The exported ONNX graph
takes the inputs as the user calls the model, with the batch axis symbolic where it is.

Names: a positional input by its index (``0``, ``1``, as the ``.npz`` names it: ``x_train.1``),
a keyword input by its name (``input_ids``), an output by ``output.K`` (index ``K`` of a tuple
output, ``output.0`` for a single tensor) or ``output.NAME`` (a key of a dict output). A state
output fed back into an input (``--state``) takes that input's batch dimension by itself.

This module imports only torch.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qtcompress.data.batch import Batch
from qtcompress.data.sources import InputSource
from qtcompress.errors import ConfigError

OUTPUT_PREFIX = "output."
"""How a ``--batch-dim`` name points at an output rather than an input."""


def parse_batch_dim(text: str) -> tuple[str, int]:
    """``"1=1"`` -> ``("1", 1)``: the CLI's ``--batch-dim NAME=DIM``.

    Raises:
        ConfigError: Not a name and a non-negative integer joined by ``=``.
    """
    name, sep, dim = text.rpartition("=")
    if not sep or not name.strip() or not dim.strip().isdigit():
        raise ConfigError(
            f"--batch-dim {text!r}: give the input and its batch dimension as NAME=DIM, e.g. "
            "--batch-dim 1=1 for a state (layers, batch, hidden) passed as input 1."
        )
    return name.strip(), int(dim)


def _describe(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape) if t.ndim else "scalar"


@dataclass(frozen=True)
class BatchLayout:
    """Where the batch sits in each input and output that does not have it in dimension 0.

    Attributes:
        inputs: Batch dimension by input name (``"0"``, ``"1"``, ``"input_ids"``).
        outputs: Batch dimension by output name (``"0"``, ``"1"``, ``"logits"``).
    """

    inputs: Mapping[str, int] = field(default_factory=dict)
    outputs: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, dims: Mapping[str, int] | Sequence[str] | None) -> BatchLayout:
        """Read ``{"1": 1, "output.0": 1}`` or CLI specs ``["1=1"]``.

        Raises:
            ConfigError: A name that is empty, or a dimension that is not an integer >= 0.
        """
        if dims is None:
            return cls()
        if not isinstance(dims, Mapping):
            if isinstance(dims, str):
                dims = [dims]
            dims = dict(parse_batch_dim(spec) for spec in dims)
        inputs: dict[str, int] = {}
        outputs: dict[str, int] = {}
        for name, dim in dims.items():
            if not isinstance(name, str) or not name or name == OUTPUT_PREFIX:
                raise ConfigError(
                    f"batch_dims names {name!r}; name an input (0, 1, input_ids) or an output "
                    "(output.0)."
                )
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
                raise ConfigError(
                    f"batch_dims[{name!r}] must be a dimension >= 0, got {dim!r}; e.g. "
                    "--batch-dim 1=1."
                )
            if name.startswith(OUTPUT_PREFIX):
                outputs[name[len(OUTPUT_PREFIX) :]] = dim
            else:
                inputs[name] = dim
        return cls(inputs, outputs)

    def __bool__(self) -> bool:
        return any(self.inputs.values()) or any(self.outputs.values())

    def describe(self) -> str:
        """``input 1 in dim 1, output 1 in dim 1`` for logs."""
        parts = [f"input {k} in dim {d}" for k, d in self.inputs.items()]
        parts += [f"output {k} in dim {d}" for k, d in self.outputs.items()]
        return ", ".join(parts)

    def with_state(self, state_input: int, state_output: int) -> BatchLayout:
        """The layout with a fed-back state output in its input's batch dimension.

        A state output is fed back as its input, so its batch sits where the input's does;
        an output already named keeps its own.
        """
        dim = self.inputs.get(str(state_input))
        if dim is None or str(state_output) in self.outputs:
            return self
        return BatchLayout(dict(self.inputs), {**self.outputs, str(state_output): dim})

    # -- inputs ---------------------------------------------------------------------------------
    def _move_inputs(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], front: bool) -> Any:
        positional, kwargs = list(args), dict(kwargs)
        for name, dim in self.inputs.items():
            if name.isdigit() and int(name) < len(positional):
                holder: Any = positional
                key: Any = int(name)
            elif name in kwargs:
                holder, key = kwargs, name
            else:
                given = [str(i) for i in range(len(positional))] + list(kwargs)
                raise ConfigError(
                    f"--batch-dim {name}={dim} names input {name!r}, but the inputs are "
                    f"{', '.join(given) or 'none'}."
                )
            t = _with_dim(holder[key], dim, f"--batch-dim {name}={dim}: input {name}")
            holder[key] = t.movedim(dim, 0) if front else t.movedim(0, dim)
        return tuple(positional), kwargs

    def to_front(self, inputs: Any) -> Any:
        """In-memory inputs as the user gives them, with every batch moved to dimension 0.

        Args:
            inputs: A tensor (one positional input), a tuple or list (positional inputs), a dict
                (keyword inputs) or a :class:`Batch`, in the model's own layout; an
                :class:`~qtcompress.data.sources.InputSource` is batch-first already and
                comes back as it is.

        Returns:
            The same form, batch-first.

        Raises:
            ConfigError: The inputs are not in memory, or a named input is missing or has too
                few dimensions.
        """
        if not self.inputs or isinstance(inputs, InputSource):  # a source is batch-first
            return inputs
        if isinstance(inputs, Batch):
            args, kwargs = self._move_inputs(inputs.args, inputs.kwargs, front=True)
            return Batch(args, kwargs, inputs.labels)
        if isinstance(inputs, torch.Tensor):
            return self._move_inputs((inputs,), {}, front=True)[0][0]
        if isinstance(inputs, (tuple, list)):
            return type(inputs)(self._move_inputs(tuple(inputs), {}, front=True)[0])
        if isinstance(inputs, Mapping):
            return self._move_inputs((), inputs, front=True)[1]
        raise ConfigError(
            f"--batch-dim needs in-memory inputs (tensors, a tuple or a dict of them), not a "
            f"{type(inputs).__name__}."
        )

    def to_model(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """Batch-first ``(args, kwargs)`` in the model's own layout."""
        if not self.inputs:
            return args, kwargs
        return self._move_inputs(args, kwargs, front=False)

    def batch_to_model(self, batch: Batch) -> Batch:
        """A batch-first :class:`Batch` in the model's own layout (for calls and export)."""
        if not self.inputs:
            return batch
        args, kwargs = self.to_model(batch.args, batch.kwargs)
        return Batch(args, kwargs, batch.labels)

    # -- outputs --------------------------------------------------------------------------------
    def outputs_to_front(self, out: Any) -> Any:
        """A model's output with each named output's batch moved to dimension 0.

        Raises:
            ConfigError: A named output is not in the model's output, or has too few dimensions.
        """
        if not self.outputs:
            return out
        if isinstance(out, torch.Tensor):
            holder: Any = {"0": out}
        elif isinstance(out, (tuple, list)):
            holder = list(out)
        elif isinstance(out, Mapping):
            holder = copy.copy(out)  # keeps a ModelOutput's type and attributes in step
        else:
            raise ConfigError(
                f"--batch-dim output.*: the model returns a {type(out).__name__}, not a tensor, "
                "tuple or dict."
            )
        for name, dim in self.outputs.items():
            key: Any = int(name) if isinstance(holder, list) and name.isdigit() else name
            valid = key < len(holder) if isinstance(key, int) else key in holder
            if not valid:
                raise ConfigError(
                    f"--batch-dim output.{name}={dim}: the model output has no {name!r}."
                )
            t = _with_dim(holder[key], dim, f"--batch-dim output.{name}={dim}: output {name}")
            holder[key] = t.movedim(dim, 0)
        if isinstance(out, torch.Tensor):
            return holder["0"]
        if isinstance(out, tuple) and hasattr(out, "_fields"):  # namedtuple
            return type(out)(*holder)
        if isinstance(out, (tuple, list)):
            return type(out)(holder)
        return holder

    # -- export ---------------------------------------------------------------------------------
    def export_axes(
        self,
        input_names: Sequence[str],
        dynamic_axes: Mapping[str, Mapping[int, str]] | None,
    ) -> dict[str, dict[int, str]] | None:
        """ONNX dynamic axes with each named input's batch axis called ``batch``.

        The exporter takes an axis called ``batch`` as that input's batch axis (see
        :func:`qtcompress.onnx.export.dynamic_shapes`).

        Args:
            input_names: The graph's input names, positional inputs first (as
                :func:`qtcompress.data.model_call.positional_inputs` orders them).
            dynamic_axes: The user's other dynamic axes, by graph input name.

        Raises:
            ConfigError: A ``--dynamic-axis`` names an input's batch axis.
        """
        axes = {k: dict(v) for k, v in (dynamic_axes or {}).items()}
        for name, dim in self.inputs.items():
            graph = input_names[int(name)] if name.isdigit() else name
            given = axes.setdefault(graph, {})
            if given.get(dim, "batch") != "batch":
                raise ConfigError(
                    f"--dynamic-axis {graph}:{dim}={given[dim]} names the batch axis that "
                    f"--batch-dim {name}={dim} gives; leave it out."
                )
            given[dim] = "batch"
        return axes or None


def _with_dim(t: Any, dim: int, what: str) -> torch.Tensor:
    """``t`` if it is a tensor with a dimension ``dim``; else a :class:`ConfigError` on ``what``."""
    if not isinstance(t, torch.Tensor) or t.ndim <= dim:
        shape = _describe(t) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ConfigError(f"{what} is {shape}, which has no dimension {dim}.")
    return t
