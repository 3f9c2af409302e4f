"""The generator file (``*.qtc.safetensors``): save a compressed model, regenerate it from the file.

A generator file holds everything needed to rebuild the network without the original checkpoint:
the generator's trainable tensors (QNN angles, mapping network, per-tensor scale/offset), the
classical tensors that are not generated (BatchNorm statistics, excluded parameters), the layout
of the generated tensors, and optionally the model's ONNX graph *without weights* plus a small
check batch (inputs and the expected outputs). See ``docs/format.md``.

Example:
    >>> qt = compress(model, QTConfig(chunk=4))                          # doctest: +SKIP
    >>> qt.fit_weights(steps=300)                                        # doctest: +SKIP
    >>> save_generator(qt, "model.qtc.safetensors", example_inputs=(x[:2],))  # doctest: +SKIP
    >>> gen = load_generator("model.qtc.safetensors")   # in a fresh process  # doctest: +SKIP
    >>> gen.verify_weights().identical                                   # doctest: +SKIP
    True
    >>> gen.to_onnx("model.onnx")    # weights regenerated and filled in  # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from torch import nn

from qtcompress import __version__, limits
from qtcompress.artifact import read_artifact, save_artifact, sha256_of_tensors
from qtcompress.config import QTConfig
from qtcompress.errors import FormatError, NonFiniteError, QTCompressError, ResourceLimitError
from qtcompress.generator import AnyGenerator, QTGenerator
from qtcompress.schema import Bool, Int, Json, ListOf, MapOf, Null, Num, Obj, OneOf, Str, validate
from qtcompress.targets import Layout, TensorSpec

if TYPE_CHECKING:
    from qtcompress.api import QTModel

GENERATOR_PREFIX = "generator."
CLASSICAL_PREFIX = "classical."
CHECK_INPUT_PREFIX = "check.input."
CHECK_OUTPUT_PREFIX = "check.output."

# Relative tolerance for "the same network" when regenerated weights are not bit-identical
# (e.g. another CPU picks another qsim or BLAS kernel): far below any meaningful change.
FINGERPRINT_RTOL = 1e-5

# Floating-point dtypes a generated tensor may have (layout "dtype" names).
_FLOAT_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}

# -- the metadata schema (docs/format.md, "Generator fields") ---------------------------------
# Types and signs only: sizes are checked against qtcompress.limits, and the ansatz and mapping
# descriptions against the generator that `config` builds, after this.
_NAME = Str(min_len=1, max_len=1024)
_OPT_INT = OneOf((Null(), Int(min=1)))
_CONFIG_SPEC = Obj(
    {},
    optional={
        "target": OneOf((Null(), ListOf(Str()))),
        "exclude": ListOf(Str()),
        "include_frozen": Bool(),
        "chunk": _OPT_INT,
        "max_qubits": Int(min=1),
        "n_layers": Int(min=1),
        "n_qubits": _OPT_INT,
        "mapping": Str(max_len=64),
        "hidden": OneOf((Null(), ListOf(Int(min=1), min_len=1))),
        "activation": Str(max_len=64),
        "scheme": Str(max_len=16),
        "budget": OneOf((Null(), Num())),
        "rank": _OPT_INT,
        "ranks": OneOf((Null(), ListOf(Int(min=0), max_len=limits.MAX_LAYOUT_TENSORS))),
        "bond_dim": Int(min=1),
        "prob_transform": Str(max_len=64),
        "per_tensor_affine": Bool(),
        "standardize": Bool(),
        "backend": Str(max_len=64),
        "block_states": _OPT_INT,
        "seed": Int(min=0, max=limits.MAX_SEED),
        "version": Int(),
    },
)
_ANSATZ_SPEC = Obj(
    {
        "n_qubits": Int(min=1),
        "n_layers": Int(min=1),
        "rotations": ListOf(Str(max_len=16), min_len=1, max_len=16),
    },
    optional={"version": Int(), "entangler": Str(max_len=64)},
)
_MAPPING_SPEC = Obj(
    {"kind": Str(max_len=64), "chunk": Int(min=1), "n_qubits": Int(min=1)},
    optional={
        "hidden": ListOf(Int(min=1)),
        "activation": Str(max_len=64),
        "bond_dim": Int(min=1),
        "prob_transform": Str(max_len=64),
    },
)
_LAYOUT_SPEC = Obj(
    {
        "total": Int(min=1),
        "tensors": ListOf(
            Obj(
                {
                    "name": _NAME,
                    "dtype": Str(choices=tuple(_FLOAT_DTYPES)),
                    "offset": Int(min=0),
                    "numel": Int(min=0),
                    "aliases": ListOf(_NAME),
                    "shape": ListOf(Int(min=0), max_len=limits.MAX_TENSOR_RANK),
                }
            ),
            min_len=1,
            max_len=limits.MAX_LAYOUT_TENSORS,
        ),
        "classical": ListOf(_NAME),
        "buffers": ListOf(_NAME),
    }
)
GENERATOR_SCHEMA = Obj(
    {
        "config": _CONFIG_SPEC,
        "ansatz": _ANSATZ_SPEC,
        "mapping": _MAPPING_SPEC,
        "layout": _LAYOUT_SPEC,
        "weights_sha256": Str(pattern="[0-9a-f]{64}"),
        "weights_fingerprint": MapOf(ListOf(Num(), min_len=2, max_len=2)),
    },
    optional={"qtcompress_version": Str(max_len=64), "model": Json()},
)
"""Schema of the generator fields of a generator file's metadata (unknown fields are ignored)."""
REQUIRED_FIELDS = ("config", "ansatz", "mapping", "layout", "weights_sha256", "weights_fingerprint")


