"""Shared-memory objects: the arena (header + slot table + slot data) and the client's batch view."""

from prefetchd.shm.arena import Arena, ArenaLayout, SlotState, arena_name, list_segments

__all__ = ["Arena", "ArenaLayout", "SlotState", "arena_name", "list_segments"]
