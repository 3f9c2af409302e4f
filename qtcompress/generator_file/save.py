"""Write a generator file (:func:`save_generator`): generator, classical tensors, skeleton."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import onnx
import torch
from torch import nn

from qtcompress import __version__
from qtcompress.errors import NonFiniteError
from qtcompress.generator_file.metadata import (
    CHECK_INPUT_PREFIX,
    CHECK_OUTPUT_PREFIX,
    CLASSICAL_PREFIX,
    GENERATOR_PREFIX,
    fingerprint,
    layout_to_json,
    non_finite_names,
)
from qtcompress.generator_file.storage import encode
from qtcompress.io.container import save_artifact, sha256_of_tensors

# The exporter's own input/output handling, so the recorded check batch lines up with the ONNX
# graph's inputs and outputs.
from qtcompress.onnx.parity import as_example_tuple, batch_axes, flatten_outputs
from qtcompress.onnx.skeleton import export_skeleton

if TYPE_CHECKING:
    from qtcompress.config import QTConfig
    from qtcompress.generator import AnyGenerator
    from qtcompress.targets import Layout


class CompressedModel(Protocol):
    """What saving needs of a compressed model; :class:`qtcompress.QTModel` is one.

    A protocol rather than ``QTModel`` itself, so that ``io`` does not depend on ``api``.
    """

    @property
    def generator(self) -> AnyGenerator: ...  # noqa: D102

    @property
    def layout(self) -> Layout: ...  # noqa: D102

    @property
    def config(self) -> QTConfig: ...  # noqa: D102

    @property
    def device(self) -> torch.device: ...  # noqa: D102

    def on_cpu(self) -> AbstractContextManager[Any]: ...  # noqa: D102

    def materialize(self) -> nn.Module: ...  # noqa: D102


def save_generator(
    qt: CompressedModel,
    path: str | os.PathLike[str],
    *,
    example_inputs: Any = None,
    model_info: Mapping[str, Any] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    exported: onnx.ModelProto | None = None,
    materialized: nn.Module | None = None,
    storage: str = "float32",
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
            name, and any input's batch axis other than 0, named ``batch`` (see
            :func:`qtcompress.onnx.export.to_onnx_proto`).
        exported: The graph of ``qt.materialize()`` already exported with these inputs and
            names; its skeleton is stored instead of exporting again.
        materialized: ``qt.materialize()`` made by the caller since the generator last
            changed: its weights are hashed and stored instead of generating them again.
        storage: How the generator's parameters are stored
            (:mod:`qtcompress.generator_file.storage`): ``"float32"``, ``"float16"`` or
            ``"int8"``; the generator must already hold rounded values
            (:meth:`qtcompress.QTModel.round_to`). Below float32 the check batch's float32
            inputs are stored as float16 too (outputs recorded on them).

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
                storage=storage,
            )
    generator = qt.generator
    # The weights are generated once per save: the materialised model holds exactly what
    # generate_detached() gives on load (same blocks, same casts).
    materialized = (materialized if materialized is not None else qt.materialize()).eval()
    named = dict(materialized.named_parameters(remove_duplicate=False))
    generated = {s.name: named[s.name].detach() for s in qt.layout.specs}
    bad = non_finite_names(generated)
    if bad:
        raise NonFiniteError(
            f"The generated weights hold NaN or Inf: {', '.join(bad)}; refit "
            "the generator (e.g. with a lower learning rate) before saving."
        )
    generated_names = {n for s in qt.layout.specs for n in s.names}
    classical = {k: v for k, v in materialized.state_dict().items() if k not in generated_names}
    tensors: dict[str, torch.Tensor] = {
        GENERATOR_PREFIX + k: v for k, v in encode(generator.state_dict(), storage).items()
    }
    tensors.update({CLASSICAL_PREFIX + k: v for k, v in classical.items()})
    metadata: dict[str, Any] = {
        "qtcompress_version": __version__,
        "config": qt.config.to_dict(),
        "ansatz": generator.ansatz.to_dict(),
        "mapping": generator.file_description(qt.config),
        "layout": layout_to_json(qt.layout),
        "weights_sha256": sha256_of_tensors(generated),
        "weights_fingerprint": fingerprint(generated),
        "model": dict(model_info or {}),
        "storage": storage,
    }
    skeleton = None
    if example_inputs is not None:
        axes = batch_axes(example_inputs, input_names, dynamic_axes)
        inputs = as_example_tuple(example_inputs, axes)
        if storage != "float32":  # a half-precision check batch; outputs recorded on it
            inputs = tuple(half_check_input(t) for t in inputs)
            metadata["check_inputs_float16"] = True
        bad = non_finite_names({f"input {i}": t for i, t in enumerate(inputs)})
        if bad:
            raise NonFiniteError(
                f"The example inputs hold NaN or Inf: {', '.join(bad)}; give "
                "finite example inputs (e.g. clean x_test)."
            )
        with torch.no_grad():
            outputs = flatten_outputs(materialized(*inputs))
        bad = non_finite_names({f"output {i}": t for i, t in enumerate(outputs)})
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
        stored_inputs = [
            t.half() if metadata.get("check_inputs_float16") and t.dtype == torch.float32 else t
            for t in inputs
        ]
        tensors.update({f"{CHECK_INPUT_PREFIX}{i}": t for i, t in enumerate(stored_inputs)})
        tensors.update({f"{CHECK_OUTPUT_PREFIX}{i}": t for i, t in enumerate(outputs)})
    return save_artifact(path, tensors, metadata, skeleton=skeleton)


def half_check_input(t: torch.Tensor) -> torch.Tensor:
    """A float32 check input rounded to float16 values (still float32); others unchanged."""
    return t.half().float() if t.dtype == torch.float32 else t
