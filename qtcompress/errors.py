"""Typed errors raised by qtcompress.

Every error derives from :class:`QTCompressError`, so ``except QTCompressError`` catches all of
them, and each also derives from the matching builtin so that generic handlers keep working.
"""

from __future__ import annotations


class QTCompressError(Exception):
    """Root of every error that qtcompress raises on purpose."""


class ConfigError(QTCompressError, ValueError):
    """A configuration value is invalid (wrong range, unknown name, inconsistent settings)."""


class NonFiniteError(QTCompressError, ValueError):
    """A tensor that must be finite (angles, weights, losses) holds NaN or Inf."""


class ResourceLimitError(QTCompressError, MemoryError):
    """The requested work would not fit in this machine's memory."""


class SimulationError(QTCompressError, RuntimeError):
    """The quantum simulator failed or returned an unusable state."""


class FormatError(QTCompressError, ValueError):
    """A file is truncated, corrupt, of an unknown version, or does not match its metadata."""


class TargetError(QTCompressError, ValueError):
    """Parameter-name patterns matched nothing, or a model does not fit a stored layout."""


class MissingFileError(QTCompressError, FileNotFoundError):
    """An input file or folder does not exist."""

    def __str__(self) -> str:
        # OSError formats (errno, strerror) pairs; show the message as written instead.
        return str(self.args[0]) if self.args else ""


class UnsafeFileError(QTCompressError, ValueError):
    """A file can only be loaded by running arbitrary code (a pickle) and was not trusted."""


class OutputError(QTCompressError, OSError):
    """An output cannot be written: read-only folder, full disk, or a file where a folder goes."""

    def __str__(self) -> str:
        # OSError formats (errno, strerror) pairs; show the message as written instead.
        return str(self.args[0]) if self.args else ""


class FidelityError(QTCompressError, RuntimeError):
    """The compressed model is further from the original than the user allowed."""


class ExportError(QTCompressError, RuntimeError):
    """The model could not be exported to ONNX, or the exported graph fails its checks.

    Raised for the exporter's and onnxruntime's failures and for parity checks between the
    graph and PyTorch; a file that is corrupt on disk is a :class:`FormatError` instead.
    """
