"""Tables as data: ``.csv`` / ``.parquet`` columns as float features for any model.

Every column but the label column (``--label-column``, optional: class indices) is a float
feature, in the table's order; the result is one ``(rows, features)`` float32 input, as an
``.npz`` with ``x_train`` gives. A ``.csv`` is read row by row (a header row first) and a cell
that is not a number is refused with its line and column; a ``.parquet`` file is read with
pyarrow (``pip install pyarrow``), its columns checked the same way. A seeded share is held out
to test unless a second table is given (:func:`qtcompress.data.text.held_out`).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import torch

from qtcompress.constants import TEXT_SPLIT_SEED
from qtcompress.data.text import held_out
from qtcompress.errors import ConfigError, FormatError, MissingFileError
from qtcompress.examples import Split

TABLE_SUFFIXES = (".csv", ".parquet")


def is_table(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a table (by its suffix)."""
    return Path(path).suffix.lower() in TABLE_SUFFIXES


def _number(cell: str, where: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise ConfigError(
            f"{where}: {cell!r} is not a number; a table's columns are float features (give "
            "the class column with --label-column)."
        ) from None
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {cell!r} is not finite; clean the table first.")
    return value


def _label(cell: object, where: str) -> int:
    try:
        value = float(str(cell))
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        raise ConfigError(f"{where}: label {cell!r} is not a class index (0, 1, 2, ...).")
    return int(value)


# Rows gathered per float32 block while a .csv is read: the table is held once as float32 (and
# briefly twice while the blocks are joined), never as Python floats (8x the memory).
_BLOCK_ROWS = 1 << 14


class _Rows:
    """A growing ``(rows, width)`` array of ``dtype``, filled row by row in fixed blocks."""

    def __init__(self, width: int, dtype: type) -> None:
        self.width, self.dtype = width, dtype
        self.blocks: list[np.ndarray] = []
        self.block: np.ndarray = np.empty((_BLOCK_ROWS, width), dtype)
        self.used = 0

    def add(self, row: list[float] | list[int]) -> None:
        if self.used == _BLOCK_ROWS:
            self.blocks.append(self.block)
            self.block = np.empty((_BLOCK_ROWS, self.width), self.dtype)
            self.used = 0
        self.block[self.used] = row
        self.used += 1

    def array(self) -> np.ndarray:
        return np.concatenate([*self.blocks, self.block[: self.used]])


def _read_csv(
    path: Path, label_column: str | None, progress: bool
) -> tuple[list[str], np.ndarray, np.ndarray]:
    from tqdm.auto import tqdm

    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise ConfigError(f"{path.name}: empty; a table needs a header row and rows.")
            if label_column is not None and label_column not in header:
                raise ConfigError(
                    f"{path.name}: no column {label_column!r} (columns: {', '.join(header)})."
                )
            li = header.index(label_column) if label_column is not None else -1
            features = _Rows(len(header) - (li >= 0), np.float32)
            labels = _Rows(1, np.int64)
            bar = tqdm(desc=f"reading {path.name}", unit=" rows", disable=not progress, leave=False)
            with bar:
                for row in reader:
                    line = reader.line_num
                    if not row:
                        continue
                    if len(row) != len(header):
                        raise ConfigError(
                            f"{path.name} line {line}: {len(row)} cells, the header has "
                            f"{len(header)}."
                        )
                    features.add(
                        [
                            _number(c, f"{path.name} line {line}, column {header[i]!r}")
                            for i, c in enumerate(row)
                            if i != li
                        ]
                    )
                    if li >= 0:
                        labels.add([_label(row[li], f"{path.name} line {line}")])
                    bar.update()
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path.name} is not UTF-8 text ({exc.reason}).") from exc
    names = [h for h in header if h != label_column]
    return names, features.array(), labels.array().reshape(-1)


