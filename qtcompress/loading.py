"""Load a pretrained PyTorch model from the formats users actually have.

Supported sources, see :func:`load_model`:

* an ``nn.Module`` object (returned as is);
* a state dict in a ``.pt``/``.pth``/``.bin`` file (read with ``torch.load(weights_only=True)``)
  or a ``.safetensors`` file, plus a model factory ``"package.module:callable"`` with JSON
  keyword arguments that builds the empty model;
* a ``torch.export`` program (``.pt2``), loaded with :func:`torch.export.load` after checking
  that the archive holds no pickled payloads (which ``torch.export.load`` would unpickle with
  ``weights_only=False``) unless ``trust_pickle=True``;
* a fully pickled model (``torch.save(model, ...)``), only when the caller trusts the file
  (``trust_pickle=True``), because unpickling runs arbitrary code.

Model parameters must be float32 or float64 (:func:`check_model_dtypes`): the generator, the fit
and the ONNX export work in float32, and half-precision CPU kernels are incomplete.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import pickle
import pickletools
import types
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtcompress.errors import (
    ConfigError,
    FormatError,
    MissingFileError,
    QTCompressError,
    UnsafeFileError,
)

__all__ = [
    "STATE_DICT_SUFFIXES",
    "build_model",
    "check_model_dtypes",
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

# Parameter dtypes qtcompress can compress (generation, fitting and export are float32).
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _unsafe(path: Path) -> UnsafeFileError:
    """The one-line refusal of a file that can only be loaded by running code from it."""
    return UnsafeFileError(
        f"{str(path)!r}: this file needs code execution to load; use --trust-pickle "
        "(trust_pickle=True) only if you trust its source."
    )


def _existing_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"Model file {str(p)!r} does not exist.")
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


def _pickle_parses(data: bytes, count: int = 1) -> bool:
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
                return len(pkls) == 1 and _pickle_parses(zf.read(pkls[0]))
        # The legacy format: magic number, protocol, system info, then the object.
        with open(path, "rb") as fh:
            return _pickle_parses(fh.read(64 << 20), count=4)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, RuntimeError):
        return False


def _torch_load(path: Path, *, trust_pickle: bool) -> Any:
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
            raise _unsafe(path) from exc
    except Exception as exc:  # torch reports corruption as RuntimeError/KeyError/EOFError...
        raise FormatError(
            f"{str(path)!r} is truncated, corrupt, or not a PyTorch file "
            f"({type(exc).__name__}: {_first_line(exc)})."
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
            f"Cannot unpickle {str(path)!r} ({type(exc).__name__}: {_first_line(exc)}); if it "
            "holds a model, its class must be importable here."
        ) from exc


def _first_line(exc: BaseException, limit: int = 200) -> str:
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


def load_model(
    source: nn.Module | str | os.PathLike[str],
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    factory_kwargs: str | Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    strict: bool = True,
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
        strict: A state dict must match the model's keys exactly; ``False`` ignores unexpected
            keys and missing buffers, with a warning (see :func:`load_state_dict_strict`).

    Returns:
        The model with its weights, in eval mode when loaded from a file.

    Raises:
        MissingFileError: The file does not exist.
        ConfigError: Unknown suffix, bad factory or kwargs, factory missing for a state dict
            or given where it is not used.
        FormatError: Truncated or corrupt file, or a state dict that does not fit the model.
        UnsafeFileError: The file is a pickle, or a ``.pt2`` with pickled payloads, and
            ``trust_pickle`` is False.
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
        exported = _load_exported(path, trust_pickle=trust_pickle)
        return check_model_dtypes(exported, source=repr(str(path))).eval()
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
            return check_model_dtypes(obj, source=repr(str(path))).eval()
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
    model = build_model(factory, factory_kwargs)
    load_state_dict_strict(model, state, source=repr(str(path)), strict=strict)
    return check_model_dtypes(model, source=repr(str(path))).eval()


def build_model(factory: str | Callable[..., Any], factory_kwargs: Any = None) -> nn.Module:
    """Build the empty model with a factory and its keyword arguments.

    Args:
        factory: ``"package.module:callable"`` or a callable.
        factory_kwargs: A JSON object string, a mapping, or ``None``.

    Returns:
        The module the factory built.

    Raises:
        ConfigError: A bad factory spec or kwargs, a factory that raises, or one that does not
            return an ``nn.Module``.
    """
    build = resolve_factory(factory) if isinstance(factory, str) else factory
    kwargs = parse_factory_kwargs(factory_kwargs)
    try:
        model = build(**kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"Model factory {factory!r} rejected kwargs {kwargs}: {_first_line(exc)}"
        ) from exc
    except QTCompressError:
        raise
    except Exception as exc:  # the user's code may raise anything
        raise ConfigError(
            f"Model factory {factory!r} failed with {type(exc).__name__}: "
            f"{_first_line(exc)}; fix the factory or its kwargs."
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"Model factory {factory!r} returned {type(model).__name__}, not an nn.Module."
        )
    return model


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


# -- torch.export programs (.pt2) --------------------------------------------------------------
# Archive entries (below the archive's root folder) that torch.export.load reads without
# unpickling; anything else (AOTInductor libraries, legacy pickled weights, custom or opaque
# objects) needs code execution or is not a plain exported program.
_PT2_PLAIN = ("archive_format", "archive_version", "byteorder", ".data/", "models/", "extra/")


def _pt2_problems(path: Path) -> list[str]:
    """Entries of a ``.pt2`` archive that would be unpickled or executed on load.

    Reads only the archive's JSON configs and, with the weights-only unpickler, the sample
    inputs (which ``torch.export.load`` would otherwise retry with full unpickling).
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            roots = {n.split("/", 1)[0] for n in names}
            if len(roots) != 1 or not all("/" in n for n in names):
                raise FormatError(
                    f"{str(path)!r} is not a torch.export program (no single "
                    "archive folder); re-export it with torch.export.save."
                )
            root = roots.pop() + "/"
            if root + "archive_version" not in names or root + "models/" not in {
                n[: len(root) + 7] for n in names
            }:
                raise FormatError(
                    f"{str(path)!r} is truncated, corrupt, or not a torch.export "
                    "program (no archive_version or models/); re-export it with "
                    "torch.export.save."
                )
            problems = []
            for full in names:
                name = full[len(root) :]
                if name.endswith("/") or name.startswith(_PT2_PLAIN):
                    continue
                if name.startswith(("data/weights/", "data/constants/")):
                    if name.endswith("_config.json"):
                        problems += _pt2_config_problems(zf.read(full), name)
                    elif not name.rsplit("/", 1)[1].startswith(("weight_", "tensor_")):
                        problems.append(name)
                elif name.startswith("data/sample_inputs/"):
                    if not _weights_only_loads(zf.read(full), name):
                        problems.append(name)
                else:
                    problems.append(name)
            return problems
    except QTCompressError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError, RuntimeError) as exc:
        raise FormatError(
            f"{str(path)!r} is truncated, corrupt, or not a torch.export program "
            f"({type(exc).__name__}: {_first_line(exc)})."
        ) from exc


