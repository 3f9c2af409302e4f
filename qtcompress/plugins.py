"""A registry of named plug-ins of one kind: schemes, value sources, ansätze, mappings, losses.

Every plug-in point keeps one :class:`Registry`; it refuses a name registered twice and
answers an unknown name with one line that lists the registered ones, so each point's
``register_*``, ``*_names`` and ``check_*`` functions are one line over it.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from qtcompress.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Plug-ins of one kind by name, in registration order.

    Args:
        what: What a plug-in is called in messages ("scheme", "value source").
        article: The article before ``what`` ("A", "An").
        sort_names: List the names alphabetically in messages (registration order otherwise).
    """

    def __init__(self, what: str, article: str = "A", *, sort_names: bool = False) -> None:
        self.what = what
        self.article = article
        self.sort_names = sort_names
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register ``item`` as ``name`` and return it.

        Raises:
            ConfigError: ``name`` is already registered.
        """
        if name in self._items:
            raise ConfigError(f"{self.article} {self.what} named {name!r} is already registered.")
        self._items[name] = item
        return item

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._items)

    def check(self, name: object) -> str:
        """``name`` if it is registered.

        Raises:
            ConfigError: It is not (the message lists the registered names).
        """
        if not isinstance(name, str) or name not in self._items:
            listed = sorted(self._items) if self.sort_names else list(self._items)
            raise ConfigError(f"Unknown {self.what} {name!r}; choose from {', '.join(listed)}.")
        return name

    def __getitem__(self, name: str) -> T:
        """The plug-in ``name`` (a :class:`ConfigError` where it is not registered)."""
        return self._items[self.check(name)]

    def get(self, name: str) -> T | None:
        """The plug-in ``name``, or ``None``."""
        return self._items.get(name)

    def pop(self, name: str) -> T | None:
        """Unregister ``name`` (tests that register their own), returning it or ``None``."""
        return self._items.pop(name, None)

    def values(self) -> list[T]:
        """The plug-ins, in registration order."""
        return list(self._items.values())
