"""State-dict files: read without unpickling untrusted data, and loaded strictly into a model.

``.pt``/``.pth``/``.bin``/``.ckpt`` files are read with ``torch.load(weights_only=True)``; a
full unpickle happens only with ``trust_pickle=True``. :func:`load_state_dict_strict` names
missing and unexpected keys and shape mismatches.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtcompress.errors import (
    ConfigError,
    FormatError,
    MissingFileError,
    UnsafeFileError,
)

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
"""File suffixes read with ``torch.load`` (a state dict, or a pickled model if trusted)."""

# Checkpoints often wrap the state dict with training state; these keys are unwrapped.
_WRAPPER_KEYS = ("state_dict", "model_state_dict")


def unsafe_file_error(path: Path) -> UnsafeFileError:
    """The one-line refusal of a file that can only be loaded by running code from it."""
    return UnsafeFileError(
        f"{str(path)!r}: this file needs code execution to load; use --trust-pickle "
        "(trust_pickle=True) only if you trust its source."
    )


def existing_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path; :class:`MissingFileError` if absent, :class:`ConfigError` if no file."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"Model file {str(p)!r} does not exist.")
    if not p.is_file():
        raise ConfigError(f"Model path {str(p)!r} is not a file.")
    return p


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded object: a state dict, or one under a known wrapper key."""
    if _is_tensor_mapping(obj) and obj:
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and _is_tensor_mapping(obj[key]) and obj[key]:
                return dict(obj[key])
    raise FormatError(
        f"{str(path)!r} holds a {type(obj).__name__}, not a state dict (a mapping of "
        f"parameter names to tensors, optionally under one of {list(_WRAPPER_KEYS)})."
    )


def pickle_parses(data: bytes, count: int = 1) -> bool:
    """Whether ``data`` starts with ``count`` well-formed pickles (read, never executed)."""
    stream = io.BytesIO(data)
    try:
        for _ in range(count):
            for _op in pickletools.genops(stream):
                pass
    except Exception:  # noqa: BLE001 - any parse failure means "not a well-formed pickle"
        return False
    return True


