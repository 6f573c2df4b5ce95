"""Named counters created on first use (:class:`Counters`), for per-node statistics.

A simulation holds a million engines, each with several sets of counters (messages in and out by
type, drops by reason, its session layer's and its store's): dictionaries of zeros cost ~2 KB per
engine before anything happens. A :class:`Counters` starts empty, reads an unused name as 0 and
still refuses a name outside its set (``KeyError``), so a misspelled reason stays a bug."""

from __future__ import annotations

__all__ = ["Counters"]


class Counters(dict):
    """A ``dict`` of counters over the fixed ``names``: ``counters[name] += 1`` works from the
    start; :meth:`full` gives every name in order, zeros included."""

    __slots__ = ("_names",)

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self._names = names  # shared by every instance of one kind: pass one tuple

    def __missing__(self, name: str) -> int:
        if name in self._names:
            return 0
        raise KeyError(name)

    def full(self) -> dict[str, int]:
        """Every counter, in the order of ``names``."""
        get = self.get
        return {name: get(name, 0) for name in self._names}
