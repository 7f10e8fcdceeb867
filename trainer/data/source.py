"""The training data stream of one rank: the prefetchd daemon, or the in-process synthetic source."""

from __future__ import annotations

from trainer.data.synthetic import SyntheticSource, parse_synthetic
from trainer.errors import TrainerError


def make_source(cfg: dict, rank: int, world_size: int):
    train = cfg["train"]
    dataset = train["dataset_path"]
    if dataset.startswith("Synthetic"):
        params = parse_synthetic(dataset)
        return SyntheticSource(params["fields"], params["size"], len(train["channels"]),
                               train["batch_size_per_gpu"], train["seed"], rank, world_size,
                               train["drop_last"])
    return _attach(dataset, cfg, rank, world_size)


def _attach(dataset: str, cfg: dict, rank: int, world_size: int):
    from prefetchd.client import attach
    from prefetchd.errors import PrefetchdError

    train, s3 = cfg["train"], cfg["s3"]
    try:
        return attach(
            dataset=dataset, batch_size=train["batch_size_per_gpu"], seed=train["seed"], rank=rank,
            world_size=world_size, socket=s3["socket"], channels=list(train["channels"]),
            illum=s3["illum"], rescale=s3["rescale"], clahe=s3["clahe"], cache_size=s3["cache_size"],
            prefetch_factor=s3["prefetch_factor"], policy=s3["policy"], drop_last=train["drop_last"],
            shape=s3.get("shape"),
        )
    except PrefetchdError as exc:
        raise TrainerError(f"prefetchd: {exc.message}") from None
