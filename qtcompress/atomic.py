"""Atomic file writes: a reader sees either the old file or the complete new one, never a part.

Every qtcompress writer goes through :func:`atomic_path`. Data is written to a temporary file in
the destination folder (same file system, so :func:`os.replace` is an atomic rename), flushed to
disk, and only then moved over the destination. On any error the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qtcompress.errors import ConfigError

__all__ = ["atomic_path", "atomic_write_bytes", "check_output_path"]


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Validate that ``path`` can be written: its folder exists and it is not a folder.

    Args:
        path: Destination file path.

    Returns:
        The path as a :class:`~pathlib.Path`.

    Raises:
        ConfigError: The parent folder does not exist or is not a folder, or ``path`` is a
            folder.
    """
    dest = Path(path)
    parent = dest.parent
    if not parent.exists():
        raise ConfigError(
            f"Cannot write {str(dest)!r}: folder {str(parent)!r} does not exist. "
            f"Create it first (e.g. `mkdir -p {parent}`) or choose another output path."
        )
    if not parent.is_dir():
        raise ConfigError(f"Cannot write {str(dest)!r}: {str(parent)!r} is not a folder.")
    if dest.is_dir():
        raise ConfigError(f"Cannot write {str(dest)!r}: it is an existing folder, not a file.")
    return dest


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write to; move it over ``path`` when the block succeeds.

    The temporary file lives in the destination folder and keeps the destination's suffix
    (some writers look at it). If the block raises, the temporary file is deleted and the
    destination is left untouched.

    Args:
        path: Final destination.

    Yields:
        A path in the same folder that the caller must write (it already exists, empty).

    Raises:
        ConfigError: See :func:`check_output_path`.
    """
    dest = check_output_path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp" + dest.suffix,
                                    dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # fsync before the rename so that a crash cannot leave a renamed but empty file.
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates files with mode 0600; give the result the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically.

    Args:
        path: Destination file.
        data: Complete file contents.

    Returns:
        The destination path.

    Raises:
        ConfigError: See :func:`check_output_path`.
    """
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
