"""Hugging Face model folders: build a model from one, and write one back from a generator file.

A folder holding ``config.json`` and weights (``model.safetensors``, or shards listed in
``model.safetensors.index.json``; ``pytorch_model.bin`` only when the caller trusts pickles) is
a model: :func:`load_hf_folder` builds it with ``transformers``' own classes from the folder
alone (``local_files_only``: nothing is downloaded, no custom code is run). The class comes
from the config's ``architectures``, or from ``hf_class`` / ``task``.

:func:`folder_record` keeps what a generator file needs to give the folder back (the class, the
config and tokenizer files); :func:`write_hf_folder` writes them with the regenerated weights
as ``model.safetensors``, which ``from_pretrained`` loads (``docs/format.md``, *Hugging Face
model folders*).

``transformers`` is an optional extra (``pip install -e ".[hf]"``), imported only here.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qtcompress.constants import HF_TASKS
from qtcompress.data.pooling import PooledOutput
from qtcompress.errors import (
    ConfigError,
    FormatError,
    MissingFileError,
    UnsafeFileError,
)
from qtcompress.io.state_dict import check_model_dtypes, first_line

if TYPE_CHECKING:
    pass

INSTALL_HINT = 'pip install -e ".[hf]"'
"""How to install the optional ``transformers`` dependency (from the repository root)."""

TASKS = HF_TASKS
"""``--task`` names (as in ``transformers.pipeline``) and the Auto class each builds."""

SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# Files a generator file keeps to give the folder back: configs, tokenizers, vocabularies
# (weights and their shard indexes are regenerated instead). At most one sub-folder deep
# (sentence-transformers keeps its pooling config in 1_Pooling/).
RECORDED_SUFFIXES = (".json", ".txt", ".model", ".jinja")
MAX_RECORDED_FILE_BYTES = 32 << 20
MAX_RECORDED_BYTES = 64 << 20  # safetensors caps the whole header at 100 MB
_SAFE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def is_hf_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a ``config.json`` (a Hugging Face model folder)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def import_transformers(folder: str | os.PathLike[str] | None = None) -> ModuleType:
    """``transformers``, or a one-line :class:`ConfigError` naming the extra to install."""
    try:
        import transformers
    except ImportError as exc:
        what = f"{str(folder)!r} is a Hugging Face model folder; it" if folder else "This"
        raise ConfigError(
            f"{what} needs the optional transformers package: {INSTALL_HINT} "
            "(or pip install 'transformers>=4.40')."
        ) from exc
    return transformers


@contextlib.contextmanager
def quiet_transformers(transformers: ModuleType) -> Iterator[None]:
    """Context: transformers' info logs and progress bars off (the CLI prints its own lines)."""
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _folder(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"Model folder {str(p)!r} does not exist.")
    if not is_hf_folder(p):
        raise ConfigError(
            f"{str(p)!r} is a folder without config.json; a model folder is a Hugging Face "
            "folder (config.json + model.safetensors), a checkpoint is a file."
        )
    return p


def _weights(folder: Path, trust_pickle: bool) -> tuple[bool, str]:
    """``(use_safetensors, what)`` for the folder's weights."""
    if (folder / "model.safetensors").is_file():
        return True, "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FormatError(
                f"{str(index)!r} is not a safetensors shard index ({first_line(exc)})."
            ) from exc
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise MissingFileError(
                f"{str(folder)!r}: the shard index lists {len(missing)} missing shards, "
                f"e.g. {missing[0]!r}."
            )
        return True, f"{len(shards)} model.safetensors shards"
    pickled = [name for name in PICKLE_WEIGHTS if (folder / name).is_file()]
    if pickled:
        if not trust_pickle:
            raise UnsafeFileError(
                f"{str(folder)!r} holds its weights only as {pickled[0]} (a pickle): convert "
                "them to model.safetensors, or use --trust-pickle (trust_pickle=True) only if "
                "you trust its source."
            )
        return False, pickled[0]
    raise MissingFileError(
        f"{str(folder)!r} has config.json but no weights: expected model.safetensors (or "
        "model.safetensors.index.json and its shards; pytorch_model.bin with --trust-pickle)."
    )