# -- helpers shared by save and load ----------------------------------------------------------
@torch.no_grad()
def generated_tensors(generator: AnyGenerator) -> dict[str, torch.Tensor]:
    """Regenerate every generated tensor (canonical names), streamed block by block.

    Save and load both use this one path, so the same generator gives bit-identical weights.
    """
    specs = generator.layout.specs  # in offset order
    offsets = [s.offset for s in specs]
    parts = [torch.empty(s.numel, dtype=torch.float32) for s in specs]  # no (M,) staging copy
    for start, block in generator.iter_blocks():
        stop = start + block.shape[0]
        i = max(0, bisect.bisect_right(offsets, start) - 1)
        while i < len(specs) and specs[i].offset < stop:
            s = specs[i]
            lo, hi = max(start, s.offset), min(stop, s.offset + s.numel)
            if lo < hi:
                parts[i][lo - s.offset : hi - s.offset] = block[lo - start : hi - start]
            i += 1
    return {s.name: p.view(s.shape).to(s.dtype) for s, p in zip(specs, parts, strict=True)}


def _non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """``"name (k values)"`` for each floating-point tensor holding NaN or Inf."""
    out = []
    for name, t in sorted(tensors.items()):
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                out.append(f"{name} ({bad} of {t.numel()} values)")
    return out


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per-tensor ``[sum, L2 norm]`` in float64.

    Tells "the same network up to rounding" from "a different network" where the hash cannot.
    """
    out = {}
    for name, t in sorted(tensors.items()):
        d = t.detach().double()
        out[name] = [float(d.sum()), float(d.norm())]
    return out


def fingerprint_distance(
    want: Mapping[str, Sequence[float]], have: Mapping[str, Sequence[float]]
) -> float:
    """Largest relative difference between two fingerprints; ``inf`` if any value is not finite.

    NaN-aware on purpose: Python's ``max`` skips NaN (``max(0.0, nan) == 0.0``), which once let
    NaN weights pass as "equivalent".
    """
    if set(want) != set(have):
        return math.inf
    worst = 0.0
    for name, (w_sum, w_norm) in want.items():
        h_sum, h_norm = have[name]
        if not all(math.isfinite(v) for v in (w_sum, w_norm, h_sum, h_norm)):
            return math.inf
        denom = max(abs(w_norm), 1e-12)
        worst = max(worst, abs(h_norm - w_norm) / denom, abs(h_sum - w_sum) / denom)
    return worst


def mapping_description(generator: nn.Module, config: QTConfig) -> dict[str, Any]:
    """The ``mapping`` metadata of ``generator``, built from ``config`` (save and load compare it).

    Args:
        generator: A flat-scheme ``QTGenerator`` or a rows-scheme ``RowGenerator`` (any device).
        config: The config it was built from (automatic sizes may still be unresolved).
    """
    g: Any = generator
    hidden = config.hidden if config.hidden is not None else config.resolve(g.layout).hidden
    desc = {
        "kind": config.mapping,
        "chunk": int(g.chunk),
        "n_qubits": int(g.n_qubits),
        "hidden": [int(h) for h in hidden or ()],
        "activation": config.activation,
        "bond_dim": config.bond_dim,
        "prob_transform": config.prob_transform,
    }
    scheme = getattr(g, "scheme", "flat")
    if scheme != "flat":
        # The rows scheme has its own MLP body (no MPS) and a per-row feature of width rank.
        desc.update(kind="mlp", scheme=scheme, rank=int(g.rank))
        desc.pop("bond_dim")
    return desc


def _layout_to_json(layout: Layout) -> dict[str, Any]:
    return {
        "total": layout.total,
        "tensors": [
            {
                "name": s.name,
                "shape": list(s.shape),
                "dtype": str(s.dtype).removeprefix("torch."),
                "offset": s.offset,
                "numel": s.numel,
                "aliases": list(s.aliases),
            }
            for s in layout.specs
        ],
        "classical": list(layout.classical),
        "buffers": list(layout.buffers),
    }


def _layout_from_json(data: dict[str, Any], source: str) -> Layout:
    """Rebuild a :class:`Layout` from metadata already checked against ``_LAYOUT_SPEC``."""
    specs = []
    offset = 0
    seen: set[str] = set()
    for item in data["tensors"]:
        shape = tuple(item["shape"])
        numel = math.prod(shape)  # Python ints: a hostile shape cannot overflow
        if numel > limits.MAX_GENERATED_WEIGHTS:
            raise ResourceLimitError(
                f"{source}: layout tensor {item['name']!r} of shape {list(shape)} has {numel:,} "
                f"weights, over the limit of {limits.MAX_GENERATED_WEIGHTS:,}; the file is "
                "corrupt or hostile."
            )
        if numel != item["numel"] or item["offset"] != offset:
            raise FormatError(
                f"{source}: layout tensor {item['name']!r}: shape {list(shape)} and offset "
                f"{item['offset']} do not match numel {item['numel']} / expected offset "
                f"{offset}; the file is corrupt."
            )
        names = (item["name"], *item["aliases"])
        dup = sorted(seen.intersection(names)) or sorted(
            n for n in set(names) if names.count(n) > 1
        )
        if dup:
            raise FormatError(f"{source}: layout names {dup} appear twice; the file is corrupt.")
        seen.update(names)
        specs.append(
            TensorSpec(
                item["name"],
                shape,
                _FLOAT_DTYPES[item["dtype"]],
                offset,
                numel,
                tuple(item["aliases"]),
            )
        )
        offset += numel
    if offset != data["total"]:
        raise FormatError(
            f"{source}: layout tensors add up to {offset} weights, metadata says "
            f"{data['total']}; the file is corrupt."
        )
    return Layout(tuple(specs), offset, tuple(data["classical"]), tuple(data["buffers"]))


def _as_numpy(t: torch.Tensor, what: str) -> np.ndarray:
    """A stored tensor as a numpy array; dtypes numpy lacks (bfloat16) are a FormatError."""
    try:
        return t.detach().cpu().numpy()
    except TypeError as exc:
        raise FormatError(
            f"{what} has dtype {t.dtype}, which the ONNX check cannot use; the file is corrupt."
        ) from exc


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    """A model's outputs as a list of tensors (tensor, or tuple/list of tensors)."""
    items = list(out) if isinstance(out, (tuple, list)) else [out]
    if not all(isinstance(t, torch.Tensor) for t in items):
        raise FormatError(
            "The model's outputs are not tensors (or a tuple of tensors), so they "
            "cannot be compared with the recorded check outputs."
        )
    return items


