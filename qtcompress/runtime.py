"""Run an exported ONNX model with onnxruntime, with clear errors on wrong inputs.

Also the input side of the command line: reading ``.npy``/``.npz`` arrays without trusting their
headers (:func:`load_arrays`) and checking a data set before any work starts
(:func:`check_dataset`, :func:`check_label_range`).
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from qtcompress.atomic import atomic_path
from qtcompress.errors import ConfigError, FormatError, MissingFileError, NonFiniteError
from qtcompress.limits import check_memory

__all__ = [
    "InputSpec",
    "OnnxPredictor",
    "check_dataset",
    "check_label_range",
    "load_arrays",
    "predict_file",
    "save_arrays",
]

# onnxruntime type strings for the tensor element types a qtcompress model can have.
_ORT_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class InputSpec:
    """One graph input.

    Attributes:
        name: Input name.
        shape: Dimensions; a string (e.g. ``"batch"``) or ``None`` marks a free axis.
        dtype: Expected numpy dtype, or ``None`` for a type numpy cannot represent.
    """

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype[Any] | None

    def describe(self) -> str:
        """Human-readable ``name: dtype[dims]`` for error messages."""
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


class OnnxPredictor:
    """An onnxruntime CPU session with input checking.

    Example:
        >>> predictor = OnnxPredictor("model.onnx")  # doctest: +SKIP
        >>> logits = predictor.run(x)  # one input, one output -> np.ndarray  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str] | bytes, *, threads: int | None = None) -> None:
        """Open an ONNX model in onnxruntime.

        Args:
            path: An ONNX file, or a serialised model (``bytes``) already in memory.
            threads: Intra-op threads (``None``: onnxruntime's default).

        Raises:
            MissingFileError: The file does not exist.
            ConfigError: ``threads`` < 1.
            FormatError: The file is not a loadable ONNX model.
        """
        import onnxruntime as ort

        in_memory = isinstance(path, bytes)
        self.path = Path("<in-memory model>") if in_memory else Path(path)  # type: ignore[arg-type]
        if not in_memory and not self.path.is_file():
            raise MissingFileError(f"ONNX model {str(self.path)!r} does not exist.")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"threads must be >= 1, got {threads}.")
            opts.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(
                path if in_memory else str(self.path),
                sess_options=opts,
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise FormatError(
                f"{str(self.path)!r} is not a loadable ONNX model: {str(exc)[:500]}"
            ) from exc
        self.inputs = tuple(
            InputSpec(i.name, tuple(i.shape), _ORT_DTYPES.get(i.type))
            for i in self._session.get_inputs()
        )
        self.output_names = tuple(o.name for o in self._session.get_outputs())

    @property
    def input_names(self) -> tuple[str, ...]:
        """Graph input names in order."""
        return tuple(s.name for s in self.inputs)

    def _expected(self) -> str:
        return "; ".join(s.describe() for s in self.inputs)

    def _check(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        unknown = sorted(set(feeds) - set(self.input_names))
        if missing or unknown:
            raise ConfigError(
                f"Inputs {sorted(feeds)} do not match the model: missing {missing}, unknown "
                f"{unknown}. Expected: {self._expected()}."
            )
        out: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            value = feeds[spec.name]
            if not isinstance(value, np.ndarray):
                raise ConfigError(
                    f"Input {spec.name!r} must be a numpy array, got {type(value).__name__}."
                )
            if spec.dtype is not None and value.dtype != spec.dtype:
                raise ConfigError(
                    f"Input {spec.name!r} has dtype {value.dtype}; expected {spec.dtype} "
                    f"({spec.describe()}). Convert it, e.g. x.astype(np.{spec.dtype})."
                )
            fixed_ok = all(
                not isinstance(want, int) or want == got
                for want, got in zip(spec.shape, value.shape, strict=False)
            )
            if value.ndim != len(spec.shape) or not fixed_ok:
                raise ConfigError(
                    f"Input {spec.name!r} has shape {value.shape}; expected {spec.describe()} "
                    "('?' or a name is a free axis)."
                )
            out[spec.name] = value
        return out

    def run(self, inputs: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray | dict[str, Any]:
        """Run the model.

        Args:
            inputs: One array for a single-input model, or a mapping of input names to arrays.

        Returns:
            The output array for a single-output model, else a dict of output names to arrays.

        Raises:
            ConfigError: Wrong input names, dtypes or shapes; the message lists the expected
                inputs.
        """
        if isinstance(inputs, np.ndarray):
            if len(self.inputs) != 1:
                raise ConfigError(
                    f"The model has {len(self.inputs)} inputs; pass a dict. Expected: "
                    f"{self._expected()}."
                )
            feeds: Mapping[str, Any] = {self.inputs[0].name: inputs}
        elif isinstance(inputs, Mapping):
            feeds = inputs
        else:
            raise ConfigError(
                f"Inputs must be a numpy array or a dict of arrays, got {type(inputs).__name__}."
            )
        checked = self._check(feeds)
        try:
            outputs = self._session.run(None, checked)
        except Exception as exc:  # onnxruntime raises its own InvalidArgument/Fail types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ConfigError(
                f"onnxruntime rejected the inputs ({first}); expected: {self._expected()}."
            ) from exc
        if len(outputs) == 1:
            return outputs[0]
        return dict(zip(self.output_names, outputs, strict=True))


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


def predict_file(
    model_path: str | os.PathLike[str],
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    threads: int | None = None,
) -> Path:
    """Run an ONNX model on arrays from a file and write its outputs to a file.

    A ``.npy`` input feeds a single-input model; a ``.npz`` input holds one array per input
    name. Outputs go to ``.npy`` (single-output models) or ``.npz`` (keyed by output name).

    Args:
        model_path: The ONNX file.
        input_path: ``.npy`` or ``.npz`` inputs.
        output_path: ``.npy`` or ``.npz`` destination, written atomically.
        threads: onnxruntime intra-op threads.

    Returns:
        The output path.

    Raises:
        ConfigError: Missing files/folders, wrong suffixes, or inputs that do not match the
            model (the message lists the expected inputs).
        FormatError: A file is corrupt.
    """
    if Path(output_path).suffix not in (".npy", ".npz"):
        raise ConfigError(f"Output file {str(output_path)!r} must be .npy or .npz.")
    predictor = OnnxPredictor(model_path, threads=threads)
    outputs = predictor.run(load_arrays(input_path))
    if not isinstance(outputs, dict):
        outputs = {predictor.output_names[0]: outputs}
    return save_arrays(output_path, outputs)
