"""Name -> plugin registries, resolved lazily.

An entry is either the object itself or a "module:attribute" string that is
imported only when that name is used, so a heavy plugin (a 7B judge, a hub
dataset) costs nothing until it is chosen.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str, target: Any = None):
        """Register `target` (object or "module:attr"), or use as a decorator."""
        if target is not None:
            self._add(name, target)
            return target

        def decorator(obj: T) -> T:
            self._add(name, obj)
            return obj

        return decorator

    def _add(self, name: str, target: Any) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = target

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        target = self._entries[name]
        if isinstance(target, str):
            module_name, _, attribute = target.partition(":")
            target = getattr(importlib.import_module(module_name), attribute)
            self._entries[name] = target
        return target

    def problem(self, name: str) -> str | None:
        """None if `name` is registered, else what to say: the registered names."""
        return None if name in self._entries else f"unknown {self.kind}; registered: {', '.join(self.names())}"

    def check(self, name: str) -> str:
        """`name` if registered, else the ValueError a config validator raises (pydantic names the field)."""
        problem = self.problem(name)
        if problem:
            raise ValueError(problem)
        return name

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