# -- save -------------------------------------------------------------------------------------
def save_generator(
    qt: QTModel,
    path: str | os.PathLike[str],
    *,
    example_inputs: Any = None,
    model_info: Mapping[str, Any] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    exported: onnx.ModelProto | None = None,
    materialized: nn.Module | None = None,
) -> Path:
    """Write a compressed model's generator file (atomically, byte-reproducibly).

    Args:
        qt: The compressed model.
        path: Destination, conventionally ``*.qtc.safetensors``.
        example_inputs: A tensor or tuple of tensors (batch >= 2). When given, the file also
            stores the ONNX graph without weights and this batch with its expected outputs, so
            that :meth:`GeneratorFile.to_onnx` can rebuild and check an ONNX model from the
            file alone.
        model_info: Free-form JSON facts to keep (e.g. ``{"factory": "pkg.mod:Net"}``).
        input_names: ONNX graph input names.
        output_names: ONNX graph output names.
        dynamic_axes: Axes beyond the batch that stay symbolic in the stored graph, by input
            name (see :func:`qtcompress.onnx_export.to_onnx_proto`).
        exported: The graph of ``qt.materialize()`` already exported with these inputs and
            names; its skeleton is stored instead of exporting again.
        materialized: ``qt.materialize()`` made by the caller since the generator last
            changed: its weights are hashed and stored instead of generating them again.

    Returns:
        The written path.

    Raises:
        NonFiniteError: The generated weights, the example inputs or the model's outputs on
            them hold NaN or Inf (the file could never verify).
        ConfigError: Bad metadata.
        MissingFileError: The destination folder does not exist.
        ExportError: The model cannot be exported to ONNX (with ``example_inputs``).
        OutputError: The destination cannot be written.
    """
    if qt.device.type != "cpu":  # files and graphs are written from CPU tensors
        with qt.on_cpu():
            return save_generator(
                qt,
                path,
                example_inputs=example_inputs,
                model_info=model_info,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                exported=exported,
                materialized=None,
            )
    # The exporter's own input/output handling, so the recorded check batch lines up with the
    # ONNX graph's inputs and outputs.
    from qtcompress.onnx_export import _as_tuple, _flatten_outputs, export_skeleton

    generator = qt.generator
    # The weights are generated once per save: the materialised model holds exactly what
    # generated_tensors() gives on load (same blocks, same casts).
    materialized = (materialized if materialized is not None else qt.materialize()).eval()
    named = dict(materialized.named_parameters(remove_duplicate=False))
    generated = {s.name: named[s.name].detach() for s in qt.layout.specs}
    bad = _non_finite(generated)
    if bad:
        raise NonFiniteError(
            f"The generated weights hold NaN or Inf: {', '.join(bad)}; refit "
            "the generator (e.g. with a lower learning rate) before saving."
        )
    generated_names = {n for s in qt.layout.specs for n in s.names}
    classical = {k: v for k, v in materialized.state_dict().items() if k not in generated_names}
    tensors: dict[str, torch.Tensor] = {
        GENERATOR_PREFIX + k: v for k, v in generator.state_dict().items()
    }
    tensors.update({CLASSICAL_PREFIX + k: v for k, v in classical.items()})
    metadata: dict[str, Any] = {
        "qtcompress_version": __version__,
        "config": qt.config.to_dict(),
        "ansatz": generator.qnn.ansatz.to_dict(),
        "mapping": mapping_description(generator, qt.config),
        "layout": _layout_to_json(qt.layout),
        "weights_sha256": sha256_of_tensors(generated),
        "weights_fingerprint": fingerprint(generated),
        "model": dict(model_info or {}),
    }
    skeleton = None
    if example_inputs is not None:
        inputs = _as_tuple(example_inputs)
        bad = _non_finite({f"input {i}": t for i, t in enumerate(inputs)})
        if bad:
            raise NonFiniteError(
                f"The example inputs hold NaN or Inf: {', '.join(bad)}; give "
                "finite example inputs (e.g. clean x_test)."
            )
        with torch.no_grad():
            outputs = _flatten_outputs(materialized(*inputs))
        bad = _non_finite({f"output {i}": t for i, t in enumerate(outputs)})
        if bad:
            raise NonFiniteError(
                f"The compressed model's outputs on the example inputs hold NaN "
                f"or Inf: {', '.join(bad)}; refit or check the inputs."
            )
        skeleton = export_skeleton(
            materialized,
            inputs,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            exported=exported,
        )
        tensors.update({f"{CHECK_INPUT_PREFIX}{i}": t for i, t in enumerate(inputs)})
        tensors.update({f"{CHECK_OUTPUT_PREFIX}{i}": t for i, t in enumerate(outputs)})
    return save_artifact(path, tensors, metadata, skeleton=skeleton)


