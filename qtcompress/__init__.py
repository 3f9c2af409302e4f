"""qtcompress: Quantum-Train compression of PyTorch models.

Example:
    >>> from qtcompress import QTConfig, compress, load  # doctest: +SKIP
    >>> qt = compress(model, QTConfig(budget=0.005))      # doctest: +SKIP
    >>> qt.save("model.qtc.safetensors", example_inputs=x)  # doctest: +SKIP
    >>> load("model.qtc.safetensors").export_onnx("model.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# The public verbs (one save/load surface: QTModel.save and load), imported on first use so
# that `import qtcompress` (and the CLI's start-up) does not pull in torch, Cirq and qsim until
# they are needed.
_LAZY = {
    "compress": "qtcompress.api",
    "QTModel": "qtcompress.api",
    "QTConfig": "qtcompress.config",
    "HashedConfig": "qtcompress.config",
    "RowsConfig": "qtcompress.config",
    "FlatConfig": "qtcompress.config",
    "load": "qtcompress.api",
    "QTCompressError": "qtcompress.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qtcompress' has no attribute {name!r}")
