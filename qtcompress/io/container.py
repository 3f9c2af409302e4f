"""The generator file container (``*.qtc.safetensors``), independent of what the generator is.

A safetensors file whose string metadata holds JSON values. Reserved metadata keys:

* ``format``: ``"qtcompress.generator"``; ``format_version``: an integer as a string;
* ``tensors``: JSON ``{name: {"dtype": "float32", "shape": [..]}}`` for every stored tensor;
* ``tensors_sha256``: :func:`sha256_of_tensors` of every stored tensor (skeleton included);
* ``skeleton``: JSON ``{"tensor": "__onnx_skeleton__", "bytes": n}`` when an ONNX skeleton is
  stored (as a uint8 tensor).

Every other metadata key is a caller field whose value is stored as JSON. See ``docs/format.md``.

Writing, reading and validating the container stay in one module (about 400 lines): the
reader's checks mirror the writer's layout line by line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qtcompress.errors import ConfigError, FormatError, MissingFileError
from qtcompress.io.atomic import atomic_path
from qtcompress.io.schema import Int, ListOf, MapOf, Obj, Str, json_depth, validate
from qtcompress.limits import MAX_JSON_DEPTH, MAX_TENSOR_RANK

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RESERVED_KEYS",
    "SKELETON_TENSOR",
    "Artifact",
    "read_artifact",
    "save_artifact",
    "sha256_of_tensors",
    "write_safetensors",
]

FORMAT_NAME = "qtcompress.generator"
"""Value of the ``format`` metadata key."""

FORMAT_VERSION = 1
"""Container version this code writes and the newest it reads."""

SKELETON_TENSOR = "__onnx_skeleton__"
"""Tensor name of the optional ONNX skeleton (uint8 bytes)."""

RESERVED_KEYS = frozenset({"format", "format_version", "tensors", "tensors_sha256", "skeleton"})
"""Metadata keys owned by the container; callers may not use them."""

# safetensors dtype codes (the subset torch and qtcompress use).
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}

# Schemas of the container's own metadata fields.
_TENSORS_SPEC = MapOf(
    Obj({"dtype": Str(max_len=32), "shape": ListOf(Int(min=0), max_len=MAX_TENSOR_RANK)})
)
_SKELETON_SPEC = Obj(
    {"tensor": Str(), "bytes": Int(min=1)},
    optional={"encoding": Str(choices=("zlib",)), "raw_bytes": Int(min=1, max=1 << 30)},
)


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


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a safetensors file atomically and byte-reproducibly.

    ``safetensors.torch.save_file`` writes metadata keys in a random order (a Rust hash map), so
    two identical saves differ. Here the header is built in Python: metadata keys sorted, tensors
    ordered by decreasing element size then name (as safetensors does, which keeps every tensor
    aligned), compact JSON, padded with spaces to 8 bytes. Any safetensors reader reads it.

    Args:
        path: Destination.
        tensors: Named tensors (copied to plain contiguous CPU tensors).
        metadata: String keys to string values.

    Returns:
        The destination path.

    Raises:
        ConfigError: A tensor, name, dtype or metadata entry cannot be stored.
        OutputError: The destination cannot be written (read-only folder, full disk).
    """
    return _write_plain(path, {name: _plain(name, t) for name, t in tensors.items()}, metadata)


