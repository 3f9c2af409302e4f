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
  (``trust_pickle=True``), because unpickling runs arbitrary code;
* a Hugging Face model folder (``config.json`` + ``model.safetensors``), built with
  ``transformers`` from the folder alone (:mod:`qtcompress.io.hf_folder`).

Model parameters must be float32 or float64 (:func:`check_model_dtypes`): the generator, the fit
and the ONNX export work in float32, and half-precision CPU kernels are incomplete.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from qtcompress.errors import (
    ConfigError,
    QTCompressError,
)
from qtcompress.io.exported_program import load_exported_program
from qtcompress.io.hf_folder import load_hf_folder
from qtcompress.io.state_dict import (
    STATE_DICT_SUFFIXES,
    as_state_dict,
    check_model_dtypes,
    existing_file,
    first_line,
    load_state_dict_file,
    load_state_dict_strict,
    torch_load_checked,
)

# Parameter dtypes qtcompress can compress (generation, fitting and export are float32).


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


def load_model(
    source: nn.Module | str | os.PathLike[str],
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    factory_kwargs: str | Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    strict: bool = True,
    hf_class: str | None = None,
    task: str | None = None,
) -> nn.Module:
    """Load a pretrained model from an object, a file or a Hugging Face model folder.

    Args:
        source: An ``nn.Module`` (returned unchanged), or a path to a state dict
            (``.pt``/``.pth``/``.bin``/``.ckpt``/``.safetensors``), a ``torch.export`` program
            (``.pt2``), a pickled model (needs ``trust_pickle``), or a Hugging Face model
            folder (a directory with ``config.json``; see
            :func:`~qtcompress.io.hf_folder.load_hf_folder`).
        factory: Builds the empty model for a state dict: ``"package.module:callable"`` or a
            callable.
        factory_kwargs: Keyword arguments for ``factory``: a JSON object string or a mapping.
        trust_pickle: Allow loading a fully pickled model, which runs code from the file.
        strict: A state dict must match the model's keys exactly; ``False`` ignores unexpected
            keys and missing buffers, with a warning (see :func:`load_state_dict_strict`).
        hf_class: A model folder's transformers class (default: its config's architectures).
        task: Instead of ``hf_class``: the task whose Auto class builds a model folder.

    Returns:
        The model with its weights, in eval mode when loaded from a file.

    Raises:
        MissingFileError: The file does not exist.
        ConfigError: Unknown suffix, bad factory or kwargs, factory missing for a state dict
            or given where it is not used; a model folder without transformers installed.
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
    if Path(source).is_dir():
        if factory is not None:
            raise ConfigError(f"{str(source)!r} is a model folder: do not give a factory.")
        return load_hf_folder(source, hf_class=hf_class, task=task, trust_pickle=trust_pickle)[0]
    if hf_class is not None or task is not None:
        raise ConfigError("hf_class and task apply to Hugging Face model folders only.")
    path = existing_file(source)
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        if factory is not None:
            raise ConfigError(f"{str(path)!r} is a torch.export program: do not give a factory.")
        exported = load_exported_program(path, trust_pickle=trust_pickle)
        return check_model_dtypes(exported, source=repr(str(path))).eval()
    if suffix == ".safetensors":
        state = load_state_dict_file(path)
    elif suffix in STATE_DICT_SUFFIXES:
        obj = torch_load_checked(path, trust_pickle=trust_pickle)
        if isinstance(obj, nn.Module):
            if factory is not None:
                raise ConfigError(
                    f"{str(path)!r} holds a whole model ({type(obj).__name__}): do not give a "
                    "factory."
                )
            return check_model_dtypes(obj, source=repr(str(path))).eval()
        state = as_state_dict(obj, path)
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
            f"Model factory {factory!r} rejected kwargs {kwargs}: {first_line(exc)}"
        ) from exc
    except QTCompressError:
        raise
    except Exception as exc:  # the user's code may raise anything
        raise ConfigError(
            f"Model factory {factory!r} failed with {type(exc).__name__}: "
            f"{first_line(exc)}; fix the factory or its kwargs."
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"Model factory {factory!r} returned {type(model).__name__}, not an nn.Module."
        )
    return model
