"""A field whose objects keep stalling is quarantined after `job.field_budget_s`, not after attempts × retries ×
read timeout: the rank waiting for it is blocked about that long, then gets the substitute (exact pixels)."""

from __future__ import annotations

import pytest

from bench.delivery import SourceFields, Tally
from prefetchd.channels import DEFAULT_CHANNELS, PHENIX_CHANNELS
from prefetchd.client import attach

from faultproxy import FaultProxy

RAW = {"illum": False, "clahe": False, "rescale": False}
READ_TIMEOUT_S, RETRIES, FILL_ATTEMPTS = 4, 2, 3
BUDGET_S = 3
# Without a budget the rank would wait FILL_ATTEMPTS × (RETRIES + 1) × READ_TIMEOUT_S = 36 s (plus backoff).
UNBUDGETED_WAIT_S = FILL_ATTEMPTS * (RETRIES + 1) * READ_TIMEOUT_S


@pytest.fixture
def proxy(s3):
    with FaultProxy(upstream=s3.endpoint_url, seed=3) as p:
        yield p


def test_a_field_whose_objects_keep_stalling_is_quarantined_within_the_budget(daemon, synthetic, proxy):
    fields = synthetic.manifest.fields
    victim = fields[len(fields) // 2]
    proxy.add_rule("stall", match=victim.keys[PHENIX_CHANNELS["Mito"]], stall_s=120)  # every GET of it hangs
    d = daemon(f"s3.read_timeout_s={READ_TIMEOUT_S}", f"s3.retries={RETRIES}", f"job.field_budget_s={BUDGET_S}",
               endpoint_url=proxy.url)
    source = SourceFields(synthetic.manifest, DEFAULT_CHANNELS)
    tally = Tally(world_size=1, batches_per_epoch=len(fields) // 4, fields=source.ids, bad={victim.id})
    waits = []
    with attach(synthetic.dataset, batch_size=4, socket=d.socket, job="budget", cache_size=len(fields),
                prefetch_factor=0, **RAW) as stream:
        for batch in stream.epoch(0):
            tally.add(0, 0, batch.index, batch.ids, [source.identify(f) for f in batch.images])
            waits.append(batch.waited_s)
        job = stream.status()["jobs"][0]
    verdict = tally.judge()
    assert (verdict["lost"], verdict["duplicated"], verdict["wrong_pixels"], verdict["bad_fields_delivered"]) == \
        (0, 0, 0, 0), verdict["examples"]
    assert [q["field"] for q in job["quarantined"]] == [victim.id]
    assert f"job.field_budget_s={BUDGET_S} s" in job["quarantined"][0]["reason"]
    # Bounded by the budget (plus the substitute's fill and a loaded machine), far from the unbudgeted wait.
    assert max(waits) < UNBUDGETED_WAIT_S / 2, waits
    assert max(waits) >= BUDGET_S * 0.8, waits  # the victim's batch did wait for it: the budget is what ended it