def _read_parquet(path: Path, label_column: str | None) -> tuple[list[str], np.ndarray, np.ndarray]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            f"{path.name}: reading .parquet needs pyarrow: pip install pyarrow."
        ) from None
    try:
        table = pq.read_table(str(path))
    except Exception as exc:  # pyarrow raises its own ArrowInvalid and OSError types
        raise FormatError(f"{path.name}: pyarrow cannot read it ({exc}).") from exc
    header = list(table.column_names)
    if label_column is not None and label_column not in header:
        raise ConfigError(
            f"{path.name}: no column {label_column!r} (columns: {', '.join(header)})."
        )
    names = [h for h in header if h != label_column]
    x = np.empty((table.num_rows, len(names)), np.float32)
    for j, name in enumerate(names):
        column = table.column(name)
        where = f"{path.name} column {name!r}"
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            values = column.to_numpy(zero_copy_only=False).astype(np.float64)
            bad = np.flatnonzero(~np.isfinite(values))  # NaN, Inf, or a null read as NaN
        else:  # text or other cells: read one by one, so the first bad one is named
            values = np.array([_number_or_nan(v) for v in column.to_pylist()], np.float64)
            bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            i = int(bad[0])
            _number(str(column[i].as_py()), f"{path.name} row {i + 1}, column {name!r}")
            raise ConfigError(f"{where}: row {i + 1} is not a finite number.")
        x[:, j] = values
    labels = (
        np.asarray(
            [
                _label(v, f"{path.name} row {i + 1}")
                for i, v in enumerate(table.column(label_column).to_pylist())
            ],
            dtype=np.int64,
        )
        if label_column is not None
        else np.zeros(0, np.int64)
    )
    return names, x, labels


def _number_or_nan(value: object) -> float:
    try:
        return float(str(value))
    except ValueError:
        return math.nan


def read_table(
    path: str | os.PathLike[str], label_column: str | None = None, progress: bool = False
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A table's feature names, ``(rows, features)`` float32 features and int64 labels.

    A ``.csv`` is read row by row into float32 blocks (``progress``: a bar counting rows); a
    ``.parquet`` file column by column.

    Raises:
        MissingFileError: The file does not exist.
        ConfigError: No rows, no feature column, a cell that is not a finite number (named by
            line and column), a label that is not a class index, a missing label column.
        FormatError: The file cannot be read as its suffix says.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{str(p)!r} does not exist.")
    if p.suffix.lower() == ".parquet":
        names, x, y = _read_parquet(p, label_column)
    else:
        names, x, y = _read_csv(p, label_column, progress)
    if not names:
        raise ConfigError(f"{p.name}: no feature column besides the label.")
    if len(x) < 2:
        raise ConfigError(f"{p.name}: {len(x)} rows; a table needs at least 2.")
    return names, x, y


def load_table_split(
    path: str | os.PathLike[str],
    *,
    label_column: str | None = None,
    test_path: str | os.PathLike[str] | None = None,
    test_fraction: float = 0.1,
    seed: int = TEXT_SPLIT_SEED,
    progress: bool = False,
) -> tuple[Split, str]:
    """A train/test split of a table, and one line saying what was read.

    Args:
        path: The training table (``.csv`` or ``.parquet``).
        label_column: The class column, if any.
        test_path: A held-out table with the same columns; default: a seeded share of ``path``.
        test_fraction: The share held out without ``test_path``.
        seed: Seeds that share.
        progress: Show a bar while a ``.csv`` is read.

    Raises:
        ConfigError: As :func:`read_table`, or a test table whose columns differ.
    """
    names, x, y = read_table(path, label_column, progress)
    if test_path is not None:
        test_names, x_test, y_test = read_table(test_path, label_column, progress)
        if test_names != names:
            raise ConfigError(
                f"{Path(test_path).name} has columns {test_names}, {Path(path).name} has {names}; "
                "the tables must have the same columns."
            )
        x_train, y_train = x, y
        held = f"{Path(test_path).name} to test"
    else:
        train, test = held_out(len(x), test_fraction, seed)
        x_train, x_test = x[train], x[test]
        y_train, y_test = (y[train], y[test]) if len(y) else (y, y)
        held = f"{test_fraction:.0%} held out to test, seed {seed}"
    split = Split(
        torch.from_numpy(x_train),
        torch.from_numpy(y_train),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test),
    )
    line = (
        f"{Path(path).name}: {len(x_train)} train / {len(x_test)} test rows of {len(names)} "
        f"float features ({held})" + (f"; labels from {label_column!r}" if label_column else "")
    )
    return split, line
