"""A small declarative validator for the JSON metadata of a generator file.

Every metadata field is checked against a spec before any code uses it, so a malformed value
(a string where a number belongs, a negative shape, a list nested 10,000 deep) becomes one
:class:`~qtcompress.errors.FormatError` naming the field, never a ``TypeError`` or
``RecursionError`` deep inside the loader.

Example:
    >>> spec = Obj({"n": Int(min=1), "names": ListOf(Str())})
    >>> validate({"n": 3, "names": ["a"]}, spec, "mapping")  # fits: returns None
    >>> validate({"n": 0, "names": ["a"]}, spec, "mapping")  # doctest: +SKIP
    FormatError: metadata mapping.n: expected an integer >= 1, got 0; the file is corrupt ...
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qtcompress.errors import FormatError
from qtcompress.limits import MAX_JSON_DEPTH

__all__ = [
    "Json",
    "Bool",
    "Int",
    "ListOf",
    "MapOf",
    "Null",
    "Num",
    "Obj",
    "OneOf",
    "Spec",
    "Str",
    "json_depth",
    "validate",
]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def json_depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value (a scalar is 0), computed without recursion."""
    depth, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
            depth = max(depth, level + 1)
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
            depth = max(depth, level + 1)
    return depth


class Spec:
    """What a JSON value must look like; :meth:`problem` says why a value does not fit."""

    def problem(self, value: Any, path: str) -> tuple[str, str] | None:
        """``(path, reason)`` of the first mismatch, or ``None`` when ``value`` fits."""
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Spec):
    """An integer (not a bool, not a float) in ``min..max``."""

    min: int | None = None
    max: int | None = None

    def problem(self, value: Any, path: str) -> tuple[str, str] | None:
        """See :meth:`Spec.problem`."""
        ok = isinstance(value, int) and not isinstance(value, bool)
        if (
            ok
            and (self.min is None or value >= self.min)
            and (self.max is None or value <= self.max)
        ):
            return None
        if self.min is not None and self.max is not None:
            want = f"an integer in {self.min}..{self.max}"
        elif self.min is not None:
            want = f"an integer >= {self.min}"
        else:
            want = "an integer"
        return path, f"expected {want}, got {_show(value)}"


@dataclass(frozen=True)
class Num(Spec):
    """A finite number (int or float, not a bool, never NaN or Inf)."""

    def problem(self, value: Any, path: str) -> tuple[str, str] | None:
        """See :meth:`Spec.problem`."""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return None
        return path, f"expected a finite number, got {_show(value)}"


@dataclass(frozen=True)
class Str(Spec):
    """A string, optionally one of ``choices`` or matching ``pattern`` (full match)."""

    choices: tuple[str, ...] | None = None
    pattern: str | None = None
    min_len: int = 0
    max_len: int = 4096

    def problem(self, value: Any, path: str) -> tuple[str, str] | None:
        """See :meth:`Spec.problem`."""
        if not isinstance(value, str):
            return path, f"expected a string, got {_show(value)}"
        if not self.min_len <= len(value) <= self.max_len:
            return path, f"expected {self.min_len}..{self.max_len} characters, got {len(value)}"
        if self.choices is not None and value not in self.choices:
            return path, f"expected one of {list(self.choices)}, got {_show(value)}"
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            return path, f"expected a string matching {self.pattern!r}, got {_show(value)}"
        return None


@dataclass(frozen=True)
class Bool(Spec):
    """``true`` or ``false``."""

    def problem(self, value: Any, path: str) -> tuple[str, str] | None:
        """See :meth:`Spec.problem`."""
        return (
            None if isinstance(value, bool) else (path, f"expected true/false, got {_show(value)}")
        )


@dataclass(frozen=True)
class Null(Spec):
    """``null``."""

    def problem(self, value: Any, path: str) -> tuple[str, str] | None:
        """See :meth:`Spec.problem`."""
        return None if value is None else (path, f"expected null, got {_show(value)}")


