"""Array files in and out, and data sets checked before any work starts.

:func:`load_arrays` reads headers first and checks sizes before allocating; :func:`save_arrays`
writes atomically; :func:`check_dataset` and :func:`check_label_range` reject data that would
fail or mislead a compression (NaN/Inf, wrong shapes, labels out of range).
"""

from __future__ import annotations

import dataclasses
import math
import os
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from qtcompress.examples import Split

from qtcompress.errors import ConfigError, FormatError, MissingFileError, NonFiniteError
from qtcompress.io.atomic import atomic_path
from qtcompress.memory import check_memory


def _npy_header(fh: IO[bytes], where: str) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """``(shape, dtype, nbytes)`` from an ``.npy`` header, read without allocating the data."""
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f".npy format version {version} is not supported")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise FormatError(f"{where} has a corrupt .npy header ({exc}); check the file.") from exc
    if dtype.hasobject:
        raise FormatError(
            f"{where} holds Python objects (pickles), which are never loaded; save "
            "plain numeric arrays."
        )
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise FormatError(f"{where} has an invalid shape {shape}; check the file.")
    # Python integers: a hostile shape cannot overflow into a small number.
    return tuple(shape), dtype, math.prod(shape) * dtype.itemsize


def _check_array_headers(p: Path) -> int:
    """Check every array header of ``p`` against the data the file holds; return the bytes.

    A header is a claim: ``np.load`` allocates what it says before reading, so a 1 KB file
    claiming a 3.6 TiB array would be a memory bomb. The data of an ``.npy`` must be in the file;
    each member of an ``.npz`` must be that big once decompressed (the zip directory's size,
    which :mod:`zipfile` enforces while reading).
    """
    total = 0
    if p.suffix == ".npy":
        with open(p, "rb") as fh:
            shape, _dtype, nbytes = _npy_header(fh, repr(str(p)))
            present = p.stat().st_size - fh.tell()
        if nbytes > present:
            raise FormatError(
                f"{str(p)!r}: its header claims a {list(shape)} array of "
                f"{nbytes:,} bytes but the file holds {present:,}; the file is "
                "truncated or corrupt."
            )
        return nbytes
    with zipfile.ZipFile(p) as zf:
        for info in zf.infolist():
            where = f"{str(p)!r} member {info.filename!r}"
            if not info.filename.endswith(".npy"):
                raise FormatError(f"{where} is not an .npy array; an .npz must hold only arrays.")
            with zf.open(info) as member:
                shape, _dtype, nbytes = _npy_header(member, where)
                header = member.tell()
            if nbytes + header != info.file_size:
                raise FormatError(
                    f"{where}: its header claims a {list(shape)} array of "
                    f"{nbytes:,} bytes but the member holds "
                    f"{max(info.file_size - header, 0):,}; the file is corrupt."
                )
            total += nbytes
    return total


