"""``torch.export`` programs (``.pt2``): checked for pickled payloads, then loaded as a module.

``torch.export.load`` unpickles some archive entries with ``weights_only=False``; an archive
holding any is refused unless the caller trusts it (``trust_pickle=True``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import types
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from qtcompress.errors import (
    ConfigError,
    FormatError,
    QTCompressError,
)
from qtcompress.io.state_dict import first_line, pickle_parses, unsafe_file_error

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
            f"({type(exc).__name__}: {first_line(exc)})."
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
            if len(pkls) == 1 and pickle_parses(inner.read(pkls[0])):
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


def _static_batch(program: torch.export.ExportedProgram) -> list[tuple[str, tuple[int, ...]]]:
    """The tensor inputs of a program whose batch (first) dimension is fixed, if all are.

    Returns ``[(input name, shape), ...]`` when no tensor input has a dynamic first dimension
    (the program was exported without ``dynamic_shapes``), else an empty list. Inputs without
    a recorded shape (older archives) count as dynamic: nothing is refused on a guess.
    """
    user = set(program.graph_signature.user_inputs)
    fixed, dynamic = [], False
    for node in program.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" and node.name in user else None
        if not isinstance(val, torch.Tensor) or val.ndim == 0:
            continue
        if isinstance(val.shape[0], int):
            fixed.append((node.name, tuple(int(d) for d in val.shape)))
        else:
            dynamic = True
    return [] if dynamic else fixed


def _static_batch_error(path: Path, fixed: list[tuple[str, tuple[int, ...]]]) -> ConfigError:
    """The error for a program that only runs at its example batch size, with the export fix."""
    (name, shape), names = fixed[0], [n for n, _ in fixed]
    if len(names) == 1:
        fix = f'dynamic_shapes={{"{name}": {{0: torch.export.Dim("batch")}}}}'
    else:
        per_input = ", ".join(f'"{n}": {{0: batch}}' for n in names)
        fix = f'batch = torch.export.Dim("batch") and dynamic_shapes={{{per_input}}}'
    return ConfigError(
        f"{str(path)!r} was exported with a fixed batch of {shape[0]} (input {name!r} has "
        f"shape {list(shape)}, no dynamic dimension), so it runs only on batches of exactly "
        f"{shape[0]}, and compressing runs it on batches of other sizes; export it again with "
        f"a dynamic batch: torch.export.export(model, example_inputs, {fix})."
    )


def load_exported_program(path: Path, *, trust_pickle: bool = False) -> nn.Module:
    """Load a ``torch.export`` program and return its module (never calling ``eval()`` on it).

    Without ``trust_pickle`` the archive must hold no pickled payloads (see
    :func:`_pt2_problems`). The returned module runs the exported graph as traced (export it in
    eval mode); its ``train()``/``eval()`` only set flags.

    Raises:
        UnsafeFileError: The archive holds pickled payloads and ``trust_pickle`` is False.
        FormatError: The archive is truncated, corrupt, or not a ``torch.export`` program.
        ConfigError: The program was exported with a fixed batch size. Its module refuses
            every other batch size (a guard in the graph), while training, evaluation and the
            ONNX export's dynamic-batch check all run other sizes: padding or splitting every
            call to the one size would not survive the ONNX export, so it is refused here,
            with the ``dynamic_shapes`` that fixes it.
    """
    if not trust_pickle:
        problems = _pt2_problems(path)
        if problems:
            raise unsafe_file_error(path)
        context: contextlib.AbstractContextManager[None] = _quiet_untrusted_export_load()
    else:
        context = contextlib.nullcontext()
    try:
        with context:
            program = torch.export.load(path)
            fixed = _static_batch(program)
            if fixed:
                raise _static_batch_error(path, fixed)
            module = program.module()
    except QTCompressError:
        raise
    except Exception as exc:  # torch raises RuntimeError/BadZipFile/KeyError on bad archives
        raise FormatError(
            f"{str(path)!r} is truncated, corrupt, or not a torch.export program "
            f"({type(exc).__name__}: {first_line(exc)})."
        ) from exc
    module.train = types.MethodType(_fixed_mode_train, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(_fixed_mode_eval, module)  # type: ignore[method-assign]
    return module