# -- load -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightCheck:
    """Result of regenerating the weights and comparing them with the file's record.

    Attributes:
        identical: The SHA-256 of the regenerated weights equals the stored one.
        stored_sha256: Hash recorded when the file was written.
        actual_sha256: Hash of the weights regenerated now.
        max_fingerprint_rel_diff: Largest relative difference of per-tensor sum/norm (``inf``
            when any value is not finite).
    """

    identical: bool
    stored_sha256: str
    actual_sha256: str
    max_fingerprint_rel_diff: float

    @property
    def equivalent(self) -> bool:
        """Identical, or equal up to floating-point rounding (another CPU's kernels)."""
        diff = self.max_fingerprint_rel_diff
        return self.identical or (math.isfinite(diff) and diff <= FINGERPRINT_RTOL)


def _external_data(proto: onnx.ModelProto) -> list[str]:
    """Names of tensors anywhere in the model (subgraphs included) that point to external data."""
    found: list[str] = []
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        tensors = list(graph.initializer) + [s.values for s in graph.sparse_initializer]
        for node in graph.node:
            for attr in node.attribute:
                tensors.extend([attr.t] if attr.HasField("t") else [])
                tensors.extend(attr.tensors)
                graphs.extend([attr.g] if attr.HasField("g") else [])
                graphs.extend(attr.graphs)
        found += [
            t.name or "<unnamed>"
            for t in tensors
            if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data)
        ]
    return found