def load_arrays(path: str | os.PathLike[str]) -> np.ndarray | dict[str, np.ndarray]:
    """Read a ``.npy`` array or a ``.npz`` archive of named arrays (pickles refused).

    Array headers are checked against the file's own size and the memory available before
    anything is allocated.

    Args:
        path: The file.

    Returns:
        The array (``.npy``) or a dict of arrays (``.npz``).

    Raises:
        MissingFileError: The file does not exist.
        ConfigError: The file has another suffix.
        FormatError: The file is truncated, corrupt, holds pickled objects, or its headers
            claim more data than it holds.
        ResourceLimitError: The arrays would not fit in the memory available.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"Input file {str(p)!r} does not exist.")
    if p.suffix not in (".npy", ".npz"):
        raise ConfigError(f"Input file {str(p)!r} must be .npy or .npz.")
    try:
        need = _check_array_headers(p)
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as exc:
        if isinstance(exc, FormatError):
            raise
        raise FormatError(f"{str(p)!r} is truncated or corrupt ({exc}); check the file.") from exc
    check_memory(need, f"reading {str(p)!r}", "use a smaller input file or free memory")
    try:
        # allow_pickle=False: an object array could run code when loaded.
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False)
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{str(p)!r} is truncated, corrupt, or holds pickles: {exc}") from exc


def _count_bad(values: np.ndarray, bad: np.ndarray) -> str:
    """``"k values, first at index i"`` for a boolean mask over ``values``."""
    first = np.unravel_index(int(np.argmax(bad)), values.shape)
    return f"{int(bad.sum())} values, first at index {tuple(int(i) for i in first)}"


def check_dataset(
    arrays: Mapping[str, Any],
    *,
    source: str = "the data",
    inputs: Sequence[str] = ("x_train", "x_test"),
    labels: Sequence[str] = ("y_train", "y_test"),
    min_test: int = 2,
) -> None:
    """Check a data set before any work starts: dtypes, finiteness, shapes and labels.

    Call it on the raw arrays, before converting them: a conversion to float32 or int64 would
    silently drop an imaginary part or truncate ``0.7`` to class ``0``.

    Args:
        arrays: Names to numpy arrays or torch tensors (absent names are skipped).
        source: How to name the data in messages (e.g. the ``.npz`` path).
        inputs: Names of the model inputs; the first is the training set, the second the test
            set.
        labels: Names of the labels aligned with ``inputs`` (class indices).
        min_test: Examples the test set needs at least (the check batch has 2).

    Raises:
        ConfigError: Complex or non-numeric inputs, empty sets, training and test inputs of
            different shapes, too few test examples, labels that are not non-negative integers
            or whose count differs from their inputs.
        NonFiniteError: An input or label holds NaN or Inf.
    """
    got = {k: np.asarray(_numpy(arrays[k])) for k in (*inputs, *labels) if k in arrays}
    for key in inputs:
        if key not in got:
            continue
        a = got[key]
        if a.dtype.kind == "c":
            raise ConfigError(
                f"{source}: {key} is complex ({a.dtype}); models take real inputs: "
                "pass the real and imaginary parts as separate features."
            )
        if a.dtype.kind not in "biuf":
            raise ConfigError(
                f"{source}: {key} has dtype {a.dtype}; expected numbers (float or integer arrays)."
            )
        if a.ndim == 0 or a.shape[0] == 0:
            raise ConfigError(
                f"{source}: {key} is empty (shape {list(a.shape)}); give at least "
                "one example along the first axis."
            )
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a)
            if bad.any():
                raise NonFiniteError(
                    f"{source}: {key} holds NaN or Inf ({_count_bad(a, bad)}); "
                    "clean or drop those examples."
                )
    if len(inputs) >= 2 and inputs[0] in got and inputs[1] in got:
        train, test = got[inputs[0]], got[inputs[1]]
        if train.shape[1:] != test.shape[1:]:
            raise ConfigError(
                f"{source}: {inputs[0]} examples have shape {list(train.shape[1:])}"
                f" but {inputs[1]} examples {list(test.shape[1:])}; they must match."
            )
    if len(inputs) >= 2 and inputs[1] in got and got[inputs[1]].shape[0] < min_test:
        raise ConfigError(
            f"{source}: {inputs[1]} has {got[inputs[1]].shape[0]} examples; at "
            f"least {min_test} are needed (the check batch)."
        )
    for x_key, y_key in zip(inputs, labels, strict=False):
        if y_key not in got:
            continue
        y = got[y_key]
        if y.dtype.kind not in "biuf":
            raise ConfigError(
                f"{source}: {y_key} has dtype {y.dtype}; labels must be integer class indices."
            )
        if y.dtype.kind == "f":
            bad = ~np.isfinite(y)
            if bad.any():
                raise NonFiniteError(f"{source}: {y_key} holds NaN or Inf ({_count_bad(y, bad)}).")
            frac = y != np.round(y)
            if frac.any():
                raise ConfigError(
                    f"{source}: {y_key} holds non-integer values "
                    f"({_count_bad(y, frac)}); labels must be class indices "
                    "0..C-1, not probabilities or scores."
                )
        if y.size and y.min() < 0:
            raise ConfigError(
                f"{source}: {y_key} holds negative labels (min {y.min()}); labels "
                "must be class indices 0..C-1."
            )
        if x_key in got and y.shape[:1] != got[x_key].shape[:1]:
            raise ConfigError(
                f"{source}: {y_key} has {y.shape[0] if y.ndim else 0} labels for "
                f"{got[x_key].shape[0]} examples in {x_key}."
            )


def check_label_range(
    labels: Any, num_classes: int, *, name: str = "labels", source: str = "the data"
) -> None:
    """Refuse class labels outside ``0..num_classes-1`` (they would score 0% without a word).

    Args:
        labels: Integer class indices (numpy array or torch tensor).
        num_classes: Classes the model outputs (its last output dimension).
        name: The labels' name, e.g. ``"y_test"``.
        source: How to name the data in messages.

    Raises:
        ConfigError: A label is negative or ``>= num_classes``.
    """
    y = np.asarray(_numpy(labels))
    if y.size == 0:
        return
    low, high = y.min(), y.max()
    if low < 0 or high >= num_classes:
        raise ConfigError(
            f"{source}: {name} range from {low} to {high}, but the model outputs "
            f"{num_classes} classes (0..{num_classes - 1}); check the labels or the "
            "model."
        )


def _numpy(value: Any) -> Any:
    """A torch tensor as a numpy array (on CPU, detached); anything else unchanged."""
    detach = getattr(value, "detach", None)
    return detach().cpu().numpy() if callable(detach) else value


def save_arrays(
    path: str | os.PathLike[str], arrays: np.ndarray | Mapping[str, np.ndarray]
) -> Path:
    """Write one array to ``.npy`` or named arrays to ``.npz``, atomically.

    Args:
        path: Destination (``.npy`` or ``.npz``).
        arrays: One array, or a mapping (a one-entry mapping may go to ``.npy``).

    Returns:
        The destination path.

    Raises:
        ConfigError: Unknown suffix, several arrays for ``.npy``, or a missing folder.
    """
    p = Path(path)
    if p.suffix not in (".npy", ".npz"):
        raise ConfigError(f"Output file {str(p)!r} must be .npy or .npz.")
    named = dict(arrays) if isinstance(arrays, Mapping) else {"output": arrays}
    if p.suffix == ".npy" and len(named) != 1:
        raise ConfigError(
            f"The model has {len(named)} outputs {sorted(named)}; write them to a .npz file, "
            f"not {str(p)!r}."
        )
    with atomic_path(p) as tmp:
        # Write through a file handle: given a name, numpy would append its own suffix.
        with open(tmp, "wb") as fh:
            if p.suffix == ".npy":
                np.save(fh, next(iter(named.values())), allow_pickle=False)
            else:
                np.savez(fh, **named)  # type: ignore[arg-type]
    return p


def load_npz_split(path: str | Path, batch_dims: Mapping[str, int] | None = None) -> Split:
    """Read a data set from an ``.npz``: inputs, and labels if any.

    Naming rule for the inputs (the same for ``x_train`` and ``x_test``):

    * ``x_train``: one tensor, passed as the model's only positional input;
    * ``x_train.0``, ``x_train.1``, ...: several positional inputs, e.g. ``model(x, state)``;
    * ``x_train.NAME``: keyword inputs, e.g. ``x_train.input_ids`` and
      ``x_train.attention_mask`` for ``model(input_ids=..., attention_mask=...)``.

    Labels (``y_train``, ``y_test``) may be absent: then only distillation is possible.
    Integer inputs (token ids) stay int64; other inputs become float32. Every array is checked
    (dtype, finiteness, shapes, labels) before conversion.

    Args:
        path: The ``.npz``.
        batch_dims: Inputs whose batch is not dimension 0, by name (``"1"`` for ``x_train.1``,
            ``"0"`` for a plain ``x_train``; names starting ``output.`` are skipped): the checks
            count examples along that dimension. The arrays keep their own layout.

    Raises:
        ConfigError: Bad names or shapes; an input whose batch is plainly not dimension 0 is
            named with the ``--batch-dim`` that fixes it.
    """
    import torch  # here: reading arrays for onnxruntime must not load torch

    from qtcompress.examples import Split

    arrays = load_arrays(path)
    if not isinstance(arrays, dict):
        raise ConfigError(f"{path}: expected an .npz with x_train and x_test arrays.")

    def names(split: str) -> list[str]:
        return sorted(k[len(split) + 1 :] for k in arrays if k.startswith(f"{split}."))

    train_names, test_names = names("x_train"), names("x_test")
    plain = [k for k in ("x_train", "x_test") if k in arrays]
    if train_names or test_names:
        if plain:
            raise ConfigError(
                f"{path}: holds both {plain} and named inputs x_train.*; use one "
                "naming rule (see load_npz_split)."
            )
        if train_names != test_names:
            raise ConfigError(
                f"{path}: x_train has inputs {train_names} but x_test has "
                f"{test_names}; give the same inputs for both."
            )
        keys = train_names
    else:
        missing = [k for k in ("x_train", "x_test") if k not in arrays]
        if missing:
            raise ConfigError(
                f"{path}: missing arrays {missing} (found {sorted(arrays)}); "
                "give x_train and x_test, or x_train.NAME and x_test.NAME."
            )
        keys = []
    labels: dict[str, Any] = {k: arrays[k] for k in ("y_train", "y_test") if k in arrays}
    dims = _input_batch_dims(path, arrays, keys, batch_dims)

    def batch_first(split: str, key: str) -> np.ndarray:
        """The array with its batch in dimension 0, for the checks (a view)."""
        array = arrays[f"{split}.{key}" if key else split]
        return np.moveaxis(array, dims[key], 0) if dims.get(key) else array

    _suggest_batch_dim(path, arrays, keys, batch_first)
    for key in keys or [""]:
        check_dataset(
            {
                "x_train": batch_first("x_train", key),
                "x_test": batch_first("x_test", key),
                **labels,
            },
            source=f"{path}{' (' + key + ')' if key else ''}",
        )

    def tensor(array: Any, labels: bool) -> torch.Tensor:
        array = np.ascontiguousarray(array)
        # Integer inputs (token ids) stay integers; everything else becomes float32.
        if labels or np.issubdtype(array.dtype, np.integer):
            return torch.from_numpy(array).to(torch.int64)
        return torch.from_numpy(array).to(torch.float32)

    def inputs(split: str) -> Any:
        if not keys:
            return tensor(arrays[split], False)
        if all(k.isdigit() for k in keys):
            return tuple(tensor(arrays[f"{split}.{k}"], False) for k in sorted(keys, key=int))
        if any(k.isdigit() for k in keys):
            raise ConfigError(
                f"{path}: inputs {keys} mix positions and names; use x_train.0, "
                "x_train.1 ... or x_train.NAME only."
            )
        return {k: tensor(arrays[f"{split}.{k}"], False) for k in keys}

    def label(key: str) -> torch.Tensor:
        return tensor(arrays[key], True) if key in arrays else torch.empty(0, dtype=torch.int64)

    split = Split(inputs("x_train"), label("y_train"), inputs("x_test"), label("y_test"))
    streams: dict[str, torch.Tensor] = {}
    for part in ("train", "test"):
        key = f"stream_{part}"
        if key not in arrays:
            continue
        ids = np.asarray(arrays[key])
        first = batch_first(f"x_{part}", keys[0] if keys else "")
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or len(ids) != len(first):
            raise ConfigError(
                f"{path}: {key} must be a 1-D integer array with one stream id per "
                f"x_{part} row ({len(first)}), got {ids.dtype} {list(ids.shape)}."
            )
        streams[key] = torch.from_numpy(np.ascontiguousarray(ids)).to(torch.int64)
    return dataclasses.replace(split, **streams) if streams else split


def _input_batch_dims(
    path: str | Path, arrays: Mapping[str, Any], keys: list[str], given: Mapping[str, int] | None
) -> dict[str, int]:
    """``--batch-dim`` by array key (``""`` for a plain ``x_train``), checked against the file."""
    dims: dict[str, int] = {}
    names = keys or ["0"]
    for name, dim in (given or {}).items():
        if name.startswith("output."):
            continue
        if name not in names:
            raise ConfigError(
                f"--batch-dim {name}={dim} names input {name!r}, but {path} holds inputs "
                f"{', '.join(names)}."
            )
        key = name if keys else ""
        for split in ("x_train", "x_test"):
            shape = arrays[f"{split}.{key}" if key else split].shape
            if dim >= len(shape):
                raise ConfigError(
                    f"--batch-dim {name}={dim}: {split}{'.' + key if key else ''} has shape "
                    f"{list(shape)}, which has no dimension {dim}."
                )
        dims[key] = dim
    return dims


def _suggest_batch_dim(
    path: str | Path, arrays: Mapping[str, Any], keys: list[str], batch_first: Any
) -> None:
    """Refuse, naming ``--batch-dim``, an input whose batch is plainly not dimension 0.

    The batch sizes ``(train, test)`` the labels, stream ids and inputs agree on are the
    reference (the most common pair; ties: the labels', else the first input's). An input
    whose dim 0 differs from it while another dimension matches it in both sets has its batch
    there. A single input whose train and test shapes differ only in one dimension past 0 gets
    the option as a possibility (it may also be a sequence length).
    """
    names = keys or [""]
    shapes = {k: (batch_first("x_train", k).shape, batch_first("x_test", k).shape) for k in names}
    pairs = []
    for part in ("y", "stream"):  # first: they are batch-first whatever the inputs are
        train, test = arrays.get(f"{part}_train"), arrays.get(f"{part}_test")
        if train is not None and test is not None and np.ndim(train) and np.ndim(test):
            pairs.append((len(train), len(test)))
    pairs += [(a[0], b[0]) for a, b in shapes.values() if len(a) and len(b)]
    if not pairs:
        return
    ref = Counter(pairs).most_common(1)[0][0]
    for key, (a, b) in shapes.items():
        name = key or "0"
        where = f"x_train{'.' + key if key else ''}"
        if len(a) != len(b) or len(a) < 2 or (a[0], b[0]) == ref:
            continue
        for dim in range(1, len(a)):
            if (a[dim], b[dim]) == ref:
                raise ConfigError(
                    f"{path}: input {name} has shape {list(a)} in {where} and {list(b)} in "
                    f"{where.replace('train', 'test')}: its dimension {dim} holds the batch "
                    f"({ref[0]} and {ref[1]} examples); pass --batch-dim {name}={dim}."
                )
    if len(names) == 1 and len(pairs) == 1:
        (a, b), name = shapes[names[0]], names[0] or "0"
        differ = [d for d in range(1, len(a)) if len(a) == len(b) and a[d] != b[d]]
        if len(differ) == 1:
            where = f"x_train{'.' + names[0] if names[0] else ''}"
            raise ConfigError(
                f"{path}: {where} has shape {list(a)} and "
                f"{where.replace('train', 'test')} {list(b)}: they differ only in dimension "
                f"{differ[0]}; if that is the batch, pass --batch-dim {name}={differ[0]}, else "
                "make the examples' shapes match."
            )
