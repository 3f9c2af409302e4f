"""The generator file container (``*.qtc.safetensors``), independent of what the generator is.

A safetensors file whose string metadata holds JSON values. Reserved metadata keys:

* ``format``: ``"qtcompress.generator"``; ``format_version``: an integer as a string;
* ``tensors``: JSON ``{name: {"dtype": "float32", "shape": [..]}}`` for every stored tensor;
* ``tensors_sha256``: :func:`sha256_of_tensors` of every stored tensor (skeleton included);
* ``skeleton``: JSON ``{"tensor": "__onnx_skeleton__", "bytes": n}`` when an ONNX skeleton is
  stored (as a uint8 tensor).

Every other metadata key is a caller field whose value is stored as JSON. See ``docs/format.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qtcompress.atomic import atomic_path
from qtcompress.errors import ConfigError, FormatError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RESERVED_KEYS",
    "SKELETON_TENSOR",
    "Artifact",
    "load_artifact",
    "read_artifact",
    "save_artifact",
    "sha256_of_tensors",
]

FORMAT_NAME = "qtcompress.generator"
"""Value of the ``format`` metadata key."""

FORMAT_VERSION = 1
"""Container version this code writes and the newest it reads."""

SKELETON_TENSOR = "__onnx_skeleton__"
"""Tensor name of the optional ONNX skeleton (uint8 bytes)."""

RESERVED_KEYS = frozenset({"format", "format_version", "tensors", "tensors_sha256", "skeleton"})
"""Metadata keys owned by the container; callers may not use them."""


@dataclass
class Artifact:
    """Everything read from a generator file.

    Attributes:
        tensors: Named tensors, without the skeleton.
        metadata: Caller fields, JSON-decoded (reserved keys removed).
        skeleton: ONNX skeleton bytes, or ``None``.
        format_version: Container version of the file.
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    skeleton: bytes | None = None
    format_version: int = FORMAT_VERSION


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # Reinterpret as bytes in the tensor's own (little-endian) layout; works for every dtype,
    # including bfloat16 and 0-d tensors, which have no direct numpy equivalent or view.
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sha256_of_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hash named tensors deterministically (independent of insertion order and device).

    For each name in sorted order the hash takes, each followed by a newline: the UTF-8 name,
    the dtype name (e.g. ``float32``), the shape as JSON (e.g. ``[3, 4]``), the byte length, and
    then the raw little-endian bytes of the contiguous tensor.

    Args:
        tensors: Names to tensors.

    Returns:
        The hex SHA-256 digest.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        data = _tensor_bytes(t)
        header = f"{name}\n{_dtype_name(t.dtype)}\n{json.dumps(list(t.shape))}\n{len(data)}\n"
        h.update(header.encode("utf-8"))
        h.update(data)
    return h.hexdigest()


def _plain(name: str, t: Any) -> torch.Tensor:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"Tensor names must be non-empty strings, got {name!r}.")
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"Tensor {name!r} is a {type(t).__name__}, not a torch.Tensor.")
    if t.layout != torch.strided:
        raise ConfigError(f"Tensor {name!r} has layout {t.layout}; only dense tensors are stored.")
    # safetensors refuses shared or non-contiguous storage: store an independent copy.
    return t.detach().to("cpu").contiguous().clone()


def _json(key: str, value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Metadata field {key!r} is not JSON-serialisable: {exc}") from exc


def save_artifact(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    *,
    skeleton: bytes | None = None,
) -> Path:
    """Write a generator file atomically.

    Args:
        path: Destination (conventionally ``*.qtc.safetensors``).
        tensors: Named tensors; copied to plain contiguous CPU tensors.
        metadata: Caller fields, each JSON-serialisable (no NaN/Inf); keys must not be in
            :data:`RESERVED_KEYS`.
        skeleton: Optional ONNX skeleton bytes (see :mod:`qtcompress.onnx_export`).

    Returns:
        The destination path.

    Raises:
        ConfigError: Bad tensors or metadata, a reserved key or tensor name, or a missing
            destination folder.
    """
    from safetensors.torch import save_file

    clash = sorted(RESERVED_KEYS & set(metadata))
    if clash:
        raise ConfigError(f"Metadata keys {clash} are reserved by the container.")
    if SKELETON_TENSOR in tensors:
        raise ConfigError(f"Tensor name {SKELETON_TENSOR!r} is reserved for the ONNX skeleton.")
    stored = {name: _plain(name, t) for name, t in tensors.items()}
    header: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"Metadata keys must be non-empty strings, got {key!r}.")
        header[key] = _json(key, value)
    if skeleton is not None:
        if not isinstance(skeleton, (bytes, bytearray)) or not skeleton:
            raise ConfigError("The ONNX skeleton must be non-empty bytes.")
        stored[SKELETON_TENSOR] = torch.frombuffer(bytearray(skeleton), dtype=torch.uint8)
        header["skeleton"] = _json("skeleton", {"tensor": SKELETON_TENSOR,
                                                "bytes": len(skeleton)})
    header["format"] = FORMAT_NAME
    header["format_version"] = str(FORMAT_VERSION)
    header["tensors"] = _json("tensors", {
        n: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for n, t in stored.items()
    })
    header["tensors_sha256"] = sha256_of_tensors(stored)
    with atomic_path(path) as tmp:
        save_file(stored, str(tmp), metadata=header)
    return Path(path)


