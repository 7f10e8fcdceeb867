"""The eviction policies by name: the one place the names `lru` and `belady` are spelled. Kept apart from the
planners (`prefetchd/planner/`) so that config validation, the client and the trainer can name a policy without
importing the daemon's data path."""

from __future__ import annotations

import enum
from typing import Any

from prefetchd.errors import ConfigError


class Policy(enum.StrEnum):
    LRU = "lru"          # evict the least recently used; prefetch the must zone whatever it evicts
    BELADY = "belady"    # evict what offline MIN would evict; prefetch never costs a hit

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(p.value for p in cls)

    @classmethod
    def parse(cls, value: Any, what: str = "policy") -> "Policy":
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"{what} must be one of {', '.join(cls.names())}, got {value!r}") from None
