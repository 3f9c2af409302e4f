"""Text data as people have it: a ``.txt`` (one example a line), ``.jsonl`` or ``.csv`` file.

:func:`load_text_split` reads the file row by row, tokenizes it in chunks with the model
folder's own tokenizer (truncation at ``max_length``, padding on the right), holds out a seeded
fraction as the test set unless a test file is given, and returns the same
:class:`~qtcompress.examples.Split` of keyword inputs that an ``.npz`` with
``x_train.input_ids`` / ``x_train.attention_mask`` gives
(:func:`qtcompress.io.arrays.load_npz_split`), so the rest of the pipeline is unchanged. A bad
row (an empty line, a missing column, a label that is no class) is refused with its line
number.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qtcompress.constants import TEXT_COLUMN, TEXT_MAX_LENGTH, TEXT_SPLIT_SEED, TEXT_TEST_FRACTION
from qtcompress.errors import ConfigError, FormatError, MissingFileError
from qtcompress.examples import Split

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv")
"""Suffixes read as text data (defaults: ``TEXT_*`` in :mod:`qtcompress.constants`)."""

_CHUNK_ROWS = 1024  # rows tokenized at once: the file is never held as text in full


def is_text_data(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a text data file (by its suffix)."""
    return Path(path).suffix.lower() in TEXT_SUFFIXES


