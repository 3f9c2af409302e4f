"""Read a generator file (:func:`load_generator`) and check it before trusting it.

The metadata is validated against the schema, the generator is planned on the meta device and
compared with what the metadata says, and only then are tensors read and the generator built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qtcompress import limits
from qtcompress.config import QTConfig
from qtcompress.errors import FormatError, QTCompressError, ResourceLimitError
from qtcompress.generator import build_generator
from qtcompress.generator_file.file import GeneratorFile
from qtcompress.generator_file.metadata import (
    CHECK_INPUT_PREFIX,
    CHECK_OUTPUT_PREFIX,
    CLASSICAL_PREFIX,
    GENERATOR_PREFIX,
    GENERATOR_SCHEMA,
    REQUIRED_FIELDS,
    layout_from_json,
    non_finite_names,
)
from qtcompress.generator_file.storage import decode
from qtcompress.io.container import read_artifact
from qtcompress.io.schema import (
    validate,
)
from qtcompress.memory import check_generator_memory

if TYPE_CHECKING:
    pass


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
    built_ansatz = g.ansatz.to_dict()
    if meta["ansatz"] != built_ansatz:
        raise FormatError(
            f"{source}: the stored ansatz does not match the one its config builds "
            f"({_describe_difference(meta['ansatz'], built_ansatz)}); the file is "
            "inconsistent."
        )
    built_mapping = g.file_description(config)
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
    nan = non_finite_names(gen_state)
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
    (:func:`~qtcompress.generator.registry.build_generator`) and loaded. See
    ``docs/format.md``, *Checks on load*.

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
    layout = layout_from_json(meta["layout"], name)
    prints = set(meta["weights_fingerprint"])
    if prints != set(layout.names()):
        raise FormatError(
            f"{name}: weights_fingerprint names {sorted(prints)[:5]} do not match "
            f"the layout's tensors {layout.names()[:5]}; the file is corrupt."
        )
    # Stored encodings back to float32 first: every later check sees the generator's own dtypes.
    prefix = GENERATOR_PREFIX
    decoded = decode(
        {k[len(prefix) :]: v for k, v in artifact.tensors.items() if k.startswith(prefix)},
        meta.get("storage", "float32"),
        name,
    )
    tensors = {k: v for k, v in artifact.tensors.items() if not k.startswith(prefix)}
    tensors.update({prefix + k: v for k, v in decoded.items()})
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
    # What the file stores first (a lie is a FormatError), then what this machine can hold.
    _check_against(planned, meta, config, tensors, name)
    check_generator_memory(planned, layout, source=name)
    try:
        generator = build_generator(layout, config)
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
    if meta.get("check_inputs_float16"):  # stored in half precision, fed as float32
        check_inputs = [t.float() if t.dtype == torch.float16 else t for t in check_inputs]
    nan = non_finite_names(
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
        generator,  # type: ignore[arg-type]
        classical,
        artifact.skeleton,
        check_inputs,
        check_outputs,
    )
