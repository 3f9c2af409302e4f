"""Export a materialised PyTorch model to ONNX (:func:`export_onnx`, :func:`to_onnx_proto`).

Export settings (measured with torch 2.13, see ``docs/format.md``):

* ``dynamo=True, optimize=False``: the optimiser folds BatchNorm into Conv and renames or
  transposes weights, after which refilling weights by name gives silently wrong outputs. With
  ``optimize=False`` every parameter and buffer used by ``forward`` is a graph initializer named
  by its state-dict name, holding exactly its values.
* The program is taken in memory (``f=None``) and serialised by us, so the file is always
  self-contained (no ``.onnx.data`` sidecar) and written atomically.
* The batch axis is declared dynamic, and exports need an example batch of 2 or more: a batch of
  1 lets the exporter specialise the axis to 1. It is axis 0 of every input, except where
  ``dynamic_axes`` names another axis of that input ``batch`` (an LSTM state
  ``(layers, batch, hidden)``: ``{"state": {1: "batch"}}``).
* The exporter stores stack traces with absolute local paths in ``metadata_props``; they are
  stripped everywhere.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from qtcompress.constants import ONNX_ATOL, ONNX_RTOL
from qtcompress.errors import ConfigError, ExportError
from qtcompress.io.atomic import atomic_path
from qtcompress.onnx.parity import (
    BATCH,
    DynamicAxes,
    ExampleInputs,
    as_example_tuple,
    batch_axes,
    compare_outputs,
    eval_mode,
    flatten_outputs,
)


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how well it matched torch.

    Attributes:
        path: The written ONNX file.
        max_abs_diff: Largest absolute difference between onnxruntime and torch outputs over
            the example batch and a batch one larger (checks the dynamic axis); NaN if not
            verified.
        max_abs_output: Largest absolute torch output on those batches (the scale of the
            float32 rounding in ``max_abs_diff``); NaN if not verified.
        input_names: Graph input names, in ``forward`` argument order.
        output_names: Graph output names.
        opset: ONNX default-domain opset of the file.
        size_bytes: File size.
    """

    path: Path
    max_abs_diff: float
    max_abs_output: float
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    opset: int
    size_bytes: int


def _default_names(prefix: str, n: int, names: Sequence[str] | None) -> list[str]:
    if names is not None:
        names = list(names)
        if len(names) != n or len(set(names)) != n:
            raise ConfigError(f"Expected {n} distinct {prefix} names, got {names}.")
        return names
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