def _write_plain(
    path: str | os.PathLike[str],
    stored: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
) -> Path:
    """:func:`write_safetensors` for tensors that are already plain (see :func:`_plain`)."""
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ConfigError(f"safetensors metadata must map strings to strings; bad keys {bad}.")
    order = sorted(stored, key=lambda n: (-stored[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    offset = 0
    for name in order:
        t = stored[name]
        code = _SAFETENSORS_DTYPES.get(t.dtype)
        if code is None:
            raise ConfigError(
                f"Tensor {name!r} has dtype {t.dtype}, which a generator file cannot store."
            )
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": code,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name in order:
            t = stored[name]
            if t.numel():
                fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
    return Path(path)


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
        skeleton: Optional ONNX skeleton bytes (see :mod:`qtcompress.onnx.export`).

    Returns:
        The destination path.

    Raises:
        ConfigError: Bad tensors or metadata, a reserved key or tensor name, or a missing
            destination folder.
        OutputError: The destination cannot be written (read-only folder, full disk).
    """
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
        # zlib at level 9: a weightless graph is mostly repeated names and attributes
        # (2.8 KB -> about 1 KB for a small CNN), and a small file is the point of the tool.
        packed = zlib.compress(bytes(skeleton), 9)
        stored[SKELETON_TENSOR] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
        info = {"tensor": SKELETON_TENSOR, "bytes": len(packed), "encoding": "zlib"}
        header["skeleton"] = _json("skeleton", {**info, "raw_bytes": len(skeleton)})
    header["format"] = FORMAT_NAME
    header["format_version"] = str(FORMAT_VERSION)
    header["tensors"] = _json(
        "tensors",
        {n: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for n, t in stored.items()},
    )
    header["tensors_sha256"] = sha256_of_tensors(stored)
    # Sorted keys throughout: the same generator gives the same bytes (docs/format.md).
    return _write_plain(path, stored, header)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _loads(key: str, raw: str, path: Path) -> Any:
    try:
        # parse_constant refuses NaN/Infinity, which Python's json accepts by default.
        value = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # also too deep, or a 5,000-digit integer
        raise FormatError(
            f"{str(path)!r}: metadata field {key!r} is not valid JSON ({str(exc)[:100]}); the "
            "file is corrupt."
        ) from exc
    depth = json_depth(value)
    if depth > MAX_JSON_DEPTH:
        raise FormatError(
            f"{str(path)!r}: metadata field {key!r} is nested {depth} deep, more "
            f"than the limit of {MAX_JSON_DEPTH}; the file is corrupt or hostile."
        )
    return value


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
        MissingFileError: The file does not exist.
        FormatError: Truncated/corrupt file, wrong format name or unsupported version,
            missing/extra tensors, tensors that differ from the declared dtypes/shapes, or a
            checksum mismatch. The message names the file and the problem.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"Generator file {str(p)!r} does not exist.")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
        raise FormatError(
            f"{str(p)!r} is truncated, corrupt, or not a safetensors file: {str(exc)[:200]}"
        ) from exc

    name = header.get("format")
    if name != FORMAT_NAME:
        raise FormatError(
            f"{str(p)!r} is not a qtcompress generator file (format {name!r}, expected "
            f"{FORMAT_NAME!r})."
        )
    raw_version = header.get("format_version", "")
    # ASCII digits only: str.isdigit() accepts "²" and "١", which int() then rejects or misreads.
    if not re.fullmatch(r"[0-9]{1,9}", raw_version):
        raise FormatError(
            f"{str(p)!r} has an invalid format_version {raw_version[:40]!r}; the file is corrupt."
        )
    version = int(raw_version)
    if not 1 <= version <= FORMAT_VERSION:
        raise FormatError(
            f"{str(p)!r} has format version {version}; this qtcompress reads versions 1 to "
            f"{FORMAT_VERSION}. Upgrade qtcompress to read it."
        )

    if "tensors" not in header:
        raise FormatError(f"{str(p)!r}: metadata field 'tensors' is missing; the file is corrupt.")
    declared = _loads("tensors", header["tensors"], p)
    validate(declared, _TENSORS_SPEC, "tensors", source=repr(str(p)))
    missing = sorted(set(declared) - set(tensors))
    extra = sorted(set(tensors) - set(declared))
    if missing or extra:
        raise FormatError(
            f"{str(p)!r}: tensors do not match the metadata: missing {missing}, undeclared {extra}."
        )
    wrong = []
    for tname, spec in declared.items():
        t = tensors[tname]
        if spec["dtype"] != _dtype_name(t.dtype) or spec["shape"] != list(t.shape):
            wrong.append(f"{tname}: declared {spec}, stored {_dtype_name(t.dtype)} {list(t.shape)}")
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
        validate(info, _SKELETON_SPEC, "skeleton", source=repr(str(p)))
        if info["tensor"] != SKELETON_TENSOR or SKELETON_TENSOR not in tensors:
            raise FormatError(f"{str(p)!r}: metadata declares a skeleton that is not stored.")
        blob = tensors.pop(SKELETON_TENSOR)
        if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() != info["bytes"]:
            raise FormatError(
                f"{str(p)!r}: skeleton tensor is {blob.dtype} {list(blob.shape)}, expected "
                f"uint8 [{info['bytes']}]."
            )
        skeleton = blob.numpy().tobytes()
        if info.get("encoding") == "zlib":
            skeleton = _inflate(skeleton, info.get("raw_bytes", 0), p)
    elif SKELETON_TENSOR in tensors:
        raise FormatError(f"{str(p)!r}: skeleton tensor stored without 'skeleton' metadata.")

    if expected_tensors is not None:
        want = set(expected_tensors)
        missing = sorted(want - set(tensors))
        extra = sorted(set(tensors) - want)
        if missing or extra:
            raise FormatError(f"{str(p)!r}: missing tensors {missing}, unexpected tensors {extra}.")

    metadata = {k: _loads(k, v, p) for k, v in header.items() if k not in RESERVED_KEYS}
    return Artifact(tensors=tensors, metadata=metadata, skeleton=skeleton, format_version=version)


def _inflate(packed: bytes, raw_bytes: int, p: Path) -> bytes:
    """A zlib skeleton back to its declared size, never inflating past it (no zip bomb)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(packed, raw_bytes + 1)
    except zlib.error as exc:
        raise FormatError(f"{str(p)!r}: the ONNX skeleton does not decompress: {exc}.") from exc
    if len(out) != raw_bytes or not d.eof:
        raise FormatError(
            f"{str(p)!r}: the ONNX skeleton decompresses to {len(out)}+ bytes, metadata says "
            f"{raw_bytes}; the file is corrupt."
        )
    return out
