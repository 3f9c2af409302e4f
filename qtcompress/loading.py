"""Load a pretrained PyTorch model from the formats users actually have.

Supported sources, see :func:`load_model`:

* an ``nn.Module`` object (returned as is);
* a state dict in a ``.pt``/``.pth``/``.bin`` file (read with ``torch.load(weights_only=True)``)
  or a ``.safetensors`` file, plus a model factory ``"package.module:callable"`` with JSON
  keyword arguments that builds the empty model;
* a ``torch.export`` program (``.pt2``), loaded with :func:`torch.export.load`;
* a fully pickled model (``torch.save(model, ...)``), only when the caller trusts the file
  (``trust_pickle=True``), because unpickling runs arbitrary code.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtcompress.errors import ConfigError, FormatError, UnsafeFileError

__all__ = [
    "STATE_DICT_SUFFIXES",
    "load_model",
    "load_state_dict_file",
    "load_state_dict_strict",
    "parse_factory_kwargs",
    "resolve_factory",
]

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
"""File suffixes read with ``torch.load`` (a state dict, or a pickled model if trusted)."""

# Checkpoints often wrap the state dict with training state; these keys are unwrapped.
_WRAPPER_KEYS = ("state_dict", "model_state_dict")


def _existing_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"Model file {str(p)!r} does not exist.")
    if not p.is_file():
        raise ConfigError(f"Model path {str(p)!r} is not a file.")
    return p


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Import a model factory given as ``"package.module:callable"``.

    The part after the colon may be dotted (``"pkg.mod:Class.build"``).

    Args:
        spec: Import path of the factory.

    Returns:
        The callable.

    Raises:
        ConfigError: The spec is malformed, the module cannot be imported, the attribute does
            not exist, or it is not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(
            f"Model factory {spec!r} must look like 'package.module:callable' (one colon)."
        )
    module_name, attr_path = spec.split(":")
    if not module_name or not attr_path:
        raise ConfigError(
            f"Model factory {spec!r} must look like 'package.module:callable' (one colon)."
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"Cannot import module {module_name!r} of model factory {spec!r}: {exc}. "
            "Is the package installed or on PYTHONPATH?"
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigError(
                f"Model factory {spec!r}: {part!r} not found in {module_name!r}."
            ) from exc
    if not callable(obj):
        raise ConfigError(f"Model factory {spec!r} is not callable (got {type(obj).__name__}).")
    return obj


def parse_factory_kwargs(kwargs: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Parse factory keyword arguments given as a JSON object string or a mapping.

    Args:
        kwargs: ``None``, a JSON object string such as ``'{"classes": 10}'``, or a mapping.

    Returns:
        A new dict of keyword arguments.

    Raises:
        ConfigError: The string is not valid JSON, or it is not a JSON object.
    """
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        try:
            parsed = json.loads(kwargs) if kwargs.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"Factory kwargs are not valid JSON ({exc}): {kwargs!r}") from exc
    else:
        parsed = kwargs
    if not isinstance(parsed, Mapping):
        raise ConfigError(
            f"Factory kwargs must be a JSON object like '{{\"classes\": 10}}', got {kwargs!r}."
        )
    bad = [k for k in parsed if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"Factory kwargs keys must be strings, got {bad!r}.")
    return dict(parsed)


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
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


