"""Name -> object registries with aliases and "did you mean" lookups.

Pattern from torchvision's ``register_model`` and MONAI's ``look_up_option``.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Iterable


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""``."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    if name.lower() in lowered:
        return f" Did you mean '{lowered[name.lower()]}'?"
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return f" Did you mean '{lowered[close[0]]}'?" if close else ""


class UnknownNameError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


class Registry:
    """A dict of named entries filled by a decorator.

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("mse", aliases=("mean_squared_error",))
    ... def mse(): ...
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, aliases: Iterable[str] = ()) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            self.add(name, obj, aliases)
            return obj

        return deco

    def add(self, name: str, obj: Any, aliases: Iterable[str] = ()) -> None:
        for key in (name, *aliases):
            key = key.lower()
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
        self._entries[name.lower()] = obj
        for a in aliases:
            self._aliases[a.lower()] = name.lower()

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or an alias of it (case-insensitive)."""
        key = str(name).lower()
        key = self._aliases.get(key, key)
        if key not in self._entries:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'; choose one of {self.names()}."
                + did_you_mean(str(name), [*self._entries, *self._aliases])
            )
        return key

    def get(self, name: str) -> Any:
        return self._entries[self.canonical(name)]

    def __contains__(self, name: str) -> bool:
        key = str(name).lower()
        return key in self._entries or key in self._aliases

    def names(self) -> list[str]:
        return sorted(self._entries)

    def aliases(self) -> list[str]:
        return sorted(self._aliases)
