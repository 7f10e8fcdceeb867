"""Fields whose objects stay bad after every retry: each is served as its substitute, so batch sizes never change.

The filler adds to it; the timeline reads it (a quarantined field's schedule positions count for its substitute).
"""

from __future__ import annotations

from typing import Iterator

from prefetchd.errors import StorageError


class Quarantine:
    def __init__(self, n_fields: int):
        self.n_fields = n_fields
        self.reasons: dict[int, str] = {}   # field -> why; insertion order = quarantine order

    def add(self, f: int, reason: str) -> None:
        self.reasons[f] = reason

    def substitute(self, f: int) -> int:
        """The field served in place of `f`: `f` itself when healthy, else the next healthy one."""
        n = self.n_fields
        for step in range(n):
            g = (f + step) % n
            if g not in self.reasons:
                return g
        raise StorageError("every field of the dataset is quarantined; run `prefetchd check DATASET`")

    def __contains__(self, f: int) -> bool:
        return f in self.reasons

    def __len__(self) -> int:
        return len(self.reasons)

    def __iter__(self) -> Iterator[int]:
        return iter(self.reasons)

    def items(self):
        return self.reasons.items()
