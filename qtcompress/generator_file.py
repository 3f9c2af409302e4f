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

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from torch import nn

from qtcompress import __version__
from qtcompress.artifact import read_artifact, save_artifact, sha256_of_tensors
from qtcompress.config import QTConfig
from qtcompress.errors import FormatError, QTCompressError
from qtcompress.generator import QTGenerator
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


# -- helpers shared by save and load ----------------------------------------------------------
@torch.no_grad()
def generated_tensors(generator: QTGenerator) -> dict[str, torch.Tensor]:
    """Regenerate every generated tensor (canonical names), streamed block by block.

    Save and load both use this one path, so the same generator gives bit-identical weights.
    """
    layout = generator.layout
    flat = torch.empty(layout.total, dtype=torch.float32)
    for start, block in generator.iter_blocks():
        flat[start : start + block.shape[0]] = block
    return {s.name: flat[s.offset : s.offset + s.numel].view(s.shape).to(s.dtype).clone()
            for s in layout.specs}


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per-tensor ``[sum, L2 norm]`` in float64.

    Tells "the same network up to rounding" from "a different network" where the hash cannot.
    """
    out = {}
    for name, t in sorted(tensors.items()):
        d = t.detach().double()
        out[name] = [float(d.sum()), float(d.norm())]
    return out


def _layout_to_json(layout: Layout) -> dict[str, Any]:
    return {
        "total": layout.total,
        "tensors": [
            {"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype).removeprefix("torch."),
             "offset": s.offset, "numel": s.numel, "aliases": list(s.aliases)}
            for s in layout.specs
        ],
        "classical": list(layout.classical),
        "buffers": list(layout.buffers),
    }


def _layout_from_json(data: Any) -> Layout:
    try:
        specs = []
        offset = 0
        for item in data["tensors"]:
            dtype = getattr(torch, item["dtype"])
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise FormatError(f"Layout tensor {item['name']!r} has dtype {item['dtype']!r}, "
                                  "not a floating-point dtype.")
            shape = tuple(int(d) for d in item["shape"])
            numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if numel != item["numel"] or item["offset"] != offset:
                raise FormatError(
                    f"Layout tensor {item['name']!r}: shape {list(shape)} and offset "
                    f"{item['offset']} do not match numel {item['numel']} / expected offset "
                    f"{offset}.")
            specs.append(TensorSpec(item["name"], shape, dtype, offset, numel,
                                    tuple(item["aliases"])))
            offset += numel
        if offset != data["total"]:
            raise FormatError(f"Layout tensors add up to {offset} weights, metadata says "
                              f"{data['total']}.")
        return Layout(tuple(specs), offset, tuple(data["classical"]), tuple(data["buffers"]))
    except (KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"The layout metadata is malformed ({type(exc).__name__}: {exc}).") \
            from exc


# -- save -------------------------------------------------------------------------------------
def save_generator(
    qt: QTModel,
    path: str | os.PathLike[str],
    *,
    example_inputs: Any = None,
    model_info: Mapping[str, Any] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Path:
    """Write a compressed model's generator file (atomically).

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

    Returns:
        The written path.
    """
    # The exporter's own input/output handling, so the recorded check batch lines up with the
    # ONNX graph's inputs and outputs.
    from qtcompress.onnx_export import _as_tuple, _flatten_outputs, export_skeleton

    generator = qt.generator
    generated = generated_tensors(generator)
    materialized = qt.materialize().eval()
    generated_names = {n for s in qt.layout.specs for n in s.names}
    classical = {k: v for k, v in materialized.state_dict().items() if k not in generated_names}
    tensors: dict[str, torch.Tensor] = {
        GENERATOR_PREFIX + k: v for k, v in generator.state_dict().items()}
    tensors.update({CLASSICAL_PREFIX + k: v for k, v in classical.items()})
    metadata: dict[str, Any] = {
        "qtcompress_version": __version__,
        "config": qt.config.to_dict(),
        "ansatz": generator.qnn.ansatz.to_dict(),
        "mapping": {"kind": qt.config.mapping, "chunk": generator.chunk,
                    "n_qubits": generator.n_qubits, "hidden": list(qt.config.hidden),
                    "activation": qt.config.activation, "bond_dim": qt.config.bond_dim,
                    "prob_transform": qt.config.prob_transform},
        "layout": _layout_to_json(qt.layout),
        "weights_sha256": sha256_of_tensors(generated),
        "weights_fingerprint": fingerprint(generated),
        "model": dict(model_info or {}),
    }
    skeleton = None
    if example_inputs is not None:
        inputs = _as_tuple(example_inputs)
        with torch.no_grad():
            outputs = _flatten_outputs(materialized(*inputs))
        skeleton = export_skeleton(materialized, inputs, input_names=input_names,
                                   output_names=output_names)
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
        max_fingerprint_rel_diff: Largest relative difference of per-tensor sum/norm.
    """

    identical: bool
    stored_sha256: str
    actual_sha256: str
    max_fingerprint_rel_diff: float

    @property
    def equivalent(self) -> bool:
        """Identical, or equal up to floating-point rounding (another CPU's kernels)."""
        return self.identical or self.max_fingerprint_rel_diff <= FINGERPRINT_RTOL


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
    generator: QTGenerator
    classical: dict[str, torch.Tensor]
    skeleton: bytes | None
    check_inputs: list[torch.Tensor]
    check_outputs: list[torch.Tensor]

    def generated(self) -> dict[str, torch.Tensor]:
        """Regenerate the generated tensors (canonical names)."""
        return generated_tensors(self.generator)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full state dict of the network: generated tensors (every alias) + classical."""
        generated = self.generated()
        out = dict(self.classical)
        for spec in self.layout.specs:
            for name in spec.names:
                out[name] = generated[spec.name]
        return out

    def verify_weights(self) -> WeightCheck:
        """Regenerate the weights and compare their hash and fingerprint with the record."""
        generated = self.generated()
        actual = sha256_of_tensors(generated)
        stored = self.metadata["weights_sha256"]
        want = self.metadata["weights_fingerprint"]
        have = fingerprint(generated)
        worst = 0.0
        for name, (w_sum, w_norm) in want.items():
            h_sum, h_norm = have[name]
            worst = max(worst, abs(h_norm - w_norm) / max(abs(w_norm), 1e-12),
                        abs(h_sum - w_sum) / max(abs(w_norm), 1e-12))
        return WeightCheck(actual == stored, stored, actual, worst)

    def load_into(self, model: nn.Module) -> nn.Module:
        """Load the regenerated network into the user's own module (strict), in place.

        Raises:
            FormatError: The module's parameters/buffers do not fit the stored layout; the
                message names missing and unexpected keys and shape mismatches.
        """
        from qtcompress.loading import load_state_dict_strict

        return load_state_dict_strict(model, self.state_dict(),
                                      source=f"Generator file {self.path.name}")

    def to_onnx(
        self, path: str | os.PathLike[str] | None = None, atol: float = 1e-5,
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
            FormatError: No skeleton stored, or the rebuilt model disagrees with the record.
        """
        from qtcompress.onnx_export import fill_skeleton, save_onnx
        from qtcompress.runtime import OnnxPredictor

        if self.skeleton is None:
            raise FormatError(
                f"{self.path.name} holds no ONNX graph (it was saved without example inputs); "
                "rebuild into your own module with load_into() and export that instead.")
        weights = {k: v.numpy() for k, v in self.state_dict().items()}
        proto = fill_skeleton(self.skeleton, weights)
        onnx.checker.check_model(proto, full_check=True)
        predictor = OnnxPredictor(proto.SerializeToString())
        feeds = {name: t.numpy() for name, t in
                 zip(predictor.input_names, self.check_inputs, strict=True)}
        got = predictor.run(feeds)
        outs = list(got.values()) if isinstance(got, dict) else [got]
        diff = max(float(np.max(np.abs(o - e.numpy()))) if o.size else 0.0
                   for o, e in zip(outs, self.check_outputs, strict=True))
        scale = max(float(e.abs().max()) if e.numel() else 0.0 for e in self.check_outputs)
        if not diff <= atol + rtol * scale:
            raise FormatError(f"The ONNX model rebuilt from {self.path.name} differs from the "
                              f"recorded outputs by {diff:.3g} > {atol:g} + {rtol:g} x "
                              f"{scale:.3g}.")
        if path is not None:
            save_onnx(proto, path)
        return proto, diff


