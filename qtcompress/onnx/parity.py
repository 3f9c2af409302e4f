"""Run an ONNX graph in onnxruntime and the PyTorch model on the same inputs, and compare.

Also the input and output conventions export and comparison share: example inputs as a tuple
with a batch axis of 2 or more, outputs as a flat list of tensors, inference mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from qtcompress.errors import ConfigError, ExportError
from qtcompress.onnx.runtime import open_session

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]
DynamicAxes = Mapping[str, Mapping[int, str]]


BATCH = "batch"
"""The dynamic axis name of the batch; an input whose batch is not axis 0 names it so."""


def batch_axes(
    example_inputs: ExampleInputs,
    input_names: Sequence[str] | None,
    dynamic_axes: DynamicAxes | None,
) -> list[int]:
    """Each example input's batch axis: the one ``dynamic_axes`` calls ``batch``, else 0.

    Args:
        example_inputs: One tensor or a sequence of tensors.
        input_names: Graph input names; default ``input`` or ``input_0, input_1, ...``.
        dynamic_axes: Symbolic axes by input name (see :func:`to_onnx_proto`).
    """
    n = 1 if isinstance(example_inputs, torch.Tensor) else len(example_inputs)
    names = list(input_names) if input_names is not None else []
    if input_names is None:
        names = ["input"] if n == 1 else [f"input_{i}" for i in range(n)]
    axes = dynamic_axes or {}
    out = []
    for i in range(n):
        spec = dict(axes.get(names[i], {})) if i < len(names) else {}
        out.append(next((a for a, d in spec.items() if d == BATCH), 0))
    return out


def as_example_tuple(
    example_inputs: ExampleInputs, axes: Sequence[int] | None = None
) -> tuple[torch.Tensor, ...]:
    """Example inputs as a tuple of tensors sharing a batch axis of 2 or more.

    Args:
        example_inputs: One tensor or a sequence of tensors.
        axes: Each input's batch axis (:func:`batch_axes`); default 0 for all.

    Raises:
        ConfigError: No tensors, a batch axis under 2 (the exporter would fix it to 1), or
            batch sizes that disagree.
    """
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise ConfigError("Example inputs must be a tensor or a non-empty sequence of tensors.")
    axes = list(axes) if axes is not None else [0] * len(args)
    for i, (a, axis) in enumerate(zip(args, axes, strict=True)):
        if a.dim() <= axis or a.shape[axis] < 2:
            where = "first (batch) axis" if axis == 0 else f"batch axis {axis}"
            raise ConfigError(
                f"Example input {i} has shape {tuple(a.shape)}: the {where} must be 2 "
                "or more, otherwise the exporter may fix the batch size to 1."
            )
    if len({a.shape[axis] for a, axis in zip(args, axes, strict=True)}) != 1:
        raise ConfigError(
            f"Example inputs disagree on the batch size: {[tuple(a.shape) for a in args]}."
        )
    return args


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """A model's output as a list of tensors (a tensor, a tuple/list or a mapping of tensors).

    A mapping (a dict, a Hugging Face ``ModelOutput``, which leaves out its ``None`` fields)
    gives its values in order: the order in which the exporter flattens it into graph outputs.

    Raises:
        ConfigError: Any other output structure.
    """
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping) and all(isinstance(o, torch.Tensor) for o in out.values()):
        return list(out.values())
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return list(out)
    raise ConfigError(
        "Model output must be a tensor, or a tuple, list or mapping of tensors, got "
        f"{type(out).__name__}."
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module):  # type: ignore[no-untyped-def]
    """Context: ``model`` in eval mode, every submodule's own mode restored afterwards."""
    # Export and compare inference behaviour (BatchNorm running stats, no dropout), then give
    # the caller's model back in the mode it was in.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


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

    The inputs are run as given, with one extra row (a different batch size), and at two
    other lengths (one step shorter, and half) along each named dynamic axis, which checks
    that those axes really are dynamic.

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
    data = onnx_model if isinstance(onnx_model, bytes) else onnx_model.SerializeToString()
    try:
        session = open_session(data)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ExportError(
            f"onnxruntime cannot load the exported graph: {str(exc)[:500]} (an "
            "output name that clashes with a tensor inside the graph gives "
            "'Duplicate definition'; choose other output names)."
        ) from exc
    names = [i.name for i in session.get_inputs()]
    axes = batch_axes(example_inputs, names, dynamic_axes)
    args = as_example_tuple(example_inputs, axes)
    worst = scale = 0.0
    # One more row along each input's own batch axis.
    grown = tuple(torch.cat([a, a.narrow(ax, 0, 1)], ax) for a, ax in zip(args, axes, strict=True))
    variants = [args, grown]
    by_dim: dict[str, list[tuple[int, int]]] = {}
    for i, name in enumerate(names):
        for axis, dim in dict((dynamic_axes or {}).get(name, {})).items():
            if dim != BATCH:  # the batch grew above
                by_dim.setdefault(dim, []).append((i, axis))
    for places in by_dim.values():
        # Two other lengths (one step shorter, and half): a graph that baked in a length
        # fails at least one of them.
        full = args[places[0][0]].shape[places[0][1]]
        for length in sorted({max(1, full - 1), max(1, full // 2)} - {full}, reverse=True):
            shorter = list(args)
            for i, axis in places:
                shorter[i] = shorter[i].narrow(axis, 0, min(length, shorter[i].shape[axis]))
            variants.append(tuple(shorter))
    with eval_mode(model), torch.no_grad():
        for batch in variants:
            try:
                if params is None:
                    ref = flatten_outputs(model(*batch))
                else:
                    ref = flatten_outputs(torch.func.functional_call(model, dict(params), batch))
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
