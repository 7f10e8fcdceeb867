"""Shared-memory arena and the client's zero-copy batch view, on real /dev/shm."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid

import numpy as np
import pytest

from prefetchd.errors import ShmError
from prefetchd.shm.arena import SHM_DIR, Arena, SlotState, read_owner_pid, reap_stale_segments
from prefetchd.shm.batch_view import BatchView


@pytest.fixture
def arena():
    a = Arena.create(f"prefetchd-test-{uuid.uuid4().hex[:8]}", 6, (3, 17, 23))
    yield a
    a.destroy()


def test_layout_is_page_aligned_private_and_describes_itself(arena):
    layout = arena.layout
    assert layout.data_offset % 4096 == 0 and layout.slot_stride % 4096 == 0
    assert layout.slot_bytes == 3 * 17 * 23 * 2
    mode = stat.S_IMODE((SHM_DIR / layout.name).stat().st_mode)
    assert mode == 0o600
    assert read_owner_pid(layout.name) == os.getpid()
    assert arena.header["magic"][0] == b"PFDARENA"
    assert list(arena.header["shape"][0]) == [3, 17, 23]


def test_slot_states_and_generations_are_visible_in_the_table(arena):
    arena.set_state(2, SlotState.FILLING, field=41)
    arena.set_state(2, SlotState.READY)
    arena.set_state(2, SlotState.FILLING, field=7)
    row = arena.table[2]
    assert (row["state"], row["field"], row["generation"]) == (SlotState.FILLING, 7, 2)


def test_batch_view_maps_scattered_slots_without_copying(arena):
    for i in range(6):
        arena.slot(i)[...] = np.arange(3 * 17 * 23, dtype=np.uint16).reshape(3, 17, 23) + 1000 * i
    view = BatchView(arena.layout, max_batch=4)
    images = view.images([5, 0, 3])
    assert images.shape == (3, 3, 17, 23) and images.dtype == np.uint16
    assert [int(images[k, 0, 0, 0]) for k in range(3)] == [5000, 0, 3000]
    assert not images.flags.writeable
    arena.slot(0)[1, 2, 3] = 65535  # the daemon writes, the view sees it: same pages, no copy
    assert images[1, 1, 2, 3] == 65535
    again = view.images([1, 2])
    assert int(again[0, 0, 0, 0]) == 1000
    view.close()
    assert int(images.max()) == 0  # stale views read zeros after close instead of crashing


def test_a_client_process_reading_the_arena_never_unlinks_it(arena):
    script = (
        "import sys; from prefetchd.shm.arena import ArenaLayout; from prefetchd.shm.batch_view import BatchView;"
        f"import json; layout = ArenaLayout.from_dict(json.loads(sys.argv[1]));"
        "v = BatchView(layout, 2); print(int(v.images([0, 1]).sum()))"
    )
    import json

    arena.slot(0)[...] = 1
    result = subprocess.run([sys.executable, "-c", script, json.dumps(arena.layout.to_dict())],
                            capture_output=True, text=True, check=True)
    assert int(result.stdout) == 3 * 17 * 23
    assert (SHM_DIR / arena.layout.name).exists()


def test_an_arena_larger_than_free_shm_is_refused_with_numbers():
    with pytest.raises(ShmError, match=r"needs .* GiB of shared memory but only .* GiB .* lower cache_size"):
        Arena.create(f"prefetchd-test-{uuid.uuid4().hex[:8]}", 10**7, (5, 1080, 1080))


def test_budget_is_enforced():
    with pytest.raises(ShmError, match="shm.budget_bytes=100000"):
        Arena.create(f"prefetchd-test-{uuid.uuid4().hex[:8]}", 4, (5, 100, 100), budget_bytes=10**5)


def test_stale_segments_of_dead_daemons_are_reaped():
    name = f"prefetchd-test-{uuid.uuid4().hex[:8]}"
    # A child creates an arena and dies without cleaning up, like a SIGKILLed daemon.
    code = (f"from prefetchd.shm.arena import Arena; import os; a = Arena.create({name!r}, 1, (1, 8, 8)); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (SHM_DIR / name).exists()
    assert name in reap_stale_segments()
    assert not (SHM_DIR / name).exists()