def load_generator(path: str | os.PathLike[str]) -> GeneratorFile:
    """Read a generator file and rebuild its generator (strict checks throughout).

    Raises:
        FormatError: Corrupt or truncated file, wrong format or version, missing or extra
            tensors, or metadata that does not match the tensors.
    """
    artifact = read_artifact(path)
    meta = artifact.metadata
    required = ("config", "ansatz", "mapping", "layout", "weights_sha256", "weights_fingerprint")
    absent = [k for k in required if k not in meta]
    if absent:
        raise FormatError(f"{Path(path).name} is a qtcompress container but not a generator "
                          f"file: metadata {absent} missing.")
    try:
        config = QTConfig.from_dict(meta["config"])
    except QTCompressError as exc:
        raise FormatError(f"{Path(path).name}: stored config is invalid: {exc}") from exc
    layout = _layout_from_json(meta["layout"])
    mapping, ansatz = meta["mapping"], meta["ansatz"]
    try:
        generator = QTGenerator(
            layout, chunk=mapping["chunk"], n_layers=ansatz["n_layers"],
            n_qubits=ansatz["n_qubits"], mapping=config.mapping, hidden=config.hidden,
            activation=config.activation, bond_dim=config.bond_dim,
            prob_transform=config.prob_transform, backend=config.backend,
            per_tensor_affine=config.per_tensor_affine, standardize=config.standardize,
            block_states=config.block_states, seed=config.seed)
    except (KeyError, TypeError, QTCompressError) as exc:
        raise FormatError(f"{Path(path).name}: mapping/ansatz metadata is inconsistent: "
                          f"{exc}") from exc
    tensors = artifact.tensors
    gen_state = {k[len(GENERATOR_PREFIX):]: v for k, v in tensors.items()
                 if k.startswith(GENERATOR_PREFIX)}
    own = generator.state_dict()
    missing = sorted(set(own) - set(gen_state))
    extra = sorted(set(gen_state) - set(own))
    bad = [f"{k}: file {tuple(gen_state[k].shape)} vs metadata {tuple(own[k].shape)}"
           for k in sorted(set(own) & set(gen_state)) if gen_state[k].shape != own[k].shape]
    if missing or extra or bad:
        raise FormatError(
            f"{Path(path).name}: generator tensors do not match the metadata: missing "
            f"{[GENERATOR_PREFIX + k for k in missing]}, unexpected "
            f"{[GENERATOR_PREFIX + k for k in extra]}, shape mismatches {bad}.")
    generator.load_state_dict(gen_state, strict=True)
    generator.eval()
    prefixes = (GENERATOR_PREFIX, CLASSICAL_PREFIX, CHECK_INPUT_PREFIX, CHECK_OUTPUT_PREFIX)
    unknown = sorted(k for k in tensors if not k.startswith(prefixes))
    if unknown:
        raise FormatError(f"{Path(path).name}: unexpected tensors {unknown}.")
    classical = {k[len(CLASSICAL_PREFIX):]: v for k, v in tensors.items()
                 if k.startswith(CLASSICAL_PREFIX)}
    clash = sorted(set(classical) & {n for s in layout.specs for n in s.names})
    if clash:
        raise FormatError(f"{Path(path).name}: tensors {clash} are both generated and stored.")

    def numbered(prefix: str) -> list[torch.Tensor]:
        count = sum(1 for k in tensors if k.startswith(prefix))
        try:
            return [tensors[f"{prefix}{i}"] for i in range(count)]
        except KeyError as exc:
            raise FormatError(f"{Path(path).name}: check tensors are not numbered 0..{count - 1}"
                              f" ({exc}).") from exc

    return GeneratorFile(Path(path), meta, config, layout, generator, classical,
                         artifact.skeleton, numbered(CHECK_INPUT_PREFIX),
                         numbered(CHECK_OUTPUT_PREFIX))
