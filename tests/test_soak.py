"""The soak's judge can fail, and a short soak runs end to end (the full one is `python -m bench.soak`)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bench.delivery import Identity, SourceFields, Tally
from prefetchd.channels import DEFAULT_CHANNELS

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def source(synthetic):
    return SourceFields(synthetic.manifest, DEFAULT_CHANNELS)


def deliver(source, tally, order, rank=0, epoch=0, batch_size=4, alter=None):
    """Feed `order` (field ids whose source pixels are delivered) to the tally as batches; `alter(i, pixels)`
    may change what position i received, and return the id the daemon claimed for it."""
    for b in range(0, len(order), batch_size):
        claimed, identities = [], []
        for i in range(b, min(b + batch_size, len(order))):
            pixels = source.expected[order[i]].copy()
            claim = alter(i, pixels) if alter else None
            claimed.append(claim or order[i])
            identities.append(source.identify(pixels))
        tally.add(rank, epoch, b // batch_size, claimed, identities)


def judge(source, order, **kw):
    tally = Tally(world_size=1, batches_per_epoch=-(-len(order) // 4), fields=source.ids, bad=kw.pop("bad", set()))
    deliver(source, tally, order, **kw)
    return tally, tally.judge()


def counts(verdict):
    return {k: verdict[k] for k in ("lost", "duplicated", "wrong_pixels", "mislabelled", "bad_fields_delivered")}


def test_an_exact_epoch_is_clean(source):
    _, verdict = judge(source, list(reversed(source.ids)))
    assert verdict["epochs_complete"] == 1 and verdict["fields_delivered"] == len(source.ids)
    assert set(counts(verdict).values()) == {0}


def test_a_field_delivered_twice_instead_of_another_is_lost_and_duplicated(source):
    order = list(source.ids)
    order[5] = order[6]
    _, verdict = judge(source, order)
    assert counts(verdict) == {"lost": 1, "duplicated": 1, "wrong_pixels": 0, "mislabelled": 0, "bad_fields_delivered": 0}
    assert verdict["examples"] == [f"epoch 0: lost {source.ids[5]}"]


def test_one_wrong_pixel_is_caught(source):
    def flip(i, pixels):
        if i == 3:
            pixels[2, 40, 40] ^= 1
    _, verdict = judge(source, list(source.ids), alter=flip)
    assert verdict["wrong_pixels"] == 1 and verdict["lost"] == 1


def test_pixels_of_another_field_under_this_id_are_mislabelled(source):
    order = list(source.ids)
    order[0], order[1] = order[1], order[0]  # each position holds the other's pixels, claimed as the schedule's id
    _, verdict = judge(source, order, alter=lambda i, _: source.ids[i])
    assert verdict["mislabelled"] == 2 and verdict["lost"] == 0


def test_a_forged_signature_on_the_right_content_is_wrong():
    raw = Identity("plate/A01/1", by_signature="plate/A01/2", signed=True)
    assert not raw.exact and Identity("plate/A01/1", "plate/A01/1", signed=True).exact
    assert Identity("plate/A01/1").exact and not Identity(None).exact


def test_channels_in_the_wrong_order_are_wrong_pixels(source):
    def swap(i, pixels):
        if i == 0:
            pixels[[0, 1]] = pixels[[1, 0]]
    _, verdict = judge(source, list(source.ids), alter=swap)
    assert verdict["wrong_pixels"] == 1


def test_substitutes_for_quarantined_fields_are_expected_but_delivering_a_bad_field_is_not(source):
    bad = source.ids[4]
    order = [f if f != bad else source.ids[5] for f in source.ids]  # the next healthy field stands in
    _, verdict = judge(source, order, bad={bad})
    assert set(counts(verdict).values()) == {0}
    _, verdict = judge(source, list(source.ids), bad={bad})
    assert verdict["bad_fields_delivered"] == 1


def test_a_batch_recorded_twice_counts_as_duplicated(source):
    tally, _ = judge(source, list(source.ids))
    deliver(source, tally, list(source.ids)[:4])  # batch 0 of epoch 0 again
    assert tally.judge()["duplicated"] == 4


def test_an_incomplete_epoch_is_not_judged_for_loss(source):
    tally = Tally(world_size=1, batches_per_epoch=len(source.ids) // 4, fields=source.ids)
    deliver(source, tally, list(source.ids)[:-4])  # the last batch has not arrived yet
    verdict = tally.judge()
    assert verdict["epochs_complete"] == 0 and verdict["lost"] == 0 and verdict["fields_delivered"] == len(source.ids) - 4


def test_a_short_soak_with_kills_restarts_and_faults_receives_every_field_exactly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.soak", "--minutes", "0.2", "--fields", "16", "--size", "48",
                             "--fault-rate", "0.1", "--out", str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["verdict"] == "pass" and report["errors"] == []
    for job, verdict in report["results"].items():
        assert verdict["epochs_complete"] >= 1, (job, verdict)
        assert set(counts(verdict).values()) == {0}, (job, verdict)
    assert report["daemon_restarts"] == 1 and report["trainer_restarts"] == 2
    assert all(t["reconnects"] >= 1 for t in report["trainers"].values())   # every rank lived through the restart
    assert len([m for m, n in report["faults_injected"].items() if n]) >= 3
    # Exactly the two always-bad fields were quarantined over the run. Which daemon life met each depends on
    # timing (on a slow machine the restart and the stop can fall in one epoch), so the run's log is counted,
    # and what the last daemon held at the stop can only be some of them.
    always_bad = sorted(report["setup"]["always_bad"])
    assert len(always_bad) == 2 and report["quarantined_in_run"] == always_bad, report["quarantined_in_run"]
    assert all(set(fields) <= set(always_bad) for fields in report["quarantined_at_end"].values())
    markdown = (tmp_path / "soak.md").read_text()
    assert "| raw |" in markdown and "| clahe |" in markdown and report["command"] in markdown