def _int_label(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


def read_rows(
    path: str | os.PathLike[str],
    *,
    text_column: str | None = None,
    label_column: str | None = None,
) -> Iterator[tuple[int, str, Any]]:
    """Stream a text data file's examples as ``(line number, text, label or None)``.

    Args:
        path: ``.txt`` (one example a line), ``.jsonl`` (one JSON object a line) or ``.csv``
            (a header row, then one example a row).
        text_column: The text's key or column (``.jsonl``/``.csv``; default ``"text"``).
        label_column: The label's key or column (``.jsonl``/``.csv``), if any.

    Yields:
        One example at a time, with the line it is on (1-based).

    Raises:
        MissingFileError: The file does not exist.
        ConfigError: An empty line or text, a missing key or column, a ``.txt`` with columns.
        FormatError: A line that is not JSON or not an object, or text that is not UTF-8.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"Data file {str(p)!r} does not exist.")
    suffix = p.suffix.lower()
    name = p.name
    if suffix == ".txt" and (text_column or label_column):
        raise ConfigError(
            f"{name}: a .txt file is one example a line, without columns; use .jsonl or .csv "
            "for --text-column / --label-column."
        )
    column = text_column or TEXT_COLUMN
    line = 0
    try:
        with open(p, encoding="utf-8", newline="" if suffix == ".csv" else None) as fh:
            if suffix == ".csv":
                reader = csv.DictReader(fh)
                columns = reader.fieldnames or []
                for key in (column, label_column):
                    if key is not None and key not in columns:
                        raise ConfigError(
                            f"{name} line 1: no column {key!r} in the header {columns}; name "
                            "the text with --text-column (and labels with --label-column)."
                        )
                for row in reader:
                    line = reader.line_num
                    text = row.get(column)
                    if not text or not text.strip():
                        raise ConfigError(f"{name} line {line}: no text in column {column!r}.")
                    label = row.get(label_column) if label_column else None
                    if label_column and (label is None or not label.strip()):
                        raise ConfigError(
                            f"{name} line {line}: no label in column {label_column!r}."
                        )
                    yield line, text, label
                return
            for line, raw in enumerate(fh, 1):
                text = raw.rstrip("\r\n")
                if not text.strip():
                    raise ConfigError(
                        f"{name} line {line} is empty; give one example a line (remove it)."
                    )
                if suffix == ".txt":
                    yield line, text, None
                    continue
                try:
                    obj = json.loads(text)
                except ValueError as exc:
                    raise FormatError(f"{name} line {line} is not JSON ({exc}).") from exc
                if not isinstance(obj, Mapping):
                    raise FormatError(f"{name} line {line} is not a JSON object.")
                value = obj.get(column)
                if not isinstance(value, str) or not value.strip():
                    raise ConfigError(
                        f"{name} line {line}: no text under {column!r} (keys: {sorted(obj)}); "
                        "name it with --text-column."
                    )
                if label_column and obj.get(label_column) is None:
                    raise ConfigError(f"{name} line {line}: no label under {label_column!r}.")
                yield line, value, obj.get(label_column) if label_column else None
    except UnicodeDecodeError as exc:
        raise FormatError(f"{name} after line {line} is not UTF-8 text ({exc.reason}).") from exc


@dataclass
class _Encoded:
    """One file's examples, tokenized chunk by chunk (each chunk padded to its longest)."""

    chunks: dict[str, list[np.ndarray]]
    lengths: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    at_limit: int = 0

    @property
    def n(self) -> int:
        return sum(len(x) for x in self.lengths)

    @property
    def longest(self) -> int:
        return max((int(x.max()) for x in self.lengths if len(x)), default=0)


def _label_id(value: Any, where: str, label2id: Mapping[str, int] | None) -> int:
    label = _int_label(value)
    if label is None and label2id and isinstance(value, str) and value in label2id:
        label = int(label2id[value])
    if label is None or label < 0:
        named = f" nor one of the model's labels {sorted(label2id)[:8]}" if label2id else ""
        raise ConfigError(f"{where}: label {value!r} is not a class index 0..C-1{named}.")
    return label


def _encode(
    path: Path,
    tokenizer: Any,
    inputs: Sequence[str],
    max_length: int,
    text_column: str | None,
    label_column: str | None,
    label2id: Mapping[str, int] | None,
    progress: bool,
) -> _Encoded:
    from tqdm.auto import tqdm

    enc = _Encoded({k: [] for k in inputs})
    texts: list[str] = []

    def flush() -> None:
        out = tokenizer(
            texts,
            truncation=True,
            max_length=max_length,
            padding="longest",
            return_attention_mask=True,
            return_tensors="np",
        )
        for key in inputs:
            enc.chunks[key].append(np.asarray(out[key], dtype=np.int64))
        lengths = np.asarray(out["attention_mask"]).sum(axis=1)
        enc.lengths.append(lengths)
        enc.at_limit += int((lengths >= max_length).sum())
        texts.clear()

    bar = tqdm(desc=f"tokenizing {path.name}", unit=" rows", disable=not progress, leave=False)
    with bar:
        for line, text, label in read_rows(
            path, text_column=text_column, label_column=label_column
        ):
            texts.append(text)
            if label_column:
                enc.labels.append(_label_id(label, f"{path.name} line {line}", label2id))
            if len(texts) == _CHUNK_ROWS:
                flush()
                bar.update(_CHUNK_ROWS)
        if texts:
            bar.update(len(texts))
            flush()
    if enc.n == 0:
        raise ConfigError(f"{path.name} holds no examples.")
    return enc


def _padded(enc: _Encoded, length: int, pad_values: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Every input as one ``(N, length)`` array, right-padded (chunks freed as they are copied)."""
    out = {}
    for key, chunks in enc.chunks.items():
        full = np.full((enc.n, length), pad_values.get(key, 0), dtype=np.int64)
        row = 0
        while chunks:
            chunk = chunks.pop(0)
            full[row : row + len(chunk), : chunk.shape[1]] = chunk[:, :length]
            row += len(chunk)
        out[key] = full
    return out


def held_out(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` row indices: a seeded ``fraction`` of ``n`` rows held out to test.

    At least 2 rows are held out (the check batch) and 1 kept; each set keeps the rows' order.
    """
    order = np.random.default_rng(seed).permutation(n)
    n_test = min(max(2, round(n * fraction)), n - 1)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def load_text_split(
    path: str | os.PathLike[str],
    tokenizer: Any,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    max_length: int = TEXT_MAX_LENGTH,
    test_path: str | os.PathLike[str] | None = None,
    test_fraction: float = TEXT_TEST_FRACTION,
    seed: int = TEXT_SPLIT_SEED,
    inputs: Sequence[str] | None = None,
    label2id: Mapping[str, int] | None = None,
    progress: bool = False,
) -> tuple[Split, str]:
    """Read and tokenize a text data set into a train/test :class:`Split` of keyword inputs.

    Args:
        path: The training data (``.txt``, ``.jsonl`` or ``.csv``; see :func:`read_rows`).
        tokenizer: A ``transformers`` tokenizer (the model folder's own). Its padding side is
            set to the right; a tokenizer without a pad token pads with its end-of-text token.
        text_column: The text's key or column (default ``"text"``).
        label_column: The labels' key or column: class indices, or names in ``label2id``.
        max_length: Tokens at most per example (longer ones are truncated).
        test_path: The held-out data, in a file of the same kind; default: a seeded
            ``test_fraction`` of ``path`` (at least 2 examples).
        test_fraction: The share of ``path`` held out when ``test_path`` is not given.
        seed: Seed of that split.
        inputs: The tokenizer outputs to keep, in the model's order (default: all of
            ``tokenizer.model_input_names``).
        label2id: Label names to class indices (a model config's ``label2id``).
        progress: Show a progress bar while tokenizing.

    Returns:
        The split (inputs as int64 ``(N, L)`` tensors by name, padded to the longest example
        of train and test, ``L <= max_length``; labels, or empty tensors) and one line saying
        what was read, how it was tokenized and split.

    Raises:
        ConfigError: A bad row (with its line number), too few examples, a bad option, or a
            tokenizer that cannot pad.
        FormatError: A line that is not JSON or text that is not UTF-8.
        MissingFileError: A file does not exist.
    """
    from qtcompress.io.arrays import check_dataset

    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"--max-length must be an integer >= 2, got {max_length!r}.")
    if test_path is None and not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"--test-fraction must be in (0, 1), got {test_fraction!r}.")
    notes = []
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                f"{type(tokenizer).__name__} has neither a pad nor an end-of-text token, so "
                "examples of different lengths cannot be batched; tokenize into an .npz."
            )
        tokenizer.pad_token = tokenizer.eos_token
        notes.append(f"padded with {tokenizer.eos_token!r} (no pad token)")
    tokenizer.padding_side = "right"
    names = list(inputs) if inputs is not None else list(tokenizer.model_input_names)
    args = (tokenizer, names, max_length, text_column, label_column, label2id, progress)
    train = _encode(Path(path), *args)
    if test_path is not None:
        test = _encode(Path(test_path), *args)
        parts = [train, test]
        split = f"test set {Path(test_path).name} ({test.n:,} examples)"
    else:
        if train.n < 3:
            raise ConfigError(
                f"{Path(path).name} holds {train.n} examples; at least 3 are needed (2 held "
                "out to test, 1 to train), or give --test-data."
            )
        parts = [train]
        split = f"{test_fraction:.0%} held out to test, seed {seed}"
    longest = max(p.longest for p in parts)
    pad = {"input_ids": int(tokenizer.pad_token_id)}
    arrays = [_padded(p, longest, pad) for p in parts]
    labels = [np.asarray(p.labels, dtype=np.int64) for p in parts]
    if test_path is None:
        kept, held = held_out(train.n, test_fraction, seed)
        arrays = [
            {k: v[kept] for k, v in arrays[0].items()},
            {k: v[held] for k, v in arrays[0].items()},
        ]
        if label_column:
            labels = [labels[0][kept], labels[0][held]]
    x_train, x_test = arrays
    y_train, y_test = (labels[0], labels[1]) if label_column else (None, None)
    for key in names:
        check_dataset(
            {"x_train": x_train[key], "x_test": x_test[key]}
            | ({"y_train": y_train, "y_test": y_test} if label_column else {}),
            source=f"{Path(path).name} ({key})",
        )
    at_limit = sum(p.at_limit for p in parts)
    notes.append(
        f"{at_limit:,} examples reached --max-length {max_length} and were truncated"
        if at_limit
        else f"none reached --max-length {max_length}"
    )
    if label_column:
        notes.append(f"labels from {label_column!r}")
    n_train, n_test = len(next(iter(x_train.values()))), len(next(iter(x_test.values())))
    description = (
        f"{Path(path).name}: {n_train:,} train / {n_test:,} test examples ({split}); "
        f"tokenized with the folder's {type(tokenizer).__name__} into {', '.join(names)}, "
        f"padded on the right to {longest} tokens (the longest example); {'; '.join(notes)}"
    )

    def tensors(a: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(a[k])) for k in names}

    def label_tensor(y: np.ndarray | None) -> torch.Tensor:
        return torch.from_numpy(y) if y is not None else torch.empty(0, dtype=torch.int64)

    return (
        Split(tensors(x_train), label_tensor(y_train), tensors(x_test), label_tensor(y_test)),
        description,
    )