def _model_class(
    transformers: ModuleType, config: Any, hf_class: str | None, task: str | None
) -> tuple[Any, str]:
    """The class to build (a model class or an Auto class) and why it was chosen."""
    if hf_class and task:
        raise ConfigError("Give --hf-class or --task, not both.")
    if task:
        if task not in TASKS:
            raise ConfigError(f"Unknown --task {task!r}; choose one of {sorted(TASKS)}.")
        return getattr(transformers, TASKS[task]), f"--task {task}"
    if hf_class:
        name, why = hf_class, "--hf-class"
    elif getattr(config, "architectures", None):
        name, why = config.architectures[0], "config.json architectures"
    else:
        return transformers.AutoModel, "no architectures in config.json: the base model"
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    # Only transformers' own classes: a folder's custom code (auto_map) is never run.
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise ConfigError(
            f"{why} names {name!r}, which is not a model class of transformers "
            f"{transformers.__version__} (custom code is never run); pass --hf-class with one "
            f"that is, or --task ({', '.join(sorted(TASKS))})."
        )
    return cls, why


def load_hf_folder(
    path: str | os.PathLike[str],
    hf_class: str | None = None,
    task: str | None = None,
    trust_pickle: bool = False,
) -> tuple[nn.Module, str]:
    """Build a model from a Hugging Face model folder alone (nothing downloaded).

    Args:
        path: The folder: ``config.json`` and ``model.safetensors`` (or shards with
            ``model.safetensors.index.json``; ``pytorch_model.bin`` with ``trust_pickle``).
        hf_class: A transformers model class name (``"BertForMaskedLM"``); default: the
            config's ``architectures``, else ``AutoModel``.
        task: Instead of ``hf_class``: a task of :data:`TASKS` (``"text-classification"``).
        trust_pickle: Allow ``pytorch_model.bin`` weights (a pickle).

    Returns:
        The float32 model in eval mode (the generation cache off: only the main outputs are
        returned), and one line saying which class it built, why, and from which weights.

    Raises:
        ConfigError: transformers is not installed, an unknown class or task, both given, or
            a class whose parameters the weights do not hold (they would be random).
        MissingFileError: The folder, its weights or a shard is missing.
        UnsafeFileError: The weights are a pickle and ``trust_pickle`` is False.
        FormatError: transformers cannot read the config or the weights.
    """
    folder = _folder(path)
    transformers = import_transformers(folder)
    use_safetensors, weights = _weights(folder, trust_pickle)
    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    with quiet_transformers(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FormatError(
                f"{str(folder / 'config.json')!r}: transformers cannot read it ({first_line(exc)})."
            ) from exc
        cls, why = _model_class(transformers, config, hf_class, task)
        try:
            model, info = cls.from_pretrained(
                str(folder),
                local_files_only=True,
                use_safetensors=use_safetensors,
                output_loading_info=True,
                **{dtype_key: torch.float32},
            )
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise FormatError(
                f"{str(folder)!r}: transformers could not build {cls.__name__} from it "
                f"({first_line(exc)})."
            ) from exc
    name = type(model).__name__
    missing = sorted(info.get("missing_keys") or ()) + sorted(
        str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ()
    )
    if missing:
        archs = getattr(config, "architectures", None) or ["none"]
        raise ConfigError(
            f"{str(folder)!r}: its weights do not hold {len(missing)} parameters of {name} "
            f"(e.g. {missing[0]!r}), which would be random; pick the class the folder was "
            f"saved from (config.json architectures: {', '.join(archs)}) with --hf-class or "
            "--task."
        )
    notes = [why, f"{sum(p.numel() for p in model.parameters()):,} parameters"]
    unused = len(info.get("unexpected_keys") or ())
    if unused:
        notes.append(f"{unused} tensors of the weights unused by {name}")
    if getattr(model.config, "use_cache", False):
        # Distillation and ONNX take the main output; a cache would be one more output.
        model.config.use_cache = False
        notes.append("use_cache off")
    check_model_dtypes(model, source=repr(str(folder)))
    return model.eval(), f"{name} from {folder.name}/{weights} ({'; '.join(notes)})"


def main_output_kind(output: Any) -> str | None:
    """The output kind of a folder model's main output, where its values cannot tell it.

    ``last_hidden_state`` (a base model's main output when it has no ``logits``) is hidden
    states, compared by cosine as an ``"embedding"``: a top-1 over hidden features means
    nothing. ``None`` lets the kind be inferred (``logits``).
    """
    if isinstance(output, Mapping) and "logits" not in output and "last_hidden_state" in output:
        return "embedding"
    return None


def load_hf_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The folder's own tokenizer (``AutoTokenizer``, local files only).

    Raises:
        ConfigError: transformers is not installed, or the folder has no tokenizer.
    """
    folder = _folder(path)
    transformers = import_transformers(folder)
    with quiet_transformers(transformers):
        try:
            return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"{str(folder)!r} has no tokenizer transformers can load ({first_line(exc)}); "
                "text data is tokenized with the folder's own tokenizer (tokenizer.json, "
                "vocab.txt, ...): add it, or tokenize into an .npz."
            ) from exc


def weights_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the folder's weight files (safetensors and their shards, or the pickles)."""
    folder = Path(path)
    names = {*SAFETENSORS_WEIGHTS, *PICKLE_WEIGHTS}
    return sum(
        p.stat().st_size
        for p in folder.iterdir()
        if p.is_file() and (p.name in names or re.fullmatch(r"model-.*\.safetensors", p.name))
    )


# -- recording the folder, and writing it back ---------------------------------------------------
def _recorded_paths(folder: Path) -> Iterator[Path]:
    for p in sorted(folder.glob("*")) + sorted(folder.glob("*/*")):
        rel = p.relative_to(folder)
        if (
            p.is_file()
            and p.suffix in RECORDED_SUFFIXES
            and not p.name.endswith(".index.json")
            and all(_SAFE_PART.fullmatch(part) for part in rel.parts)
        ):
            yield p


def folder_record(path: str | os.PathLike[str], model: nn.Module) -> dict[str, Any]:
    """What a generator file keeps to write the folder back (its ``model.hf`` metadata entry).

    Args:
        path: The model folder.
        model: The model :func:`load_hf_folder` built from it.

    Returns:
        ``{"class": name, "files": {relative path: {"encoding": "utf-8"|"zlib+base64",
        "data": str}}, "skipped": [relative paths over the size limits]}``: the config,
        tokenizer and other small files, not the weights; each as text or compressed,
        whichever is smaller. A model wrapped in
        :class:`~qtcompress.data.pooling.PooledOutput` adds ``"view": {"pooling": ...,
        "output": ...}`` and records the wrapped model's class.
    """
    view = None
    if isinstance(model, PooledOutput):
        view = {"pooling": model.pooling, "output": model.output}
        model = model.model
    folder = Path(path)
    files: dict[str, dict[str, str]] = {}
    skipped: list[str] = []
    total = 0
    for p in _recorded_paths(folder):
        rel = p.relative_to(folder).as_posix()
        size = p.stat().st_size
        if size > MAX_RECORDED_FILE_BYTES or total + size > MAX_RECORDED_BYTES:
            skipped.append(rel)
            continue
        raw = p.read_bytes()
        packed = base64.b64encode(zlib.compress(raw, 9)).decode("ascii")
        try:
            text: str | None = raw.decode("utf-8")
        except UnicodeDecodeError:  # e.g. a sentencepiece model
            text = None
        # Whichever is smaller in the JSON header: vocabularies compress about 3x.
        if text is not None and len(json.dumps(text)) <= len(packed):
            files[rel] = {"encoding": "utf-8", "data": text}
        else:
            files[rel] = {"encoding": "zlib+base64", "data": packed}
        total += size
    record: dict[str, Any] = {"class": type(model).__name__, "files": files, "skipped": skipped}
    if view is not None:
        record["view"] = view
    return record