def _loads(key: str, raw: str, path: Path) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FormatError(
            f"{str(path)!r}: metadata field {key!r} is not valid JSON: {exc}"
        ) from exc


def read_artifact(
    path: str | os.PathLike[str], *, expected_tensors: Iterable[str] | None = None
) -> Artifact:
    """Read and fully verify a generator file.

    Args:
        path: The file.
        expected_tensors: If given, the exact set of tensor names the caller needs (skeleton
            excluded); any missing or extra tensor is an error.

    Returns:
        The :class:`Artifact`.

    Raises:
        ConfigError: The file does not exist.
        FormatError: Truncated/corrupt file, wrong format name or unsupported version,
            missing/extra tensors, tensors that differ from the declared dtypes/shapes, or a
            checksum mismatch. The message names the file and the problem.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Generator file {str(p)!r} does not exist.")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FormatError(
            f"{str(p)!r} is truncated, corrupt, or not a safetensors file: {exc}"
        ) from exc

    name = header.get("format")
    if name != FORMAT_NAME:
        raise FormatError(
            f"{str(p)!r} is not a qtcompress generator file (format {name!r}, expected "
            f"{FORMAT_NAME!r})."
        )
    raw_version = header.get("format_version", "")
    if not raw_version.isdigit():
        raise FormatError(f"{str(p)!r} has an invalid format_version {raw_version!r}.")
    version = int(raw_version)
    if not 1 <= version <= FORMAT_VERSION:
        raise FormatError(
            f"{str(p)!r} has format version {version}; this qtcompress reads versions 1 to "
            f"{FORMAT_VERSION}. Upgrade qtcompress to read it."
        )

    declared = _loads("tensors", header.get("tensors", "null"), p)
    if not isinstance(declared, dict):
        raise FormatError(f"{str(p)!r}: metadata field 'tensors' is missing or not an object.")
    missing = sorted(set(declared) - set(tensors))
    extra = sorted(set(tensors) - set(declared))
    if missing or extra:
        raise FormatError(
            f"{str(p)!r}: tensors do not match the metadata: missing {missing}, undeclared "
            f"{extra}."
        )
    wrong = []
    for tname, spec in declared.items():
        t = tensors[tname]
        if not isinstance(spec, dict) or spec.get("dtype") != _dtype_name(t.dtype) or (
            spec.get("shape") != list(t.shape)
        ):
            wrong.append(f"{tname}: declared {spec}, stored {_dtype_name(t.dtype)} "
                         f"{list(t.shape)}")
    if wrong:
        raise FormatError(f"{str(p)!r}: tensors differ from the metadata: {'; '.join(wrong)}.")
    digest = sha256_of_tensors(tensors)
    if header.get("tensors_sha256") != digest:
        raise FormatError(
            f"{str(p)!r}: tensor checksum mismatch (stored {header.get('tensors_sha256')!r}, "
            f"computed {digest!r}): the file is corrupt or was modified."
        )

    skeleton: bytes | None = None
    if "skeleton" in header:
        info = _loads("skeleton", header["skeleton"], p)
        tensor_name = info.get("tensor") if isinstance(info, dict) else None
        if tensor_name != SKELETON_TENSOR or SKELETON_TENSOR not in tensors:
            raise FormatError(f"{str(p)!r}: metadata declares a skeleton that is not stored.")
        blob = tensors.pop(SKELETON_TENSOR)
        if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() != info.get("bytes"):
            raise FormatError(
                f"{str(p)!r}: skeleton tensor is {blob.dtype} {list(blob.shape)}, expected "
                f"uint8 [{info.get('bytes')}]."
            )
        skeleton = blob.numpy().tobytes()
    elif SKELETON_TENSOR in tensors:
        raise FormatError(f"{str(p)!r}: skeleton tensor stored without 'skeleton' metadata.")

    if expected_tensors is not None:
        want = set(expected_tensors)
        missing = sorted(want - set(tensors))
        extra = sorted(set(tensors) - want)
        if missing or extra:
            raise FormatError(
                f"{str(p)!r}: missing tensors {missing}, unexpected tensors {extra}."
            )

    metadata = {
        k: _loads(k, v, p) for k, v in header.items() if k not in RESERVED_KEYS
    }
    return Artifact(tensors=tensors, metadata=metadata, skeleton=skeleton,
                    format_version=version)


def load_artifact(
    path: str | os.PathLike[str], *, expected_tensors: Iterable[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a generator file; return ``(tensors, metadata)``.

    Use :func:`read_artifact` to also get the ONNX skeleton and the version.

    Args:
        path: The file.
        expected_tensors: As for :func:`read_artifact`.

    Returns:
        Tensors (skeleton excluded) and the caller's metadata fields.

    Raises:
        ConfigError: The file does not exist.
        FormatError: See :func:`read_artifact`.
    """
    art = read_artifact(path, expected_tensors=expected_tensors)
    return art.tensors, art.metadata
