"""Run an exported ONNX model with onnxruntime, with clear errors on wrong inputs.

:func:`open_session` is the one place that opens an onnxruntime session (CPU, quiet logs);
:class:`OnnxPredictor` checks inputs against the graph; :func:`predict_file` runs arrays from a
file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qtcompress.errors import ConfigError, FormatError, MissingFileError
from qtcompress.io.arrays import load_arrays, save_arrays

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


def open_session(model: str | bytes, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for an ONNX file path or serialised model, logs quiet.

    onnxruntime's own exceptions propagate: callers know whether a failure means a bad file
    (:class:`FormatError`) or a bad export (:class:`ExportError`).

    Args:
        model: Path of an ONNX file, or a serialised model.
        threads: Intra-op threads (``None``: onnxruntime's default).
    """
    import onnxruntime as ort  # imported here: `import qtcompress` stays light

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


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
        in_memory = isinstance(path, bytes)
        self.path = Path("<in-memory model>") if in_memory else Path(path)  # type: ignore[arg-type]
        if not in_memory and not self.path.is_file():
            raise MissingFileError(f"ONNX model {str(self.path)!r} does not exist.")
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}.")
        source = path if isinstance(path, bytes) else str(self.path)
        try:
            self._session = open_session(source, threads=threads)
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


@dataclass(frozen=True)
class Prediction:
    """What :func:`predict_file` wrote.

    Attributes:
        path: The output file.
        output_shapes: Each output's name and shape.
        elapsed_ms: Time onnxruntime took to run the model (file reading and writing excluded).
    """

    path: Path
    output_shapes: dict[str, tuple[int, ...]]
    elapsed_ms: float


def predict_file(
    model_path: str | os.PathLike[str],
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    threads: int | None = None,
) -> Prediction:
    """Run an ONNX model on arrays from a file and write its outputs to a file.

    A ``.npy`` input feeds a single-input model; a ``.npz`` input holds one array per input
    name. Outputs go to ``.npy`` (single-output models) or ``.npz`` (keyed by output name).

    Args:
        model_path: The ONNX file.
        input_path: ``.npy`` or ``.npz`` inputs.
        output_path: ``.npy`` or ``.npz`` destination, written atomically.
        threads: onnxruntime intra-op threads.

    Returns:
        The output path, the outputs' shapes and the time the model ran.

    Raises:
        ConfigError: Wrong suffixes, or inputs that do not match the model (the message lists
            the expected inputs).
        MissingFileError: A file or the output's folder does not exist.
        FormatError: A file is corrupt.
    """
    if Path(output_path).suffix not in (".npy", ".npz"):
        raise ConfigError(f"Output file {str(output_path)!r} must be .npy or .npz.")
    predictor = OnnxPredictor(model_path, threads=threads)
    inputs = load_arrays(input_path)
    start = time.perf_counter()
    outputs = predictor.run(inputs)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    if not isinstance(outputs, dict):
        outputs = {predictor.output_names[0]: outputs}
    path = save_arrays(output_path, outputs)
    shapes = {k: tuple(int(d) for d in np.shape(v)) for k, v in outputs.items()}
    return Prediction(path, shapes, elapsed_ms)
