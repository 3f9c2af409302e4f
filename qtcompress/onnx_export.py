"""Export a materialised PyTorch model to ONNX, and ship an ONNX graph without its weights.

Export settings (measured with torch 2.13, see ``docs/format.md``):

* ``dynamo=True, optimize=False``: the optimiser folds BatchNorm into Conv and renames or
  transposes weights, after which refilling weights by name gives silently wrong outputs. With
  ``optimize=False`` every parameter and buffer used by ``forward`` is a graph initializer named
  by its state-dict name, holding exactly its values.
* The program is taken in memory (``f=None``) and serialised by us, so the file is always
  self-contained (no ``.onnx.data`` sidecar) and written atomically.
* The batch axis is declared dynamic, and exports need an example batch of 2 or more: a batch of
  1 lets the exporter specialise the axis to 1.
* The exporter stores stack traces with absolute local paths in ``metadata_props``; they are
  stripped everywhere.

The *skeleton* is the exported graph with the data of every weight initializer removed (name,
shape and dtype kept), plus a map from initializer names to state-dict names. It is a few KB and
is stored in the generator file; :func:`fill_skeleton` turns it back into a full model from
regenerated weights.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from qtcompress.atomic import atomic_path
from qtcompress.errors import ConfigError, ExportError, FormatError, NonFiniteError

__all__ = [
    "SKELETON_KEY",
    "ExportReport",
    "compare_outputs",
    "compare_with_onnxruntime",
    "export_onnx",
    "export_skeleton",
    "fill_skeleton",
    "make_skeleton",
    "save_onnx",
    "skeleton_weight_map",
    "strip_metadata",
    "to_onnx_proto",
]

SKELETON_KEY = "qtcompress.skeleton"
"""Model ``metadata_props`` key holding the skeleton's JSON weight map."""

_SKELETON_VERSION = 1

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]


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


def _as_tuple(example_inputs: ExampleInputs) -> tuple[torch.Tensor, ...]:
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise ConfigError("Example inputs must be a tensor or a non-empty sequence of tensors.")
    for i, a in enumerate(args):
        if a.dim() == 0 or a.shape[0] < 2:
            raise ConfigError(
                f"Example input {i} has shape {tuple(a.shape)}: the first (batch) axis must be 2 "
                "or more, otherwise the exporter may fix the batch size to 1."
            )
    if len({a.shape[0] for a in args}) != 1:
        raise ConfigError(
            f"Example inputs disagree on the batch size: {[tuple(a.shape) for a in args]}."
        )
    return args


def _default_names(prefix: str, n: int, names: Sequence[str] | None) -> list[str]:
    if names is not None:
        names = list(names)
        if len(names) != n or len(set(names)) != n:
            raise ConfigError(f"Expected {n} distinct {prefix} names, got {names}.")
        return names
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return list(out)
    raise ConfigError(
        f"Model output must be a tensor or a tuple/list of tensors, got {type(out).__name__}."
    )


@contextlib.contextmanager
def _eval_mode(model: nn.Module):  # type: ignore[no-untyped-def]
    # Export and compare inference behaviour (BatchNorm running stats, no dropout), then give
    # the caller's model back in the mode it was in.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


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