@dataclass
class GeneratorFile:
    """A generator file read back: rebuild the network's weights, ONNX model or state dict.

    Attributes:
        path: The file.
        metadata: Its JSON metadata.
        config: The compression settings.
        layout: The generated tensors.
        generator: The rebuilt generator holding the stored parameters.
        classical: Stored tensors that are not generated (BatchNorm statistics, ...).
        skeleton: The weightless ONNX graph, if stored.
        check_inputs: The stored check batch (empty without a skeleton).
        check_outputs: Expected outputs on the check batch.
    """

    path: Path
    metadata: dict[str, Any]
    config: QTConfig
    layout: Layout
    generator: AnyGenerator
    classical: dict[str, torch.Tensor]
    skeleton: bytes | None
    check_inputs: list[torch.Tensor]
    check_outputs: list[torch.Tensor]

    def generated(self) -> dict[str, torch.Tensor]:
        """Regenerate the generated tensors (canonical names).

        Raises:
            FormatError: A regenerated weight is NaN or Inf (the stored generator is corrupt).
        """
        out = generated_tensors(self.generator)
        bad = _non_finite(out)
        if bad:
            raise FormatError(
                f"{self.path.name}: the regenerated weights hold NaN or Inf: "
                f"{', '.join(bad)}; the file is corrupt."
            )
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full state dict of the network: generated tensors (every alias) + classical."""
        generated = self.generated()
        out = dict(self.classical)
        for spec in self.layout.specs:
            for name in spec.names:
                out[name] = generated[spec.name]
        return out

    def verify_weights(self) -> WeightCheck:
        """Regenerate the weights and compare their hash and fingerprint with the record.

        Raises:
            FormatError: A regenerated weight is NaN or Inf.
        """
        generated = self.generated()
        actual = sha256_of_tensors(generated)
        stored = self.metadata["weights_sha256"]
        worst = fingerprint_distance(self.metadata["weights_fingerprint"], fingerprint(generated))
        return WeightCheck(actual == stored, stored, actual, worst)

    def compare_outputs(self, outputs: Any) -> float:
        """Largest absolute difference between a model's outputs and the recorded ones.

        Use it to compare your own module (after :meth:`load_into`) run on
        :attr:`check_inputs`: ``gen.compare_outputs(model(*gen.check_inputs))``.

        Args:
            outputs: A tensor or a tuple/list of tensors.

        Returns:
            ``max |output - recorded|`` over all outputs (0.0 when they are empty).

        Raises:
            FormatError: No check batch is stored, the outputs differ in number or shape from
                the record, or they hold NaN or Inf.
        """
        if not self.check_outputs:
            raise FormatError(
                f"{self.path.name} holds no check outputs (it was saved without example inputs)."
            )
        got = [_as_numpy(t, "a model output") for t in _flat_outputs(outputs)]
        return self._diff(got)

    def _diff(self, got: Sequence[np.ndarray]) -> float:
        want = [
            _as_numpy(t, f"{self.path.name}: check.output.{i}")
            for i, t in enumerate(self.check_outputs)
        ]
        if len(got) != len(want):
            raise FormatError(
                f"{self.path.name}: the model gives {len(got)} outputs, the file "
                f"recorded {len(want)}."
            )
        worst = 0.0
        for i, (o, e) in enumerate(zip(got, want, strict=True)):
            if o.shape != e.shape:
                raise FormatError(
                    f"{self.path.name}: output {i} has shape {list(o.shape)}, the "
                    f"recorded one {list(e.shape)}."
                )
            if o.size == 0:
                continue
            d = np.abs(o.astype(np.float64) - e.astype(np.float64))
            if not np.isfinite(d).all():
                raise FormatError(
                    f"{self.path.name}: output {i} holds NaN or Inf on the check "
                    "batch; the rebuilt model is broken."
                )
            worst = max(worst, float(d.max()))
        return worst

    def load_into(self, model: nn.Module) -> nn.Module:
        """Load the regenerated network into the user's own module (strict), in place.

        Raises:
            FormatError: The module's parameters/buffers do not fit the stored layout; the
                message names missing and unexpected keys and shape mismatches.
        """
        from qtcompress.loading import load_state_dict_strict

        return load_state_dict_strict(
            model, self.state_dict(), source=f"Generator file {self.path.name}"
        )

    def to_onnx(
        self,
        path: str | os.PathLike[str] | None = None,
        atol: float = 1e-5,
        rtol: float = 1e-5,
    ) -> tuple[onnx.ModelProto, float]:
        """Rebuild the ONNX model from the file alone and check it on the stored batch.

        Fills the weightless graph with the regenerated weights, runs ``onnx.checker`` (full
        check) and onnxruntime on the check batch, and compares with the outputs recorded at
        save time.

        Args:
            path: If given, write the model there (atomically).
            atol: Allowed absolute difference on the check batch.
            rtol: Allowed difference relative to the largest recorded output (the check is
                ``max_abs_diff <= atol + rtol * max |recorded|``).

        Returns:
            ``(model, max_abs_diff)``.

        Raises:
            FormatError: No skeleton stored, a skeleton that is invalid or refers to external
                data, a check batch that does not fit the graph, or a rebuilt model that
                disagrees with the record.
        """
        from qtcompress.onnx_export import fill_skeleton, save_onnx
        from qtcompress.runtime import OnnxPredictor

        name = self.path.name
        if self.skeleton is None:
            raise FormatError(
                f"{name} holds no ONNX graph (it was saved without example inputs); "
                "rebuild into your own module with load_into() and export that instead."
            )
        if not self.check_inputs or not self.check_outputs:
            raise FormatError(
                f"{name} stores an ONNX graph without its check batch; the file is corrupt."
            )
        weights = self.state_dict()
        try:
            proto = onnx.ModelProto()
            proto.ParseFromString(self.skeleton)
            external = _external_data(proto)
            if external:
                raise FormatError(
                    f"{name}: the stored ONNX graph refers to external data files "
                    f"({external[:3]}), which a generator file may not do; the "
                    "file is corrupt or hostile."
                )
            proto = fill_skeleton(self.skeleton, {k: v.numpy() for k, v in weights.items()})
            onnx.checker.check_model(proto, full_check=True)
            predictor = OnnxPredictor(proto.SerializeToString())
        except QTCompressError:
            raise
        except Exception as exc:  # onnx/protobuf raise many types (DecodeError, ValidationError)
            raise FormatError(
                f"{name}: the stored ONNX graph cannot be rebuilt "
                f"({type(exc).__name__}: {str(exc)[:200]}); the file is "
                "corrupt."
            ) from exc
        if len(self.check_inputs) != len(predictor.input_names):
            raise FormatError(
                f"{name}: {len(self.check_inputs)} check inputs for a graph with "
                f"{len(predictor.input_names)} inputs; the file is corrupt."
            )
        feeds = {
            n: _as_numpy(t, f"{name}: check.input.{i}")
            for i, (n, t) in enumerate(zip(predictor.input_names, self.check_inputs, strict=True))
        }
        try:
            got = predictor.run(feeds)
        except QTCompressError as exc:
            raise FormatError(
                f"{name}: the stored check batch does not fit the stored graph "
                f"({exc}); the file is corrupt."
            ) from exc
        outs = list(got.values()) if isinstance(got, dict) else [got]
        diff = self._diff(outs)
        scale = max(
            float(np.abs(_as_numpy(e, name).astype(np.float64)).max()) if e.numel() else 0.0
            for e in self.check_outputs
        )
        if not diff <= atol + rtol * scale:
            raise FormatError(
                f"The ONNX model rebuilt from {name} differs from the "
                f"recorded outputs by {diff:.3g} > {atol:g} + {rtol:g} x "
                f"{scale:.3g}."
            )
        if path is not None:
            save_onnx(proto, path)
        return proto, diff


def _describe_difference(stored: Mapping[str, Any], built: Mapping[str, Any]) -> str:
    keys = sorted(set(stored) | set(built))
    diffs = [
        f"{k} {stored.get(k, '<missing>')!r} vs {built.get(k, '<missing>')!r}"
        for k in keys
        if stored.get(k, ...) != built.get(k, ...)
    ]
    return "; ".join(diffs[:4])


def _check_against(
    planned: nn.Module,
    meta: dict[str, Any],
    config: QTConfig,
    tensors: Mapping[str, torch.Tensor],
    source: str,
) -> None:
    """Compare the file with the generator its config builds (``planned``, on the meta device).

    One source of truth: the stored ``ansatz`` and ``mapping`` descriptions and every stored
    ``generator.*`` tensor must be exactly those of the generator ``config`` builds, or the file
    would describe (and ``inspect`` repeat) a network it does not hold. The shapes come from the
    meta device, so a description that implies more data than the file stores is refused before
    anything is allocated.
    """
    g: Any = planned
    built_ansatz = g.qnn.ansatz.to_dict()
    if meta["ansatz"] != built_ansatz:
        raise FormatError(
            f"{source}: the stored ansatz does not match the one its config builds "
            f"({_describe_difference(meta['ansatz'], built_ansatz)}); the file is "
            "inconsistent."
        )
    built_mapping = mapping_description(planned, config)
    if meta["mapping"] != built_mapping:
        raise FormatError(
            f"{source}: the stored mapping does not match the one its config builds "
            f"({_describe_difference(meta['mapping'], built_mapping)}); the file "
            "is inconsistent."
        )
    gen_state = {
        k[len(GENERATOR_PREFIX) :]: v for k, v in tensors.items() if k.startswith(GENERATOR_PREFIX)
    }
    own = planned.state_dict()
    missing = sorted(set(own) - set(gen_state))
    extra = sorted(set(gen_state) - set(own))
    bad = [
        f"{k}: file {tuple(gen_state[k].shape)} {gen_state[k].dtype} vs metadata "
        f"{tuple(own[k].shape)} {own[k].dtype}"
        for k in sorted(set(own) & set(gen_state))
        if gen_state[k].shape != own[k].shape or gen_state[k].dtype != own[k].dtype
    ]
    if missing or extra or bad:
        raise FormatError(
            f"{source}: generator tensors do not match the metadata: missing "
            f"{[GENERATOR_PREFIX + k for k in missing]}, unexpected "
            f"{[GENERATOR_PREFIX + k for k in extra]}, shape mismatches {bad[:3]}."
        )
    nan = _non_finite(gen_state)
    if nan:
        raise FormatError(
            f"{source}: the stored generator holds NaN or Inf: {', '.join(nan)}; "
            "the file is corrupt."
        )


def load_generator(path: str | os.PathLike[str]) -> GeneratorFile:
    """Read a generator file and rebuild its generator (strict checks throughout).

    Order matters, and nothing large is allocated before the last step: the metadata is
    validated against :data:`GENERATOR_SCHEMA`; every size is checked against the documented
    maxima (:mod:`qtcompress.limits`); the generator that ``config`` describes is built on the
    ``meta`` device and the stored ``ansatz``, ``mapping`` and ``generator.*`` tensors must be
    exactly its own; its estimated peak memory must fit; only then is it built for real
    (:meth:`QTGenerator.from_config`) and loaded. See ``docs/format.md``, *Checks on load*.

    Raises:
        MissingFileError: The file does not exist.
        FormatError: Corrupt or truncated file, wrong format or version, malformed metadata,
            ``config``/``ansatz``/``mapping``/tensors that disagree, missing or extra tensors,
            or NaN/Inf in the stored generator or check batch.
        ResourceLimitError: A size over a documented limit, or more memory than available.
    """
    artifact = read_artifact(path)
    meta = artifact.metadata
    name = Path(path).name
    absent = [k for k in REQUIRED_FIELDS if k not in meta]
    if absent:
        raise FormatError(
            f"{name} is a qtcompress container but not a generator file: metadata {absent} missing."
        )
    validate(meta, GENERATOR_SCHEMA, "", source=name)
    try:
        config = QTConfig.from_dict(meta["config"])
    except (QTCompressError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise FormatError(f"{name}: stored config is invalid: {exc}") from exc
    layout = _layout_from_json(meta["layout"], name)
    prints = set(meta["weights_fingerprint"])
    if prints != set(layout.names()):
        raise FormatError(
            f"{name}: weights_fingerprint names {sorted(prints)[:5]} do not match "
            f"the layout's tensors {layout.names()[:5]}; the file is corrupt."
        )
    tensors = artifact.tensors
    ansatz = meta["ansatz"]
    # The sizes the file claims, then those its config implies, against the documented limits
    # and the memory available; `planned` is the generator on the meta device (no memory).
    limits.check_qnn_size(ansatz["n_qubits"], ansatz["n_layers"], source=name)
    try:
        planned = limits.plan_generator(config, layout, source=name)
    except (ResourceLimitError, FormatError):
        raise
    except (QTCompressError, TypeError, ValueError, KeyError) as exc:
        raise FormatError(f"{name}: mapping/ansatz metadata is inconsistent: {exc}") from exc
    if planned is None:  # pragma: no cover - only when called from inside plan_generator
        raise FormatError(f"{name}: cannot plan the generator re-entrantly.")
    # What the file stores first (a lie is a FormatError), then what this machine can hold.
    _check_against(planned, meta, config, tensors, name)
    limits.check_generator_memory(planned, layout, source=name)
    try:
        generator = QTGenerator.from_config(layout, config)
    except ResourceLimitError:
        raise
    except (QTCompressError, TypeError, ValueError, KeyError) as exc:
        raise FormatError(f"{name}: mapping/ansatz metadata is inconsistent: {exc}") from exc
    gen_state = {
        k[len(GENERATOR_PREFIX) :]: v for k, v in tensors.items() if k.startswith(GENERATOR_PREFIX)
    }
    generator.load_state_dict(gen_state, strict=True)
    generator.eval()
    prefixes = (GENERATOR_PREFIX, CLASSICAL_PREFIX, CHECK_INPUT_PREFIX, CHECK_OUTPUT_PREFIX)
    unknown = sorted(k for k in tensors if not k.startswith(prefixes))
    if unknown:
        raise FormatError(f"{name}: unexpected tensors {unknown}.")
    classical = {
        k[len(CLASSICAL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(CLASSICAL_PREFIX)
    }
    clash = sorted(set(classical) & {n for s in layout.specs for n in s.names})
    if clash:
        raise FormatError(f"{name}: tensors {clash} are both generated and stored.")

    def numbered(prefix: str) -> list[torch.Tensor]:
        names = {k for k in tensors if k.startswith(prefix)}
        want = {f"{prefix}{i}" for i in range(len(names))}
        if names != want:
            raise FormatError(
                f"{name}: check tensors {sorted(names - want)[:3]} are not "
                f"numbered {prefix}0..{len(names) - 1}; the file is corrupt."
            )
        return [tensors[f"{prefix}{i}"] for i in range(len(names))]

    check_inputs, check_outputs = numbered(CHECK_INPUT_PREFIX), numbered(CHECK_OUTPUT_PREFIX)
    nan = _non_finite(
        {f"check.input.{i}": t for i, t in enumerate(check_inputs)}
        | {f"check.output.{i}": t for i, t in enumerate(check_outputs)}
    )
    if nan:
        raise FormatError(
            f"{name}: the stored check batch holds NaN or Inf: {', '.join(nan)}; "
            "the file is corrupt."
        )
    return GeneratorFile(
        Path(path),
        meta,
        config,
        layout,
        generator,
        classical,
        artifact.skeleton,
        check_inputs,
        check_outputs,
    )
