"""Ship an ONNX graph without its weights, and fill it back from regenerated weights.

The *skeleton* is the exported graph with the data of every weight initializer removed (name,
shape and dtype kept), plus a map from initializer names to state-dict names. It is a few KB and
is stored in the generator file; :func:`fill_skeleton` turns it back into a full model from
regenerated weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from qtcompress.errors import ExportError, FormatError, NonFiniteError
from qtcompress.onnx.export import shared_or_exported
from qtcompress.onnx.parity import DynamicAxes, ExampleInputs, compare_outputs

SKELETON_KEY = "qtcompress.skeleton"
"""Model ``metadata_props`` key holding the skeleton's JSON weight map."""

_SKELETON_VERSION = 1


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
    proto = shared_or_exported(
        model,
        example_inputs,
        exported,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
    )
    skeleton = make_skeleton(proto, model)
    if verify_atol is not None:
        noisy = _perturbed_state(model)
        filled = fill_skeleton(
            skeleton, {k: v.numpy() for k, v in noisy.items() if v.dtype != torch.bfloat16}
        )
        diff, scale = compare_outputs(
            filled, model, example_inputs, params=noisy, dynamic_axes=dynamic_axes
        )
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