DynamicAxes = Mapping[str, Mapping[int, str]]


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
    ``attention_mask``), which is how the exporter learns they are equal.
    """
    axes = dict(axes or {})
    unknown = sorted(set(axes) - set(names))
    if unknown:
        raise ConfigError(f"Dynamic axes name inputs {unknown}, the graph's inputs are {names}.")
    dims: dict[str, Any] = {"batch": torch.export.Dim("batch")}
    out = []
    for arg, name in zip(args, names, strict=True):
        spec: dict[int, Any] = {0: dims["batch"]}
        for axis, dim in dict(axes.get(name, {})).items():
            if not isinstance(axis, int) or not 1 <= axis < arg.ndim:
                raise ConfigError(
                    f"Dynamic axis {axis!r} of input {name!r} (shape "
                    f"{tuple(arg.shape)}) must be in 1..{arg.ndim - 1}; axis 0 "
                    "is always the batch."
                )
            if not isinstance(dim, str) or not dim.isidentifier() or dim == "batch":
                raise ConfigError(
                    f"Dynamic axis name {dim!r} must be an identifier other than 'batch'."
                )
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
            the same length.

    Returns:
        The stripped ``ModelProto`` with all weights inside it.

    Raises:
        ConfigError: Bad example inputs, names or dynamic axes (checked before exporting).
        ExportError: The exporter failed, or an axis that should be dynamic came out fixed.
    """
    args = _as_tuple(example_inputs)
    in_names = _default_names("input", len(args), input_names)
    dynamic = dynamic_shapes(args, in_names, dynamic_axes)
    with _eval_mode(model), torch.no_grad():
        n_out = len(_flatten_outputs(model(*args)))
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
        for axis in spec:
            if axis >= len(dims) or not dims[axis].dim_param:
                fixed = dims[axis].dim_value if axis < len(dims) else "none"
                what = "batch axis" if axis == 0 else f"dynamic axis {axis}"
                raise ExportError(
                    f"Exported graph input {inp.name!r} has a fixed {what} ({fixed}); the model "
                    "probably depends on that size (e.g. a hard-coded reshape or a length "
                    "check), so it cannot run at other sizes."
                )
    return proto


def _onnx_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)


def _ort_session(model: onnx.ModelProto | bytes):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    data = model if isinstance(model, bytes) else model.SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ExportError(
            f"onnxruntime cannot load the exported graph: {str(exc)[:500]} (an "
            "output name that clashes with a tensor inside the graph gives "
            "'Duplicate definition'; choose other output names)."
        ) from exc


