"""The generator file (``*.qtc.safetensors``): save a compressed model, regenerate it from the file.

A generator file holds everything needed to rebuild the network without the original checkpoint:
the generator's trainable tensors (QNN angles, mapping network, per-tensor scale/offset), the
classical tensors that are not generated (BatchNorm statistics, excluded parameters), the layout
of the generated tensors, and optionally the model's ONNX graph *without weights* plus a small
check batch (inputs and the expected outputs). See ``docs/format.md``.

Example:
    >>> qt = compress(model, QTConfig(budget=0.05))                          # doctest: +SKIP
    >>> qt.fit_weights(steps=300)                                        # doctest: +SKIP
    >>> save_generator(qt, "model.qtc.safetensors", example_inputs=(x[:2],))  # doctest: +SKIP
    >>> gen = load_generator("model.qtc.safetensors")   # in a fresh process  # doctest: +SKIP
    >>> gen.verify_weights().identical                                   # doctest: +SKIP
    True
    >>> gen.to_onnx("model.onnx")    # weights regenerated and filled in  # doctest: +SKIP
"""

from __future__ import annotations

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

from qtcompress.config import QTConfig
from qtcompress.constants import ONNX_ATOL, ONNX_RTOL
from qtcompress.errors import FormatError, QTCompressError
from qtcompress.generator import AnyGenerator
from qtcompress.generator_file.metadata import (
    FINGERPRINT_RTOL,
    fingerprint,
    fingerprint_distance,
    non_finite_names,
)
from qtcompress.io.container import sha256_of_tensors
from qtcompress.io.state_dict import load_state_dict_strict
from qtcompress.onnx.export import save_onnx
from qtcompress.onnx.runtime import OnnxPredictor
from qtcompress.onnx.skeleton import fill_skeleton
from qtcompress.targets import Layout, kinds_summary, tensor_kind

if TYPE_CHECKING:
    pass


def _as_numpy(t: torch.Tensor, what: str) -> np.ndarray:
    """A stored tensor as a numpy array; dtypes numpy lacks (bfloat16) are a FormatError."""
    try:
        return t.detach().cpu().numpy()
    except TypeError as exc:
        raise FormatError(
            f"{what} has dtype {t.dtype}, which the ONNX check cannot use; the file is corrupt."
        ) from exc


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    """A model's outputs as a list of tensors (a tensor, a tuple/list or a mapping of tensors).

    A mapping (a Hugging Face ``ModelOutput``) gives its values in order, as the exporter
    flattens them into graph outputs.
    """
    if isinstance(out, Mapping):
        items = list(out.values())
    else:
        items = list(out) if isinstance(out, (tuple, list)) else [out]
    if not all(isinstance(t, torch.Tensor) for t in items):
        raise FormatError(
            "The model's outputs are not tensors (or a tuple of tensors), so they "
            "cannot be compared with the recorded check outputs."
        )
    return items


