"""Atomic file writes: a reader sees either the old file or the complete new one, never a part.

Every qtcompress writer goes through :func:`atomic_path`. Data is written to a temporary file in
the destination folder (same file system, so :func:`os.replace` is an atomic rename), flushed to
disk, and only then moved over the destination. On any error the temporary file is removed.

A process killed while writing (``kill -9``, power loss) cannot remove its temporary file. The
writer holds an exclusive ``flock`` on it while writing, which the kernel drops when the process
dies, so the next write into that folder can tell a stale temporary file (no lock) from one that
another process is still writing, and removes the stale ones.

Write errors caused by the destination (read-only folder, full disk, quota) become an
:class:`~qtcompress.errors.OutputError`; :func:`check_writable_dir` finds them *before* a long
job starts, and :class:`OutputRecord` records in ``summary.json`` which outputs of a run exist.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from qtcompress.errors import ConfigError, MissingFileError, OutputError

try:  # POSIX; elsewhere stale temporary files are simply left alone.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "OutputRecord",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_output_path",
    "check_writable_dir",
    "remove_stale_temps",
]

# Temporary names are ".<dest name>.<8 random chars>.tmp<dest suffix>" (tempfile.mkstemp).
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>\.[^./]*)?")

# errno values that mean "this destination cannot take the file", with the fix to suggest.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_WRITE = {errno.EROFS, errno.EACCES, errno.EPERM}

# Free space kept in reserve beyond what a run expects to write (file system metadata, ...).
_DISK_MARGIN = 1 << 20


def _output_error(dest: Path, exc: OSError) -> OutputError | None:
    """The typed error for a write failure caused by the destination, else ``None``."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in _NO_ROOM:
        return OutputError(
            f"Cannot write {str(dest)!r}: {reason}; free disk space or choose "
            "another output folder."
        )
    if exc.errno in _NO_WRITE:
        return OutputError(
            f"Cannot write {str(dest)!r}: {reason}; choose a writable output "
            "folder or fix its permissions."
        )
    return None


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Validate that ``path`` can be written: its folder exists and it is not a folder.

    Args:
        path: Destination file path.

    Returns:
        The path as a :class:`~pathlib.Path`.

    Raises:
        MissingFileError: The parent folder does not exist.
        ConfigError: The parent is not a folder, or ``path`` is a folder or another
            non-regular file (a device, a pipe).
    """
    dest = Path(path)
    parent = dest.parent
    if not parent.exists():
        raise MissingFileError(
            f"Cannot write {str(dest)!r}: folder {str(parent)!r} does not exist. "
            f"Create it first (e.g. `mkdir -p {parent}`) or choose another output path."
        )
    if not parent.is_dir():
        raise ConfigError(f"Cannot write {str(dest)!r}: {str(parent)!r} is not a folder.")
    if dest.is_dir():
        raise ConfigError(f"Cannot write {str(dest)!r}: it is an existing folder, not a file.")
    if dest.exists() and not dest.is_file():
        raise ConfigError(
            f"Cannot write {str(dest)!r}: it exists and is not a regular file; "
            "choose another output path."
        )
    return dest


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary files that a killed qtcompress writer left in ``folder``.

    Only files named like this module's temporaries and not locked by a live writer are removed.

    Args:
        folder: The folder to clean.

    Returns:
        The removed paths.
    """
    if fcntl is None:  # pragma: no cover
        return []
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or Path(match["name"]).suffix != (match["suffix"] or ""):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a writer holds it
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write to; move it over ``path`` when the block succeeds.

    The temporary file lives in the destination folder and keeps the destination's suffix
    (some writers look at it). If the block raises, the temporary file is deleted and the
    destination is left untouched. Stale temporary files of killed writers in that folder are
    removed first (see :func:`remove_stale_temps`).

    Args:
        path: Final destination.

    Yields:
        A path in the same folder that the caller must write (it already exists, empty).

    Raises:
        ConfigError: See :func:`check_output_path`.
        OutputError: The folder is read-only or the disk is full.
    """
    dest = check_output_path(path)
    remove_stale_temps(dest.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{dest.name}.", suffix=".tmp" + dest.suffix, dir=dest.parent
        )
    except OSError as exc:
        raise (_output_error(dest, exc) or exc) from exc
    tmp = Path(tmp_name)
    try:
        if fcntl is not None:
            # Held until the rename: tells other writers this temporary file is alive.
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
        # fsync before the rename so that a crash cannot leave a renamed but empty file.
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates files with mode 0600; give the result the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        typed = _output_error(dest, exc)
        if typed is None:
            raise
        raise typed from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically.

    Args:
        path: Destination file.
        data: Complete file contents.

    Returns:
        The destination path.

    Raises:
        ConfigError: See :func:`check_output_path`.
        OutputError: See :func:`atomic_path`.
    """
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], value: Any) -> Path:
    """Write ``value`` as indented JSON with sorted keys (same value, same bytes), atomically.

    Raises:
        ConfigError: See :func:`check_output_path`; or ``value`` is not JSON-serialisable.
        OutputError: See :func:`atomic_path`.
    """
    try:
        text = json.dumps(value, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Cannot write {str(path)!r}: not JSON-serialisable ({exc}).") from exc
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def check_writable_dir(
    path: str | os.PathLike[str], expected_bytes: int = 0, *, create: bool = True
) -> Path:
    """Make sure a run can write its outputs into folder ``path`` before the run starts.

    Creates the folder if needed (its parent must exist), writes and removes a probe file (the
    only reliable test: permission bits say nothing about read-only mounts or root), and checks
    the free disk space.

    Args:
        path: The output folder.
        expected_bytes: Bytes the run expects to write there.
        create: Create the folder when it does not exist.

    Returns:
        The folder.

    Raises:
        MissingFileError: The parent folder does not exist (or ``path`` does not and
            ``create`` is False).
        OutputError: ``path`` is a file, the folder is not writable, or the disk has less free
            space than ``expected_bytes``.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputError(
            f"Output folder {str(folder)!r} is an existing file; choose a folder name with -o."
        )
    created = False
    if not folder.exists():
        if not create or not folder.parent.is_dir():
            raise MissingFileError(
                f"Output folder {str(folder)!r} cannot be created: its parent "
                f"{str(folder.parent)!r} does not exist; create it first."
            )
        try:
            folder.mkdir()
            created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise (
                _output_error(folder, exc)
                or OutputError(
                    f"Cannot create output folder {str(folder)!r}: {exc.strerror}; choose another "
                    "folder."
                )
            ) from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".qtcompress-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise (
            _output_error(folder, exc)
            or OutputError(
                f"Cannot write into {str(folder)!r}: {exc.strerror}; choose another output folder."
            )
        ) from exc
    free = shutil.disk_usage(folder).free
    if expected_bytes + _DISK_MARGIN > free:
        raise OutputError(
            f"Output folder {str(folder)!r} has {free / 2**20:,.1f} MiB free, the run needs "
            f"about {(expected_bytes + _DISK_MARGIN) / 2**20:,.1f} MiB; free disk space or "
            "choose another output folder."
        )
    return folder


class OutputRecord:
    """All-or-nothing bookkeeping for a run that writes several files into one folder.

    On entry ``summary.json`` says ``"status": "incomplete"`` and lists the expected files (so
    even a killed run leaves a true record); :meth:`wrote` marks each file once written;
    :meth:`complete` writes the final summary with ``"status": "complete"``. If the block fails
    first, ``summary.json`` becomes ``"status": "partial"`` with the files ``written``, the
    files ``missing`` and the ``error``; the error itself propagates.

    Example:
        >>> with OutputRecord(out, {"generator": gen_path, "onnx": onnx_path}) as record:
        ...     save_generator(qt, gen_path); record.wrote("generator")  # doctest: +SKIP
        ...     export_onnx(model, x, onnx_path); record.wrote("onnx")   # doctest: +SKIP
        ...     record.complete(summary_payload)                         # doctest: +SKIP

    Args:
        folder: The output folder.
        expected: Output role (e.g. ``"onnx"``) to file path.
        summary: File name of the record inside ``folder``.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        expected: Mapping[str, Any],
        *,
        summary: str = "summary.json",
    ) -> None:
        self.folder = Path(folder)
        self.summary = self.folder / summary
        self.expected = {role: str(p) for role, p in expected.items()}
        self.written: dict[str, str] = {}
        self.completed = False

    def _record(self, status: str, **extra: Any) -> None:
        missing = {r: p for r, p in self.expected.items() if r not in self.written}
        atomic_write_json(
            self.summary, {"status": status, "written": self.written, "missing": missing, **extra}
        )

    def __enter__(self) -> OutputRecord:
        self._record("incomplete")
        return self

    def wrote(self, role: str) -> None:
        """Mark the output ``role`` as written (call right after its atomic write)."""
        if role not in self.expected:
            raise ConfigError(f"Unknown output {role!r}; expected one of {sorted(self.expected)}.")
        self.written[role] = self.expected[role]
        self._record("incomplete")

    def complete(self, payload: Mapping[str, Any]) -> Path:
        """Write the final ``summary.json``: ``payload`` plus ``"status": "complete"``."""
        atomic_write_json(self.summary, {**payload, "status": "complete"})
        self.completed = True
        return self.summary

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not self.completed:
            # Best effort: the original error matters more than a failure to record it.
            with contextlib.suppress(Exception):
                self._record("partial", error=f"{type(exc).__name__}: {exc}")