def compare_with_onnxruntime(
    onnx_model: onnx.ModelProto | bytes,
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """Run the ONNX model in onnxruntime and torch on the same inputs; return the max abs diff.

    See :func:`compare_outputs`, which also returns the largest torch output magnitude.
    """
    return compare_outputs(onnx_model, model, example_inputs, params=params)[0]


def compare_outputs(
    onnx_model: onnx.ModelProto | bytes,
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    dynamic_axes: DynamicAxes | None = None,
) -> tuple[float, float]:
    """Run the ONNX model in onnxruntime and torch on the same inputs.

    The inputs are run as given, with one extra row (a different batch size), and one step
    shorter along each named dynamic axis, which checks that those axes really are dynamic.

    Args:
        onnx_model: The model, or its serialised bytes.
        model: The torch model.
        example_inputs: Inputs as for :func:`to_onnx_proto`.
        params: Optional parameters/buffers to run ``model`` with instead of its own
            (``torch.func.functional_call``).
        dynamic_axes: The named axes of :func:`to_onnx_proto`, by graph input name.

    Returns:
        ``(max_abs_diff, max_abs_output)``: the largest absolute difference over all outputs
        (``inf`` if shapes differ or only one side is NaN) and the largest absolute torch
        output, the scale that float32 rounding errors grow with.

    Raises:
        ExportError: torch or onnxruntime fails on one of the two batch sizes.
    """
    args = _as_tuple(example_inputs)
    session = _ort_session(onnx_model)
    names = [i.name for i in session.get_inputs()]
    worst = scale = 0.0
    variants = [args, tuple(torch.cat([a, a[:1]]) for a in args)]
    by_dim: dict[str, list[tuple[int, int]]] = {}
    for i, name in enumerate(names):
        for axis, dim in dict((dynamic_axes or {}).get(name, {})).items():
            by_dim.setdefault(dim, []).append((i, axis))
    for places in by_dim.values():
        shorter = list(args)
        for i, axis in places:
            shorter[i] = shorter[i].narrow(axis, 0, max(1, shorter[i].shape[axis] - 1))
        variants.append(tuple(shorter))
    with _eval_mode(model), torch.no_grad():
        for batch in variants:
            try:
                if params is None:
                    ref = _flatten_outputs(model(*batch))
                else:
                    ref = _flatten_outputs(torch.func.functional_call(model, dict(params), batch))
                feeds = {n: a.numpy() for n, a in zip(names, batch, strict=True)}
                got = session.run(None, feeds)
            except Exception as exc:  # torch or onnxruntime rejected these sizes
                shapes = ", ".join(str(tuple(a.shape)) for a in batch)
                raise ExportError(
                    f"{type(model).__name__} does not run on inputs of shapes {shapes} in torch "
                    f"or onnxruntime, so its dynamic axes are not fully dynamic: "
                    f"{type(exc).__name__}: {str(exc)[:300]}"
                ) from exc
            if len(got) != len(ref):
                return float("inf"), scale
            for r, g in zip(ref, got, strict=True):
                r_np = r.detach().cpu().numpy()
                if r_np.shape != g.shape or not np.array_equal(np.isnan(r_np), np.isnan(g)):
                    return float("inf"), scale
                if r_np.size and not np.all(np.isnan(r_np)):
                    diff = np.abs(r_np.astype(np.float64) - g.astype(np.float64))
                    worst = max(worst, float(np.nanmax(diff)))
                    scale = max(scale, float(np.nanmax(np.abs(r_np.astype(np.float64)))))
    return worst, scale


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


def export_onnx(
    model: nn.Module,
    example_inputs: ExampleInputs,
    path: str | os.PathLike[str],
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
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
    proto = (
        exported
        if exported is not None
        else to_onnx_proto(
            model,
            example_inputs,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )
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


# --------------------------------------------------------------------------------------------
# Skeleton: the graph without its weights.


def _state_arrays(model: nn.Module) -> tuple[dict[str, np.ndarray], list[set[str]]]:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    groups: dict[tuple[int, int], set[str]] = {}
    for name, t in state.items():
        if t.numel():
            groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset()), set()).add(name)
    arrays = {k: v.numpy() for k, v in state.items() if v.dtype != torch.bfloat16}
    return arrays, [g for g in groups.values() if len(g) > 1]


def make_skeleton(onnx_model: onnx.ModelProto, model: nn.Module) -> bytes:
    """Remove the weight data from an exported graph and record where each weight comes from.

    Every initializer whose values equal a state-dict tensor of ``model`` becomes a weight
    slot (name, shape and dtype kept, data removed); others (graph constants) keep their data.

    Args:
        onnx_model: A graph exported with :func:`to_onnx_proto` from ``model`` (unchanged).
        model: The model it was exported from, with the same weights.

    Returns:
        The serialised skeleton (an ``onnx.ModelProto`` with a ``qtcompress.skeleton`` entry
        in its ``metadata_props``).

    Raises:
        ExportError: An initializer named like a weight holds other values (the graph was
            optimised), a constant matches several weights, or two weights were merged into
            one initializer.
    """
    arrays, alias_groups = _state_arrays(model)
    alias_of = {n: g for g in alias_groups for n in g}
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(onnx_model)
    weight_map: dict[str, str] = {}
    new_inits: list[onnx.TensorProto] = []  # same order as the export
    for init in skeleton.graph.initializer:
        value = numpy_helper.to_array(init)
        if init.name in arrays:
            ref = arrays[init.name]
            if ref.shape != value.shape or not np.array_equal(ref, value, equal_nan=True):
                raise ExportError(
                    f"ONNX initializer {init.name!r} does not hold state-dict tensor "
                    f"{init.name!r} unchanged (shape {value.shape} vs {ref.shape}); export with "
                    "optimize=False."
                )
            weight_map[init.name] = init.name
        else:
            matches = sorted(
                {
                    min(alias_of.get(k, {k}))
                    for k, a in arrays.items()
                    if a.shape == value.shape
                    and a.dtype == value.dtype
                    and a.size
                    and np.array_equal(a, value, equal_nan=True)
                }
            )
            if len(matches) > 1:
                raise ExportError(
                    f"ONNX initializer {init.name!r} equals several weights {matches}; cannot "
                    "tell which one it is. Give those weights distinct values before export."
                )
            if not matches:
                new_inits.append(init)  # a graph constant: keep its data
                continue
            weight_map[init.name] = matches[0]
        slot = onnx.TensorProto(name=init.name, data_type=init.data_type)
        slot.dims.extend(init.dims)
        new_inits.append(slot)
    used = set(weight_map.values())
    used |= {a for n in list(used) for a in alias_of.get(n, ())}
    unused = sorted(set(arrays) - used)
    # A weight that is absent from the graph but equals one that is present was most likely
    # merged with it by the exporter; refilling would silently give both the same value.
    for name in unused:
        a = arrays[name]
        if not a.size or not np.issubdtype(a.dtype, np.floating):
            continue
        for onnx_name, sd_name in weight_map.items():
            b = arrays[sd_name]
            if a.shape == b.shape and np.array_equal(a, b):
                raise ExportError(
                    f"Weight {name!r} is not in the ONNX graph but equals {sd_name!r} (initializer "
                    f"{onnx_name!r}): the exporter probably merged them. Give them distinct "
                    "values before export."
                )
    new_inits = [onnx.TensorProto.FromString(i.SerializeToString()) for i in new_inits]
    del skeleton.graph.initializer[:]
    skeleton.graph.initializer.extend(new_inits)
    # State-dict entries that fill_skeleton accepts and ignores: tied-weight aliases, unused
    # weights and buffers such as num_batches_tracked.
    ignored = sorted(set(model.state_dict()) - set(weight_map.values()))
    info = {"version": _SKELETON_VERSION, "weights": weight_map, "ignored": ignored}
    skeleton.metadata_props.add(key=SKELETON_KEY, value=json.dumps(info, sort_keys=True))
    return skeleton.SerializeToString()


def _perturbed_state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    # Positive-offset, multiplicative noise: keeps variances positive and makes equal tensors
    # (e.g. all-zero biases) different, so a merged or baked-in weight shows up as a mismatch.
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    by_ptr: dict[tuple[int, int], torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or not t.numel():
            out[name] = t
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in by_ptr:
            scale = 0.8 + 0.4 * torch.rand(t.shape, generator=g)
            shift = 0.05 * torch.rand(t.shape, generator=g)
            by_ptr[key] = (t.detach().float() * scale + shift).to(t.dtype)
        out[name] = by_ptr[key]
    return out


def export_skeleton(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    verify_atol: float | None = 1e-4,
    dynamic_axes: DynamicAxes | None = None,
    exported: onnx.ModelProto | None = None,
) -> bytes:
    """Export ``model`` and return its weightless skeleton (see :func:`make_skeleton`).

    With ``verify_atol`` set, the skeleton is refilled with *perturbed* weights and compared in
    onnxruntime with torch run on the same perturbed weights. This proves that every weight
    really is a refillable slot (not folded into a constant, merged, or transformed).

    Args:
        model: A materialised model.
        example_inputs: As for :func:`to_onnx_proto`.
        input_names: Graph input names.
        output_names: Graph output names.
        verify_atol: Allowed difference of the perturbed check, relative to the largest
            output when that exceeds 1 (absolute otherwise); ``None`` skips it.
        dynamic_axes: Axes beyond the batch that stay symbolic (see :func:`to_onnx_proto`).
        exported: A graph already exported from ``model`` (see :func:`export_onnx`); it is
            not modified.

    Returns:
        The serialised skeleton.

    Raises:
        ConfigError: Bad inputs.
        ExportError: Export failed, or the skeleton cannot be refilled faithfully.
    """
    proto = (
        exported
        if exported is not None
        else to_onnx_proto(
            model,
            example_inputs,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )
    )
    skeleton = make_skeleton(proto, model)
    if verify_atol is not None:
        noisy = _perturbed_state(model)
        filled = fill_skeleton(
            skeleton, {k: v.numpy() for k, v in noisy.items() if v.dtype != torch.bfloat16}
        )
        diff, scale = compare_outputs(filled, model, example_inputs, params=noisy)
        # A weight baked into the graph shows up at ~10% of the output scale (the perturbation
        # is +-20%); float32 rounding stays near 1e-6 of it. Scale the bound with the outputs.
        bound = verify_atol * max(1.0, scale)
        if not diff <= bound:
            raise ExportError(
                f"The skeleton of {type(model).__name__} refilled with perturbed weights differs "
                f"from torch by {diff:.3g} > {bound:.3g} (outputs up to {scale:.3g}): some "
                "weight is baked into the graph or transformed, so regenerated weights would "
                "not be used faithfully."
            )
    return skeleton


def _parse_skeleton(skeleton: bytes) -> tuple[onnx.ModelProto, dict[str, str], set[str]]:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(bytes(skeleton))
    except Exception as exc:  # protobuf raises DecodeError
        raise FormatError(f"ONNX skeleton is corrupt: {exc}") from exc
    raw = next((p.value for p in proto.metadata_props if p.key == SKELETON_KEY), None)
    if raw is None:
        raise FormatError(
            f"Bytes are not a qtcompress ONNX skeleton (no {SKELETON_KEY!r} metadata)."
        )
    try:
        info = json.loads(raw)
        version = info["version"]
        weight_map = dict(info["weights"])
        ignored = set(info["ignored"])
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"ONNX skeleton has malformed {SKELETON_KEY!r} metadata: {exc}") from exc
    if version != _SKELETON_VERSION:
        raise FormatError(
            f"ONNX skeleton version {version!r} is not supported (this qtcompress reads "
            f"version {_SKELETON_VERSION})."
        )
    names = {i.name for i in proto.graph.initializer}
    lost = sorted(set(weight_map) - names)
    if lost:
        raise FormatError(f"ONNX skeleton maps initializers that are not in its graph: {lost}.")
    return proto, weight_map, ignored


def skeleton_weight_map(skeleton: bytes) -> dict[str, str]:
    """Return the skeleton's map from ONNX initializer names to state-dict names.

    Args:
        skeleton: Bytes from :func:`make_skeleton` / :func:`export_skeleton`.

    Returns:
        ``{onnx_initializer_name: state_dict_name}`` for every weight slot.

    Raises:
        FormatError: The bytes are not a valid skeleton.
    """
    return _parse_skeleton(skeleton)[1]


def fill_skeleton(skeleton: bytes, weights: Mapping[str, Any]) -> onnx.ModelProto:
    """Put weights back into a skeleton and return the complete ONNX model.

    Args:
        skeleton: Bytes from :func:`make_skeleton` / :func:`export_skeleton`.
        weights: State-dict names to arrays (numpy arrays or torch tensors). Every weight slot
            must be given; state-dict entries the graph does not use (tied-weight aliases,
            ``num_batches_tracked``, unused modules) are accepted and ignored.

    Returns:
        The filled model (without the skeleton metadata), ready for ``onnx.save`` or
        onnxruntime.

    Raises:
        FormatError: The skeleton is invalid, weights are missing or unknown (named), or a
            weight's shape or dtype does not match its slot.
        NonFiniteError: A floating-point weight holds NaN or Inf.
    """
    proto, weight_map, ignored = _parse_skeleton(skeleton)
    needed = set(weight_map.values())
    missing = sorted(needed - set(weights))
    extra = sorted(set(weights) - needed - ignored)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing weights {missing}")
        if extra:
            parts.append(f"unknown weights {extra}")
        raise FormatError("Cannot fill ONNX skeleton: " + ", ".join(parts) + ".")
    filled: list[onnx.TensorProto] = []
    for init in proto.graph.initializer:
        if init.name not in weight_map:
            # Copy: protobuf elements must not be referenced after the field is cleared.
            filled.append(onnx.TensorProto.FromString(init.SerializeToString()))
            continue
        sd_name = weight_map[init.name]
        value = weights[sd_name]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        value = np.asarray(value)
        want_dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        if tuple(value.shape) != tuple(init.dims) or value.dtype != want_dtype:
            raise FormatError(
                f"Weight {sd_name!r} has shape {tuple(value.shape)} and dtype {value.dtype}; "
                f"the graph expects shape {tuple(init.dims)} and dtype {np.dtype(want_dtype)}."
            )
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise NonFiniteError(f"Weight {sd_name!r} holds NaN or Inf.")
        filled.append(numpy_helper.from_array(np.ascontiguousarray(value), name=init.name))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(filled)
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key != SKELETON_KEY]
    del proto.metadata_props[:]
    for key, value in keep:
        proto.metadata_props.add(key=key, value=value)
    return proto
