"""`clahe.where: trainer`: the daemon ships rescaled uint16 and the trainer's device applies the same CLAHE."""

from __future__ import annotations

import numpy as np
import torch

from prefetchd.client import attach
from trainer.data.to_device import images_to_device_with_clahe, trainer_clahe_options


def test_trainer_side_clahe_matches_the_daemon(daemon, synthetic):
    d = daemon()
    clahe = {"clip_limit": 3.0, "tile_grid": 8, "bins": 256}
    by_daemon, by_trainer = {}, {}
    with attach(synthetic.dataset, batch_size=4, socket=d.socket, job="daemon-clahe", cache_size=24,
                clahe={**clahe, "where": "daemon"}) as stream:
        assert trainer_clahe_options(stream) is None
        batch = next(iter(stream.epoch(0)))
        by_daemon = {i: batch.images[k].astype(np.int64) for k, i in enumerate(batch.ids)}
    with attach(synthetic.dataset, batch_size=4, socket=d.socket, job="trainer-clahe", cache_size=24,
                clahe={**clahe, "where": "trainer"}) as stream:
        options = trainer_clahe_options(stream)
        assert options == clahe
        batch = next(iter(stream.epoch(0)))
        shipped = batch.images.astype(np.int64)
        on_device = images_to_device_with_clahe(batch.images, torch.device("cpu"), options)
        by_trainer = {i: on_device[k].numpy().astype(np.int64) for k, i in enumerate(batch.ids)}
    assert by_daemon.keys() == by_trainer.keys()
    for field_id in by_daemon:
        assert np.abs(by_daemon[field_id] - by_trainer[field_id]).max() <= 1
    assert not all(np.array_equal(shipped[k], by_trainer[i]) for k, i in enumerate(batch.ids))  # CLAHE did run
