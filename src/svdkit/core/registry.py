"""One registry type for everything svdkit looks up by name (methods, allocators)."""

from __future__ import annotations

from typing import Generic, TypeVar

from ..errors import SvdkitError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry; a name is registered once, and an unknown name is an SvdkitError listing the known ones."""

    def __init__(self, kind: str, known: str = "known") -> None:
        self.kind = kind
        self.known = known  # how the error message introduces the list of names
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise SvdkitError(f"unknown {self.kind} '{name}'; {self.known}: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
