"""One registry per extension point: block scorers, searches, healing methods.

An entry is an object with a ``name`` and a one-line ``description`` (and whatever its extension point asks of it:
see :class:`hf_collapse.scoring.Scorer`, :class:`hf_collapse.searches.Search`,
:class:`hf_collapse.healing.HealingMethod`). Adding one is one file and one registration; the functions that run
entries (``score_blocks``, ``prune``, ``heal``) and the commands (their choices and ``--help``) look them up here,
never branch on a name.

Example::

    >>> from hf_collapse.registry import Registry
    >>> class Greeting:
    ...     def __init__(self, name, description):
    ...         self.name, self.description = name, description
    >>> greetings = Registry("greeting")
    >>> _ = greetings.register(Greeting("hello", "says hello"))
    >>> list(greetings), "hello" in greetings, greetings.get("hello").description
    (['hello'], True, 'says hello')
    >>> greetings.get("bye")
    Traceback (most recent call last):
    ValueError: unknown greeting 'bye'; accepted: hello
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, in the order they were registered.

    Args:
        kind: what an entry is, for messages ("scorer", "search", "healing method").
        how: how to add one, for the message that refuses an unknown name.
    """

    def __init__(self, kind: str, how: str = ""):
        self.kind, self.how = kind, how
        self._entries: dict[str, T] = {}

    def register(self, entry: T, *, replace: bool = False) -> T:
        """Add ``entry`` under ``entry.name``; returns it (so that it can decorate or be assigned).

        Raises:
            ValueError: for an entry without a name, or a name already taken (unless ``replace``).
        """
        name = getattr(entry, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty `name` to be registered, got {name!r}")
        if name in self._entries and not replace:
            raise ValueError(f"a {self.kind} named {name!r} is already registered (pass replace=True to replace it)")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name``."""
        return self._entries.pop(self.get(name).name)

    def get(self, name: str) -> T:
        """The entry ``name``; ``ValueError`` naming what is accepted otherwise."""
        if name not in self._entries:
            accepted = ", ".join(self._entries) or "none"
            raise ValueError(
                f"unknown {self.kind} {name!r}; accepted: {accepted}" + (f" ({self.how})" if self.how else "")
            )
        return self._entries[name]

    def entries(self) -> list[T]:
        """The entries, in registration order."""
        return list(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)

    def describe(self) -> str:
        """``"name (description), ..."``: the entries as a ``--help`` text lists them."""
        return ", ".join(
            f"{name} ({entry.description})" if getattr(entry, "description", "") else name
            for name, entry in self._entries.items()
        )

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