@dataclass(frozen=True)
class Json(Spec):
    """Any JSON value nested at most ``max_depth`` deep (free-form fields)."""

    max_depth: int = MAX_JSON_DEPTH

    def problem(self, value: Any, path: str) -> tuple[str, str] | None:
        """See :meth:`Spec.problem`."""
        depth = json_depth(value)
        if depth > self.max_depth:
            return path, f"nested {depth} deep, more than the limit of {self.max_depth}"
        return None


@dataclass(frozen=True)
class OneOf(Spec):
    """The first of ``options`` that fits (e.g. ``OneOf((Null(), Int(min=1)))``)."""

    options: tuple[Spec, ...]

    def problem(self, value: Any, path: str) -> tuple[str, str] | None:
        """See :meth:`Spec.problem`."""
        reasons = []
        for option in self.options:
            found = option.problem(value, path)
            if found is None:
                return None
            reasons.append(found)
        # Report the deepest mismatch: it is the one that explains the most.
        return max(reasons, key=lambda r: len(r[0]))


@dataclass(frozen=True)
class ListOf(Spec):
    """A list of ``min_len..max_len`` items, each fitting ``item``."""

    item: Spec
    min_len: int = 0
    max_len: int | None = None

    def problem(self, value: Any, path: str) -> tuple[str, str] | None:
        """See :meth:`Spec.problem`."""
        if not isinstance(value, list):
            return path, f"expected a list, got {_show(value)}"
        if len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            most = "" if self.max_len is None else f"..{self.max_len}"
            return path, f"expected {self.min_len}{most} items, got {len(value)}"
        for i, item in enumerate(value):
            found = self.item.problem(item, f"{path}[{i}]")
            if found is not None:
                return found
        return None


@dataclass(frozen=True)
class MapOf(Spec):
    """An object with any string keys (at most ``max_len``), each value fitting ``value``."""

    value: Spec
    max_len: int | None = None

    def problem(self, value: Any, path: str) -> tuple[str, str] | None:
        """See :meth:`Spec.problem`."""
        if not isinstance(value, dict):
            return path, f"expected an object, got {_show(value)}"
        if self.max_len is not None and len(value) > self.max_len:
            return path, f"expected at most {self.max_len} entries, got {len(value)}"
        for key, item in value.items():
            found = self.value.problem(item, f"{path}[{key!r}]")
            if found is not None:
                return found
        return None


@dataclass(frozen=True)
class Obj(Spec):
    """An object with ``required`` keys, ``optional`` keys and, if ``extra``, any others.

    Unknown keys are allowed by default: readers ignore fields they do not know
    (``docs/format.md``, *Versioning*), and later checks compare whole descriptions anyway.
    """

    required: Mapping[str, Spec]
    optional: Mapping[str, Spec] = field(default_factory=dict)
    extra: bool = True

    def problem(self, value: Any, path: str) -> tuple[str, str] | None:
        """See :meth:`Spec.problem`."""
        if not isinstance(value, dict):
            return path, f"expected an object, got {_show(value)}"
        missing = sorted(k for k in self.required if k not in value)
        if missing:
            return path, f"missing keys {missing}"
        if not self.extra:
            unknown = sorted(k for k in value if k not in self.required and k not in self.optional)
            if unknown:
                return path, f"unexpected keys {unknown}"
        for key, spec in (*self.required.items(), *self.optional.items()):
            if key in value:
                found = spec.problem(value[key], f"{path}.{key}" if path else key)
                if found is not None:
                    return found
        return None


def validate(value: Any, spec: Spec, path: str, *, source: str | None = None) -> None:
    """Raise :class:`FormatError` naming the field if ``value`` does not fit ``spec``.

    Args:
        value: A decoded JSON value.
        spec: What it must look like.
        path: Its name, e.g. ``"layout"`` (field paths are built from it: ``layout.total``).
        source: The file it comes from, named first in the message.

    Raises:
        FormatError: ``"<source>: <path>: expected ..., got ...; the file is corrupt or was not
            written by qtcompress."``
    """
    found = Json().problem(value, path) or spec.problem(value, path)
    if found is not None:
        where, reason = found
        prefix = f"{source}: " if source else ""
        raise FormatError(
            f"{prefix}metadata {where}: {reason}; the file is corrupt or was not "
            "written by qtcompress."
        )
