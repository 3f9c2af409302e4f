"""Run an exported ONNX model with onnxruntime, with clear errors on wrong inputs."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qtcompress.atomic import atomic_path
from qtcompress.errors import ConfigError, FormatError

__all__ = ["InputSpec", "OnnxPredictor", "load_arrays", "predict_file", "save_arrays"]

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

    def __init__(
        self, path: str | os.PathLike[str] | bytes, *, threads: int | None = None
    ) -> None:
        """Open an ONNX model in onnxruntime.

        Args:
            path: An ONNX file, or a serialised model (``bytes``) already in memory.
            threads: Intra-op threads (``None``: onnxruntime's default).

        Raises:
            ConfigError: The file does not exist, or ``threads`` < 1.
            FormatError: The file is not a loadable ONNX model.
        """
        import onnxruntime as ort

        in_memory = isinstance(path, bytes)
        self.path = Path("<in-memory model>") if in_memory else Path(path)  # type: ignore[arg-type]
        if not in_memory and not self.path.is_file():
            raise ConfigError(f"ONNX model {str(self.path)!r} does not exist.")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"threads must be >= 1, got {threads}.")
            opts.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(
                path if in_memory else str(self.path), sess_options=opts,
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
        outputs = self._session.run(None, self._check(feeds))
        if len(outputs) == 1:
            return outputs[0]
        return dict(zip(self.output_names, outputs, strict=True))


def load_arrays(path: str | os.PathLike[str]) -> np.ndarray | dict[str, np.ndarray]:
    """Read a ``.npy`` array or a ``.npz`` archive of named arrays (pickles refused).

    Args:
        path: The file.

    Returns:
        The array (``.npy``) or a dict of arrays (``.npz``).

    Raises:
        ConfigError: The file does not exist or has another suffix.
        FormatError: The file is truncated, corrupt, or holds pickled objects.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Input file {str(p)!r} does not exist.")
    if p.suffix not in (".npy", ".npz"):
        raise ConfigError(f"Input file {str(p)!r} must be .npy or .npz.")
    try:
        # allow_pickle=False: an object array could run code when loaded.
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False)
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{str(p)!r} is truncated, corrupt, or holds pickles: {exc}") from exc


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