def strip_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove ``metadata_props`` and doc strings from every graph element, in place.

    The dynamo exporter records stack traces with absolute local paths there. Model-level
    ``metadata_props`` are cleared too.

    Args:
        model: The model to clean.

    Returns:
        The same ``model``.
    """

    def clean_graph(graph: onnx.GraphProto) -> None:
        del graph.metadata_props[:]
        graph.doc_string = ""
        for coll in (graph.input, graph.output, graph.value_info, graph.initializer):
            for item in coll:
                del item.metadata_props[:]
                item.doc_string = ""
        clean_nodes(graph.node)

    def clean_nodes(nodes: Any) -> None:
        for node in nodes:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.HasField("g"):
                    clean_graph(attr.g)
                for sub in attr.graphs:
                    clean_graph(sub)

    del model.metadata_props[:]
    model.doc_string = ""
    clean_graph(model.graph)
    for fn in model.functions:
        del fn.metadata_props[:]
        fn.doc_string = ""
        clean_nodes(fn.node)
    return model


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # LSTM/GRU exports warn about their internal `_flat_weights` attribute.
            warnings.filterwarnings("ignore", message=".*_flat_weights.*")
            yield
    finally:
        logger.setLevel(level)


def parse_dynamic_axis(text: str) -> tuple[str, int, str]:
    """``"input_ids:1=seq"`` -> ``("input_ids", 1, "seq")`` (the CLI's ``--dynamic-axis``)."""
    try:
        left, dim = text.split("=", 1)
        name, axis = left.rsplit(":", 1)
        value = int(axis)
    except ValueError:
        raise ConfigError(
            f"Bad dynamic axis {text!r}; write INPUT:AXIS=NAME, e.g. input_ids:1=seq."
        ) from None
    return name, value, dim


def dynamic_shapes(
    args: tuple[torch.Tensor, ...], names: list[str], axes: DynamicAxes | None
) -> tuple[dict[int, Any], ...]:
    """Dynamic shapes for the exporter: the batch axis of every input plus the named axes.

    Axes that share a name share one symbol (e.g. ``seq`` of ``input_ids`` and
    ``attention_mask``), which is how the exporter learns they are equal. The batch axis is
    axis 0, or the axis an input's entry names ``batch`` (its batch is elsewhere).
    """
    axes = dict(axes or {})
    unknown = sorted(set(axes) - set(names))
    if unknown:
        raise ConfigError(f"Dynamic axes name inputs {unknown}, the graph's inputs are {names}.")
    dims: dict[str, Any] = {BATCH: torch.export.Dim(BATCH)}
    out = []
    for arg, name in zip(args, names, strict=True):
        named = dict(axes.get(name, {}))
        batch = [axis for axis, dim in named.items() if dim == BATCH]
        if len(batch) > 1 or not all(isinstance(a, int) and 0 <= a < arg.ndim for a in batch):
            raise ConfigError(
                f"Input {name!r} (shape {tuple(arg.shape)}) names axes {batch} 'batch'; name "
                "one of its axes, the one that holds the batch."
            )
        spec: dict[int, Any] = {batch[0] if batch else 0: dims[BATCH]}
        for axis, dim in named.items():
            if dim == BATCH:
                continue
            if not isinstance(axis, int) or not 0 <= axis < arg.ndim or axis in spec:
                raise ConfigError(
                    f"Dynamic axis {axis!r} of input {name!r} (shape "
                    f"{tuple(arg.shape)}) must be one of its axes other than the batch axis "
                    f"{next(iter(spec))}."
                )
            if not isinstance(dim, str) or not dim.isidentifier():
                raise ConfigError(f"Dynamic axis name {dim!r} must be an identifier.")
            # Dim's default minimum is 0/1; the example's length must be >= 2 to stay symbolic.
            dims.setdefault(dim, torch.export.Dim(dim))
            spec[axis] = dims[dim]
        out.append(spec)
    return tuple(out)


def to_onnx_proto(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: DynamicAxes | None = None,
) -> onnx.ModelProto:
    """Export ``model`` (in eval mode) to an in-memory ONNX model with dynamic axes.

    Args:
        model: A materialised model (real weights, not meta tensors).
        example_inputs: One tensor or a sequence of tensors (``forward``'s positional
            arguments), each with batch size >= 2 on axis 0.
        input_names: Graph input names; default ``input`` or ``input_0, input_1, ...``.
        output_names: Graph output names; default ``output`` or ``output_0, ...``.
        dynamic_axes: Axes beyond the batch that stay symbolic, by input name:
            ``{"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}``; the same name means
            the same length. An axis named ``batch`` is that input's batch axis instead of 0
            (``{"state": {1: "batch"}}`` for a state ``(layers, batch, hidden)``).

    Returns:
        The stripped ``ModelProto`` with all weights inside it.

    Raises:
        ConfigError: Bad example inputs, names or dynamic axes (checked before exporting).
        ExportError: The exporter failed, or an axis that should be dynamic came out fixed.
    """
    n_in = 1 if isinstance(example_inputs, torch.Tensor) else len(example_inputs)
    in_names = _default_names("input", n_in, input_names)
    args = as_example_tuple(example_inputs, batch_axes(example_inputs, in_names, dynamic_axes))
    dynamic = dynamic_shapes(args, in_names, dynamic_axes)
    with eval_mode(model), torch.no_grad():
        n_out = len(flatten_outputs(model(*args)))
        out_names = _default_names("output", n_out, output_names)
        clash = sorted(set(in_names) & set(out_names))
        if clash:
            raise ConfigError(
                f"Names {clash} are used for both an input and an output; give "
                "every graph input and output its own name."
            )
        try:
            # The exporter prints progress to stdout even with verbose=False, and logs
            # warnings that say nothing about the user's model (torchvision missing, torch
            # internals deprecations): keep the command line quiet.
            with (
                contextlib.redirect_stdout(io.StringIO()),
                _quiet_exporter(),
                warnings.catch_warnings(),
            ):
                # Axes that share a Dim are named once; the exporter warns about each alias.
                warnings.filterwarnings("ignore", message=".*will not be used, since it shares")
                program = torch.onnx.export(
                    model,
                    args,
                    dynamo=True,
                    optimize=False,
                    verbose=False,
                    input_names=in_names,
                    output_names=out_names,
                    dynamic_shapes=dynamic,
                )
        except Exception as exc:  # the exporter raises many unrelated types
            raise ExportError(
                f"torch.onnx.export could not export {type(model).__name__}: "
                f"{type(exc).__name__}: {str(exc)[:1000]}"
            ) from exc
    if program is None:  # only when f= is given, which we never do
        raise ExportError(f"torch.onnx.export returned no program for {type(model).__name__}.")
    proto = program.model_proto
    strip_metadata(proto)
    for inp, spec in zip(proto.graph.input, dynamic, strict=False):
        dims = inp.type.tensor_type.shape.dim
        for axis, symbol in spec.items():
            if axis >= len(dims) or not dims[axis].dim_param:
                fixed = dims[axis].dim_value if axis < len(dims) else "none"
                what = "batch axis" if symbol.__name__ == BATCH else f"dynamic axis {axis}"
                raise ExportError(
                    f"Exported graph input {inp.name!r} has a fixed {what} ({fixed}); the model "
                    "probably depends on that size (e.g. a hard-coded reshape or a length "
                    "check), so it cannot run at other sizes."
                )
    return proto


def _onnx_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write a self-contained ONNX file atomically after ``onnx.checker`` (full check) passes.

    Args:
        model: A model with all initializer data inline.
        path: Destination (``.onnx``).

    Returns:
        The destination path.

    Raises:
        MissingFileError: The destination folder does not exist.
        ExportError: The model fails ``onnx.checker.check_model(full_check=True)``.
    """
    data = model.SerializeToString()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ExportError(f"ONNX model for {str(path)!r} fails onnx.checker: {exc}") from exc
    return Path(path)


def shared_or_exported(
    model: nn.Module,
    example_inputs: ExampleInputs,
    exported: onnx.ModelProto | None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: DynamicAxes | None = None,
) -> onnx.ModelProto:
    """``exported`` where the caller shares one export between files, else a fresh export.

    Args:
        model: The model ``exported`` came from, or the one to export.
        example_inputs: As for :func:`to_onnx_proto`.
        exported: A graph already exported from ``model`` (not modified), or ``None``.
        input_names: As for :func:`to_onnx_proto`.
        output_names: As for :func:`to_onnx_proto`.
        dynamic_axes: As for :func:`to_onnx_proto`.

    Returns:
        The graph to use.
    """
    if exported is not None:
        return exported
    return to_onnx_proto(
        model,
        example_inputs,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
    )


def export_onnx(
    model: nn.Module,
    example_inputs: ExampleInputs,
    path: str | os.PathLike[str],
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    atol: float = ONNX_ATOL,
    rtol: float = ONNX_RTOL,
    verify: bool = True,
    dynamic_axes: DynamicAxes | None = None,
    exported: onnx.ModelProto | None = None,
) -> ExportReport:
    """Export ``model`` to one self-contained ONNX file and check it against torch.

    Args:
        model: A materialised model; it is exported in eval mode (its mode is restored).
        example_inputs: One tensor or a sequence of tensors with batch size >= 2.
        path: Destination file; written atomically, nothing is left on failure.
        input_names: Graph input names (see :func:`to_onnx_proto`).
        output_names: Graph output names.
        atol: Allowed absolute difference between onnxruntime and torch outputs.
        rtol: Allowed difference relative to the largest torch output (float32 rounding grows
            with the output's magnitude); the check is ``max_abs_diff <= atol + rtol * scale``.
        verify: Run onnxruntime and compare (skip only for models too large to run twice).
        dynamic_axes: Axes beyond the batch that stay symbolic (see :func:`to_onnx_proto`).
        exported: A graph already exported from ``model`` by :func:`to_onnx_proto` with the
            same inputs and names: it is checked and written instead of exporting again (the
            pipeline exports once for this file and the generator file's skeleton).

    Returns:
        An :class:`ExportReport` with the measured difference.

    Raises:
        ConfigError: Bad arguments.
        MissingFileError: The destination folder does not exist.
        ExportError: Export failed, the checker rejected the model, or the difference
            exceeded the tolerance.
    """
    if not (atol >= 0 and rtol >= 0):
        raise ConfigError(f"atol and rtol must be >= 0, got {atol} and {rtol}.")
    proto = shared_or_exported(
        model,
        example_inputs,
        exported,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
    )
    diff = scale = float("nan")
    if verify:
        diff, scale = compare_outputs(proto, model, example_inputs, dynamic_axes=dynamic_axes)
        if not diff <= atol + rtol * scale:
            raise ExportError(
                f"ONNX export of {type(model).__name__} differs from torch by max abs "
                f"{diff:.3g} > atol {atol:g} + rtol {rtol:g} x max |output| {scale:.3g}; "
                f"nothing was written to {str(path)!r}."
            )
    dest = save_onnx(proto, path)
    return ExportReport(
        path=dest,
        max_abs_diff=diff,
        max_abs_output=scale,
        input_names=tuple(i.name for i in proto.graph.input),
        output_names=tuple(o.name for o in proto.graph.output),
        opset=_onnx_opset(proto),
        size_bytes=dest.stat().st_size,
    )