def _model_summary(model: Any) -> Any:
    """The ``model`` metadata entry with a Hugging Face folder's files as their sizes."""
    hf = model.get("hf") if isinstance(model, dict) else None
    if not isinstance(hf, dict) or not isinstance(hf.get("files"), dict):
        return model
    sizes = {
        name: len(entry["data"]) if isinstance(entry, dict) and "data" in entry else None
        for name, entry in hf["files"].items()
    }
    return {**model, "hf": {**hf, "files": sizes}}  # sizes in stored characters


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

    def generate_detached(self) -> dict[str, torch.Tensor]:
        """Regenerate the generated tensors (canonical names), checked to be finite.

        The stored generator's :meth:`~qtcompress.generator.Generator.generate_detached`.

        Raises:
            FormatError: A regenerated weight is NaN or Inf (the stored generator is corrupt).
        """
        out = self.generator.generate_detached()
        bad = non_finite_names(out)
        if bad:
            raise FormatError(
                f"{self.path.name}: the regenerated weights hold NaN or Inf: "
                f"{', '.join(bad)}; the file is corrupt."
            )
        return out

    def describe(self) -> dict[str, Any]:
        """What the file holds, JSON-ready, without regenerating anything (``qtcompress inspect``).

        Returns:
            File size and writer version, generated weights and generator parameters (and their
            ratio), classical values, the QNN (qubits, layers, ansatz), the mapping, the scheme,
            the generated tensors with their kinds (and counts by kind), whether an ONNX graph
            is stored, the weights' hash and the model description.
        """
        meta = self.metadata
        layout, ansatz, mapping = meta["layout"], meta["ansatz"], meta["mapping"]
        gen_params = sum(p.numel() for p in self.generator.parameters())
        kinds = kinds_summary((t["name"], tuple(t["shape"])) for t in layout["tensors"])
        return {
            "file": str(self.path),
            "file_bytes": self.path.stat().st_size,
            "qtcompress_version": meta.get("qtcompress_version"),
            "generated_weights": layout["total"],
            "generator_parameters": gen_params,
            "compression_ratio": round(layout["total"] / max(gen_params, 1), 3),
            "classical_values": sum(t.numel() for t in self.classical.values()),
            "qubits": ansatz["n_qubits"],
            "layers": ansatz["n_layers"],
            "ansatz": ansatz,
            "mapping": mapping,
            "scheme": self.config.scheme,
            "kinds": {k: {"tensors": n, "values": v} for k, (n, v) in kinds.items()},
            "targets": [
                {
                    "name": t["name"],
                    "shape": t["shape"],
                    "aliases": t["aliases"],
                    "kind": tensor_kind(t["name"], tuple(t["shape"])),
                }
                for t in layout["tensors"]
            ],
            "onnx_graph": self.skeleton is not None,
            "weights_sha256": meta["weights_sha256"],
            "model": _model_summary(meta.get("model", {})),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full state dict of the network: generated tensors (every alias) + classical."""
        generated = self.generate_detached()
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
        generated = self.generate_detached()
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
        return load_state_dict_strict(
            model, self.state_dict(), source=f"Generator file {self.path.name}"
        )

    def checked_skeleton(self) -> bytes:
        """The stored weightless ONNX graph, checked to parse and to read no other file.

        Cheap (nothing is regenerated): ``inspect`` runs it too, so that a file which
        ``verify`` and ``reconstruct`` refuse is not reported as sound.

        Returns:
            The skeleton's bytes.

        Raises:
            FormatError: No graph is stored, it does not parse, or it refers to external data
                files (a generator file is self-contained; such a graph is corrupt or hostile).
        """
        name = self.path.name
        if self.skeleton is None:
            raise FormatError(
                f"{name} holds no ONNX graph (it was saved without example inputs); "
                "rebuild into your own module with load_into() and export that instead."
            )
        try:
            proto = onnx.ModelProto()
            proto.ParseFromString(self.skeleton)
        except Exception as exc:  # protobuf raises DecodeError and others
            raise FormatError(
                f"{name}: the stored ONNX graph cannot be rebuilt "
                f"({type(exc).__name__}: {str(exc)[:200]}); the file is "
                "corrupt."
            ) from exc
        external = _external_data(proto)
        if external:
            raise FormatError(
                f"{name}: the stored ONNX graph refers to external data files "
                f"({external[:3]}), which a generator file may not do; the "
                "file is corrupt or hostile."
            )
        return self.skeleton

    def to_onnx(
        self,
        path: str | os.PathLike[str] | None = None,
        atol: float = ONNX_ATOL,
        rtol: float = ONNX_RTOL,
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
        name = self.path.name
        skeleton = self.checked_skeleton()
        if not self.check_inputs or not self.check_outputs:
            raise FormatError(
                f"{name} stores an ONNX graph without its check batch; the file is corrupt."
            )
        weights = self.state_dict()
        try:
            proto = fill_skeleton(skeleton, {k: v.numpy() for k, v in weights.items()})
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