def load_text_for_model(
    path: str | os.PathLike[str],
    model: Any,
    tokenizer: Any,
    *,
    max_length: int = TEXT_MAX_LENGTH,
    **kwargs: Any,
) -> tuple[Split, str]:
    """:func:`load_text_split` for ``model``: the inputs it takes and the lengths it can.

    Keeps the tokenizer outputs that fill ``forward``'s first parameters in order
    (:func:`~qtcompress.data.model_call.leading_inputs`: ONNX inputs are positional), caps
    ``max_length`` at the model's positions (``config.max_position_embeddings``) and the
    tokenizer's ``model_max_length``, and takes the labels' names from ``config.label2id``.

    Args:
        path: The training data.
        model: A ``transformers`` model (anything with a ``forward``; ``config`` optional).
        tokenizer: Its tokenizer.
        max_length: Tokens at most per example, before the cap.
        **kwargs: The other options of :func:`load_text_split`.

    Returns:
        As :func:`load_text_split`; the description also names the cap and what was left out.
    """
    from qtcompress.data.model_call import forward_signature, leading_inputs

    config = getattr(model, "config", None)
    inputs, dropped = leading_inputs(model, list(tokenizer.model_input_names))
    limits = (
        getattr(config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),  # a huge number when unset
    )
    limit = min((n for n in limits if isinstance(n, int) and 1 < n < 10**6), default=None)
    capped = min(max_length, limit) if limit else max_length
    kwargs.setdefault("label2id", getattr(config, "label2id", None))
    split, description = load_text_split(
        path, tokenizer, max_length=capped, inputs=inputs, **kwargs
    )
    if capped < max_length:
        description += f"; --max-length {max_length} capped at the model's {limit} positions"
    if dropped:
        description += (
            f"; {', '.join(dropped)} left out: {forward_signature(model).split('(')[0]} takes "
            "them after other parameters and ONNX inputs are positional"
        )
    return split, description