def _torch_load(path: Path, *, trust_pickle: bool) -> Any:
    """``torch.load`` that only unpickles arbitrary objects when trusted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # A valid pickle that needs a non-tensor class (e.g. a whole nn.Module) fails with
        # "Unsupported global"; any other unpickling error (bad opcode...) means a corrupt file.
        if "Unsupported global" not in str(exc):
            raise FormatError(f"{str(path)!r} is corrupt or not a PyTorch file: {exc}") from exc
        if not trust_pickle:
            raise UnsafeFileError(
                f"{str(path)!r} is a pickled Python object (e.g. a whole model saved with "
                "torch.save(model)), and loading it runs arbitrary code. Pass --trust-pickle "
                "(trust_pickle=True) only if you trust where the file came from, or save a "
                "state dict instead (torch.save(model.state_dict(), path)) and give a model "
                "factory."
            ) from exc
    except Exception as exc:  # torch reports corruption as RuntimeError/KeyError/EOFError...
        raise FormatError(
            f"{str(path)!r} is truncated, corrupt, or not a PyTorch file: "
            f"{type(exc).__name__}: {str(exc)[:300]}"
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
            f"Cannot unpickle {str(path)!r}: {type(exc).__name__}: {str(exc)[:300]}. If it "
            "holds a model, its class must be importable here."
        ) from exc


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
        ConfigError: The file does not exist.
        FormatError: The file is truncated/corrupt or does not hold a state dict.
        UnsafeFileError: The file needs full unpickling and ``trust_pickle`` is False.
    """
    p = _existing_file(path)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(p, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise FormatError(
                f"{str(p)!r} is truncated, corrupt, or not a safetensors file: {exc}"
            ) from exc
    return _as_state_dict(_torch_load(p, trust_pickle=trust_pickle), p)


def _alias_groups(model: nn.Module) -> list[set[str]]:
    """Groups of state-dict names that refer to the same tensor (tied weights)."""
    by_id: dict[int, set[str]] = {}
    named: list[tuple[str, torch.Tensor]] = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        by_id.setdefault(id(tensor), set()).add(name)
    return [names for names in by_id.values() if len(names) > 1]


def load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict"
) -> nn.Module:
    """Load ``state_dict`` into ``model`` after checking names and shapes exactly.

    Tied weights may be given under any one of their names (``safetensors`` stores one copy).

    Args:
        model: The freshly built model.
        state_dict: Names to tensors.
        source: How to name the source in error messages (e.g. its path).

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
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches [{'; '.join(mismatched)}]")
    if problems:
        raise FormatError(
            f"{source} does not fit model {type(model).__name__}: " + ", ".join(problems)
            + ". Check the model factory and its kwargs."
        )
    model.load_state_dict(given, strict=True)
    return model


def load_model(
    source: nn.Module | str | os.PathLike[str],
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    factory_kwargs: str | Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """Load a pretrained model from an object or a file.

    Args:
        source: An ``nn.Module`` (returned unchanged), or a path to a state dict
            (``.pt``/``.pth``/``.bin``/``.ckpt``/``.safetensors``), a ``torch.export`` program
            (``.pt2``), or a pickled model (needs ``trust_pickle``).
        factory: Builds the empty model for a state dict: ``"package.module:callable"`` or a
            callable.
        factory_kwargs: Keyword arguments for ``factory``: a JSON object string or a mapping.
        trust_pickle: Allow loading a fully pickled model, which runs code from the file.

    Returns:
        The model with its weights, in eval mode when loaded from a file.

    Raises:
        ConfigError: Missing file, unknown suffix, bad factory or kwargs, factory missing for a
            state dict or given where it is not used.
        FormatError: Truncated or corrupt file, or a state dict that does not fit the model.
        UnsafeFileError: The file is a pickle and ``trust_pickle`` is False.
    """
    if isinstance(source, nn.Module):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            f"Model source must be an nn.Module or a file path, got {type(source).__name__}."
        )
    path = _existing_file(source)
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        if factory is not None:
            raise ConfigError(f"{str(path)!r} is a torch.export program: do not give a factory.")
        return _load_exported(path)
    if suffix == ".safetensors":
        state = load_state_dict_file(path)
    elif suffix in STATE_DICT_SUFFIXES:
        obj = _torch_load(path, trust_pickle=trust_pickle)
        if isinstance(obj, nn.Module):
            if factory is not None:
                raise ConfigError(
                    f"{str(path)!r} holds a whole model ({type(obj).__name__}): do not give a "
                    "factory."
                )
            return obj.eval()
        state = _as_state_dict(obj, path)
    else:
        raise ConfigError(
            f"Unknown model file type {suffix!r} for {str(path)!r}: expected one of "
            f"{[*STATE_DICT_SUFFIXES, '.safetensors', '.pt2']}."
        )
    if factory is None:
        raise ConfigError(
            f"{str(path)!r} holds a state dict (weights only): give a model factory "
            "'package.module:callable' (and its JSON kwargs) that builds the empty model."
        )
    build = resolve_factory(factory) if isinstance(factory, str) else factory
    kwargs = parse_factory_kwargs(factory_kwargs)
    try:
        model = build(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"Model factory {factory!r} rejected kwargs {kwargs}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"Model factory {factory!r} returned {type(model).__name__}, not an nn.Module."
        )
    return load_state_dict_strict(model, state, source=repr(str(path))).eval()


def _load_exported(path: Path) -> nn.Module:
    try:
        program = torch.export.load(path)
    except Exception as exc:  # torch raises RuntimeError/BadZipFile/KeyError on bad archives
        raise FormatError(
            f"{str(path)!r} is truncated, corrupt, or not a torch.export program: "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    return program.module()