def _is_wellformed_pickle_file(path: Path) -> bool:
    """Whether a ``torch.save`` file is a structurally valid pickle (opcodes parsed, not run).

    Tells "valid, but needs code execution" from "corrupt" without relying on the wording of
    torch's error messages, which changes between releases.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                return len(pkls) == 1 and pickle_parses(zf.read(pkls[0]))
        # The legacy format: magic number, protocol, system info, then the object.
        with open(path, "rb") as fh:
            return pickle_parses(fh.read(64 << 20), count=4)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, RuntimeError):
        return False


def torch_load_checked(path: Path, *, trust_pickle: bool) -> Any:
    """``torch.load`` that only unpickles arbitrary objects when trusted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler refused something: a valid pickle that needs arbitrary
        # classes (a whole nn.Module, or a malicious payload), or a corrupt file.
        if not _is_wellformed_pickle_file(path):
            raise FormatError(
                f"{str(path)!r} is truncated, corrupt, or not a PyTorch file; check the file."
            ) from exc
        if not trust_pickle:
            raise unsafe_file_error(path) from exc
    except Exception as exc:  # torch reports corruption as RuntimeError/KeyError/EOFError...
        raise FormatError(
            f"{str(path)!r} is truncated, corrupt, or not a PyTorch file "
            f"({type(exc).__name__}: {first_line(exc)})."
        ) from exc
    warnings.warn(
        f"Loading {str(path)!r} with full unpickling (trust_pickle=True): this runs any code "
        "the file contains.",
        UserWarning,
        stacklevel=3,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise FormatError(
            f"Cannot unpickle {str(path)!r} ({type(exc).__name__}: {first_line(exc)}); if it "
            "holds a model, its class must be importable here."
        ) from exc


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, shortened: messages stay one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_state_dict_file(
    path: str | os.PathLike[str], *, trust_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` or ``torch.save`` file.

    Args:
        path: The file.
        trust_pickle: Allow full unpickling (only needed for checkpoints that hold non-tensor
            Python objects).

    Returns:
        Parameter names to tensors (on CPU).

    Raises:
        MissingFileError: The file does not exist.
        FormatError: The file is truncated/corrupt or does not hold a state dict.
        UnsafeFileError: The file needs full unpickling and ``trust_pickle`` is False.
    """
    p = existing_file(path)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(p, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise FormatError(
                f"{str(p)!r} is truncated, corrupt, or not a safetensors file: {exc}"
            ) from exc
    return as_state_dict(torch_load_checked(p, trust_pickle=trust_pickle), p)


def _alias_groups(model: nn.Module) -> list[set[str]]:
    """Groups of state-dict names that refer to the same tensor (tied weights)."""
    by_id: dict[int, set[str]] = {}
    named: list[tuple[str, torch.Tensor]] = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        by_id.setdefault(id(tensor), set()).add(name)
    return [names for names in by_id.values() if len(names) > 1]


def load_state_dict_strict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "state dict",
    strict: bool = True,
) -> nn.Module:
    """Load ``state_dict`` into ``model`` after checking names and shapes exactly.

    Tied weights may be given under any one of their names (``safetensors`` stores one copy).
    With ``strict=False`` (real checkpoints often carry an extra buffer such as Hugging Face's
    ``embeddings.position_ids``), unexpected keys are ignored and missing *buffers* keep the
    model's own values, each named in one ``UserWarning``; a missing *parameter* is still an
    error, since it would be compressed from random initial values.

    Args:
        model: The freshly built model.
        state_dict: Names to tensors.
        source: How to name the source in error messages (e.g. its path).
        strict: Refuse any missing or unexpected key.

    Returns:
        ``model``, with the values loaded.

    Raises:
        FormatError: Keys are missing or unexpected, or shapes differ; the message names them.
    """
    expected = model.state_dict()
    given = dict(state_dict)
    for group in _alias_groups(model):
        present = [n for n in sorted(group) if n in given]
        if present:
            for name in group - set(present):
                given[name] = given[present[0]]
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [
        f"{k}: model {tuple(expected[k].shape)} vs file {tuple(given[k].shape)}"
        for k in expected
        if k in given and tuple(expected[k].shape) != tuple(given[k].shape)
    ]
    problems = []
    if not strict:
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        skipped = [k for k in missing if k not in params]
        notes = ([f"ignored unexpected keys {unexpected}"] if unexpected else []) + (
            [f"kept the model's own values for missing buffers {skipped}"] if skipped else []
        )
        if notes:
            warnings.warn(f"{source}: " + "; ".join(notes) + " (--non-strict).", stacklevel=2)
        for k in unexpected:
            given.pop(k)
        for k in skipped:
            given[k] = expected[k]
        missing = [k for k in missing if k in params]
        unexpected = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches [{'; '.join(mismatched)}]")
    if problems:
        raise FormatError(
            f"{source} does not fit model {type(model).__name__}: "
            + ", ".join(problems)
            + ". Check the model factory and its kwargs"
            + ("; --non-strict ignores extra keys and missing buffers." if strict else ".")
        )
    model.load_state_dict(given, strict=True)
    return model


# Half precision fails deep inside CPU kernels or the exporter.
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_model_dtypes(model: nn.Module, *, source: str = "The model") -> nn.Module:
    """Refuse a model whose floating-point parameters are not float32/float64.

    Half-precision models (float16, bfloat16) fail deep inside CPU kernels or the exporter; this
    says so up front, with the fix.

    Args:
        model: The loaded model.
        source: How to name it in the message (e.g. its file).

    Returns:
        ``model``.

    Raises:
        ConfigError: A parameter has another floating-point dtype.
    """
    bad = sorted(
        {
            str(p.dtype).removeprefix("torch.")
            for p in model.parameters()
            if p.is_floating_point() and p.dtype not in SUPPORTED_DTYPES
        }
    )
    if bad:
        raise ConfigError(
            f"{source} has {'/'.join(bad)} parameters; qtcompress compresses "
            "float32 models: convert it with model.float() and save it again."
        )
    return model