def _weights_only_loads(data: bytes, name: str) -> bool:
    """Whether ``torch.load(weights_only=True)`` reads ``data``; corrupt data raises ValueError.

    ``torch.export.load`` retries a refused sample-inputs pickle with full unpickling, so a
    refusal means the archive needs code execution; a pickle that does not even parse is corrupt.
    """
    try:
        torch.load(io.BytesIO(data), weights_only=True)
        return True
    except pickle.UnpicklingError:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            pkls = [n for n in inner.namelist() if n.endswith("data.pkl")]
            if len(pkls) == 1 and _pickle_parses(inner.read(pkls[0])):
                return False
        raise ValueError(f"corrupt {name}") from None
    except Exception as exc:  # noqa: BLE001 - torch reports corruption with many types
        raise ValueError(f"corrupt {name}") from exc


def _pt2_config_problems(raw: bytes, name: str) -> list[str]:
    """Payloads of one weights/constants config that torch would unpickle."""
    try:
        config = json.loads(raw)["config"]
        entries = [
            (fqn, bool(meta.get("use_pickle")), str(meta.get("path_name", "")))
            for fqn, meta in config.items()
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed {name}") from exc
    return [
        f"{name}: {fqn}"
        for fqn, pickled, file in entries
        if pickled or not file.startswith(("weight_", "tensor_"))
    ]


@contextlib.contextmanager
def _quiet_untrusted_export_load() -> Iterator[None]:
    """Silence torch.export's multi-line warnings and force weights-only unpickling.

    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` makes every ``torch.load`` inside ``torch.export.load``
    weights-only even where it passes ``weights_only=False``: a second line of defence behind
    :func:`_pt2_problems`.
    """
    saved_env = {
        k: os.environ.pop(k, None)
        for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    }
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _fixed_mode_train(self: nn.Module, mode: bool = True) -> nn.Module:
    # An exported graph is traced in one mode (BatchNorm, dropout are plain ops in it): train()
    # and eval() only set the flags, so code that calls model.eval() works.
    for module in self.modules():
        module.training = mode
    return self


def _fixed_mode_eval(self: nn.Module) -> nn.Module:
    return _fixed_mode_train(self, False)


def _load_exported(path: Path, *, trust_pickle: bool = False) -> nn.Module:
    """Load a ``torch.export`` program and return its module (never calling ``eval()`` on it).

    Without ``trust_pickle`` the archive must hold no pickled payloads (see
    :func:`_pt2_problems`). The returned module runs the exported graph as traced (export it in
    eval mode); its ``train()``/``eval()`` only set flags.
    """
    if not trust_pickle:
        problems = _pt2_problems(path)
        if problems:
            raise _unsafe(path)
        context: contextlib.AbstractContextManager[None] = _quiet_untrusted_export_load()
    else:
        context = contextlib.nullcontext()
    try:
        with context:
            program = torch.export.load(path)
            module = program.module()
    except QTCompressError:
        raise
    except Exception as exc:  # torch raises RuntimeError/BadZipFile/KeyError on bad archives
        raise FormatError(
            f"{str(path)!r} is truncated, corrupt, or not a torch.export program "
            f"({type(exc).__name__}: {_first_line(exc)})."
        ) from exc
    module.train = types.MethodType(_fixed_mode_train, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(_fixed_mode_eval, module)  # type: ignore[method-assign]
    return module
