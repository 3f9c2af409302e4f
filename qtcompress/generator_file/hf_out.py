"""A Hugging Face model folder written back from a generator file (``reconstruct --hf-out``).

The generator file records the folder's class and its small files (config, tokenizer:
:func:`qtcompress.io.hf_folder.folder_record`); :func:`write_hf_folder` writes them back with
the regenerated weights as ``model.safetensors`` and :func:`check_hf_folder` loads the folder
with the recorded class and compares it with the outputs recorded at save time.
"""

from __future__ import annotations

import base64
import os
import re
import zlib
from collections.abc import Mapping
from typing import Any

import torch

from qtcompress.constants import POOLINGS
from qtcompress.data.pooling import pooled, unwrapped_name
from qtcompress.errors import ConfigError, FormatError, OutputError
from qtcompress.generator_file.file import GeneratorFile
from qtcompress.io.atomic import atomic_write_bytes, check_writable_dir
from qtcompress.io.container import write_safetensors
from qtcompress.io.hf_folder import (
    _SAFE_PART,
    MAX_RECORDED_FILE_BYTES,
    PICKLE_WEIGHTS,
    quiet_transformers,
)
from qtcompress.io.state_dict import first_line


def recorded_folder(gen: GeneratorFile) -> dict[str, Any]:
    """The ``model.hf`` entry of a generator file, checked (a :class:`FormatError` if malformed).

    Raises:
        ConfigError: The file was not compressed from a Hugging Face model folder.
        FormatError: The entry is malformed, or names a file outside the folder.
    """
    model = gen.metadata.get("model")
    record = model.get("hf") if isinstance(model, Mapping) else None
    if record is None:
        raise ConfigError(
            f"{gen.path.name} was not compressed from a Hugging Face model folder (no config "
            "recorded); write the weights with --state-dict instead."
        )
    files = record.get("files") if isinstance(record, Mapping) else None
    cls = record.get("class") if isinstance(record, Mapping) else None
    if not isinstance(files, Mapping) or not isinstance(cls, str) or not cls.isidentifier():
        raise FormatError(f"{gen.path.name}: model.hf must hold a class and files; it is corrupt.")
    if "config.json" not in files:
        raise FormatError(f"{gen.path.name}: model.hf holds no config.json; it is corrupt.")
    view = record.get("view")
    if view is not None and not (
        isinstance(view, Mapping)
        and view.get("pooling") in POOLINGS
        and (view.get("output") is None or isinstance(view.get("output"), (str, int)))
    ):
        raise FormatError(f"{gen.path.name}: model.hf view {view!r} is malformed; it is corrupt.")
    for rel, entry in files.items():
        parts = rel.split("/") if isinstance(rel, str) else []
        # The names come from a file: never let one write outside the output folder.
        if not (1 <= len(parts) <= 2 and all(_SAFE_PART.fullmatch(x) for x in parts)) or (
            rel == "model.safetensors"
        ):
            raise FormatError(f"{gen.path.name}: model.hf names the file {rel!r}; it is corrupt.")
        if not (
            isinstance(entry, Mapping)
            and entry.get("encoding") in ("utf-8", "zlib+base64")
            and isinstance(entry.get("data"), str)
        ):
            raise FormatError(f"{gen.path.name}: model.hf entry {rel!r} is malformed.")
    return dict(record)


def _file_bytes(entry: Mapping[str, str], where: str) -> bytes:
    """A recorded file's bytes; a compressed one inflated to at most the recording limit."""
    if entry["encoding"] == "utf-8":
        return entry["data"].encode("utf-8")
    try:
        inflate = zlib.decompressobj()
        # Bounded: a hostile file's few bytes must not inflate into gigabytes.
        data = inflate.decompress(
            base64.b64decode(entry["data"], validate=True), MAX_RECORDED_FILE_BYTES + 1
        )
    except (ValueError, zlib.error) as exc:
        raise FormatError(f"{where} does not decode ({exc}); the file is corrupt.") from exc
    if len(data) > MAX_RECORDED_FILE_BYTES or not inflate.eof:
        raise FormatError(
            f"{where} inflates past {MAX_RECORDED_FILE_BYTES:,} bytes or is truncated; the file "
            "is corrupt."
        )
    return data


def write_hf_folder(gen: GeneratorFile, path: str | os.PathLike[str]) -> list[str]:
    """Write a Hugging Face model folder from a generator file alone.

    The recorded config and tokenizer files come back byte for byte; the weights are
    regenerated and written as ``model.safetensors`` (every state-dict name, tied names
    included), which ``from_pretrained`` of the recorded class loads.

    Args:
        gen: The generator file (see :func:`qtcompress.load`).
        path: The folder to write (created; its parent must exist).

    Returns:
        The files written, relative to the folder.

    Raises:
        ConfigError: The file was not compressed from a model folder.
        FormatError: The recorded entry is malformed, or a regenerated weight is NaN or Inf.
        OutputError: The folder cannot be written, or it holds other weight files that
            ``from_pretrained`` would read instead.
    """
    record = recorded_folder(gen)
    # A pooled view was compressed with its model under ``model.``: the folder holds the
    # model's own names.
    rename = unwrapped_name if record.get("view") is not None else str
    state = {rename(k): v.contiguous().clone() for k, v in gen.state_dict().items()}
    size = sum(t.numel() * t.element_size() for t in state.values())
    folder = check_writable_dir(path, size + (1 << 20))
    stale = sorted(
        p.name
        for p in folder.iterdir()
        if p.name in (*PICKLE_WEIGHTS, "model.safetensors.index.json")
        or re.fullmatch(r"model-.*\.safetensors", p.name)
    )
    if stale:
        raise OutputError(
            f"{str(folder)!r} already holds weights {stale} that from_pretrained would read "
            "instead of the regenerated ones; write into an empty folder."
        )
    written = []
    for rel, entry in sorted(record["files"].items()):
        data = _file_bytes(entry, f"{gen.path.name}: model.hf entry {rel!r}")
        (folder / rel).parent.mkdir(exist_ok=True)
        atomic_write_bytes(folder / rel, data)
        written.append(rel)
    # "format": "pt" is what transformers expects of a PyTorch safetensors file.
    write_safetensors(folder / "model.safetensors", state, {"format": "pt"})
    return [*written, "model.safetensors"]


def check_hf_folder(gen: GeneratorFile, path: str | os.PathLike[str]) -> float | None:
    """Load a written folder with the recorded class and compare with the recorded outputs.

    Returns:
        The largest absolute difference on the file's check batch, or ``None`` when the file
        has no check batch or transformers is not installed.

    Raises:
        FormatError: transformers cannot load the folder, or its outputs do not line up with
            the recorded ones.
    """
    if not gen.check_inputs:
        return None
    try:
        import transformers
    except ImportError:
        return None
    record = recorded_folder(gen)
    cls_name = record["class"]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise FormatError(f"transformers {transformers.__version__} has no class {cls_name!r}.")
    with quiet_transformers(transformers):
        try:
            model = cls.from_pretrained(str(path), local_files_only=True).eval()
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise FormatError(
                f"{cls_name}.from_pretrained({str(path)!r}) failed: {first_line(exc)}"
            ) from exc
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False
    view = record.get("view")
    if view is not None:  # the recorded outputs are the pooled view's
        model = pooled(model, view["pooling"], view.get("output")).eval()
    with torch.no_grad():
        return gen.compare_outputs(model(*gen.check_inputs))
