"""Calling a model on a batch: the output to train on, and a wrong call as a clear error.

:func:`select_output` picks the tensor to train on from whatever the model returns (a tensor, a
tuple, a dict, a Hugging Face ``ModelOutput``, a dataclass or a namedtuple), and
:func:`check_call` runs a model once on a small batch and turns a wrong call into a one-line
:class:`~qtcompress.errors.ConfigError` naming the model's ``forward`` signature and the inputs.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from qtcompress.data.batch import Batch
from qtcompress.errors import ConfigError, QTCompressError

DEFAULT_OUTPUT_KEYS = ("logits", "last_hidden_state")
"""Keys and attributes :func:`select_output` tries, in order, when no key is given."""


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


def leading_inputs(model: nn.Module, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Of keyword inputs ``names``, those that fill ``forward``'s first parameters in order.

    ONNX graphs take their inputs by position in ``forward``'s order
    (:func:`positional_inputs`), so keyword inputs must be ``forward``'s
    leading parameters without a gap: ``GPT2LMHeadModel.forward(input_ids, cache,
    attention_mask, ...)`` takes ``input_ids`` alone that way.

    Args:
        model: The model.
        names: Input names a data source offers (e.g. a tokenizer's outputs).

    Returns:
        ``(kept, dropped)``: the usable names in ``forward``'s order, and the others.

    Raises:
        ConfigError: ``forward``'s first parameter is none of ``names``.
    """
    try:
        params = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):  # no readable signature: trust the names as given
        return list(names), []
    kept: list[str] = []
    for param in params:
        if param not in names:
            break
        kept.append(param)
    if not kept:
        raise ConfigError(
            f"{forward_signature(model)} does not take {list(names)} as its first "
            "parameters; the data does not fit this model."
        )
    return kept, [n for n in names if n not in kept]


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


def positional_inputs(model: nn.Module, batch: Batch) -> tuple[tuple[torch.Tensor, ...], list[str]]:
    """The batch's inputs as positional tensors, and their names, in ``forward``'s order.

    ONNX graphs take positional inputs; keyword inputs are placed by their parameter names, and
    the graph's inputs are named after the parameters (``input_ids``, ``attention_mask``).
    """
    try:
        params = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):  # a callable without a readable signature
        params = []
    if not batch.kwargs:
        args = batch.args
    else:
        order = params[len(batch.args) :]
        unknown = [k for k in batch.kwargs if k not in order]
        if unknown:
            raise ConfigError(
                f"Keyword inputs {unknown} are not parameters of {forward_signature(model)}."
            )
        args = batch.args + tuple(batch.kwargs[k] for k in order if k in batch.kwargs)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise ConfigError(f"ONNX export needs tensor inputs, got {batch.describe()}.")
    names = params[: len(args)] if len(params) >= len(args) else []
    default = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    return tuple(args), (names or default)
