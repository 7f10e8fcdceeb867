"""Dataset strings in the DINOv2/v3 convention: `Name:key=value:key=value`.

    JUMPS3MultiView:bucket=cellpainting-gallery:prefix=cpg0000-jump-pilot/source_4/images
    JUMPLocal:root=/data/jump

The endpoint is deliberately not part of the string (see `prefetchd.s3.resolve_endpoint`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from prefetchd.channels import DEFAULT_CHANNELS, parse_channels
from prefetchd.errors import DatasetError
from prefetchd.storage import LocalDirectory, S3Location, Storage

DEFAULT_DATASET = (
    "JUMPS3MultiView:bucket=cellpainting-gallery:prefix=cpg0000-jump-pilot/source_4/images"
)

_KEYS: dict[str, dict[str, bool]] = {
    # name -> {key: required}
    "JUMPS3MultiView": {"bucket": True, "prefix": False, "max_samples": False, "channels": False, "index": False},
    "JUMPLocal": {"root": True, "max_samples": False, "channels": False, "index": False},
}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    storage: Storage          # where the objects live: S3Location or LocalDirectory
    max_samples: int | None = None
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    index: str | None = None
    text: str = field(default="", compare=False)

    @property
    def bucket(self) -> str | None:
        return getattr(self.storage, "bucket", None)

    @property
    def prefix(self) -> str:
        return getattr(self.storage, "prefix", "")

    @property
    def root(self) -> str | None:
        return getattr(self.storage, "root", None)

    @property
    def location(self) -> str:
        return self.storage.url

    def cache_key(self, endpoint: str | None) -> str:
        """Key of the on-disk index cache: the listing depends on where, not on which subset is used."""
        where = self.storage.cache_where(endpoint)
        return hashlib.sha256(f"{where}|index={self.index or ''}".encode()).hexdigest()[:24]


def parse_dataset(text: str) -> DatasetSpec:
    """Parse and validate a dataset string; every mistake names what to change."""
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"empty dataset string; expected for example {DEFAULT_DATASET!r}")
    # `index=s3://bucket/key` is the one place a value may hold "://"; protect it from the ':' split.
    name, *pairs = text.strip().replace("://", "\0//").split(":")
    pairs = [pair.replace("\0//", "://") for pair in pairs]
    if name not in _KEYS:
        raise DatasetError(
            f"unknown dataset name {name!r}; accepted names: {', '.join(_KEYS)} "
            f"(for example {DEFAULT_DATASET!r})"
        )
    accepted = _KEYS[name]
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or "=" in value:
            raise DatasetError(
                f"malformed part {pair!r} in dataset string {text!r}: expected key=value "
                "separated by ':' (values cannot contain ':' or '=')"
            )
        if key not in accepted:
            raise DatasetError(
                f"unknown key {key!r} for {name}; accepted keys: {', '.join(accepted)}"
            )
        if key in values:
            raise DatasetError(f"key {key!r} given twice in dataset string {text!r}")
        values[key] = value
    missing = [key for key, required in accepted.items() if required and key not in values]
    if missing:
        raise DatasetError(f"{name} needs {', '.join(k + '=…' for k in missing)} (in {text!r})")

    max_samples = None
    if "max_samples" in values:
        try:
            max_samples = int(values["max_samples"])
        except ValueError:
            max_samples = -1
        if max_samples <= 0:
            raise DatasetError(f"max_samples must be a positive integer, got {values['max_samples']!r}")
    channels = parse_channels(values.get("channels"))
    if name == "JUMPLocal":
        root = os.path.expanduser(values["root"])
        return DatasetSpec(name, LocalDirectory(root), max_samples=max_samples, channels=channels,
                           index=values.get("index"), text=text)
    bucket = values["bucket"]
    if "://" in bucket:
        raise DatasetError(
            f"dataset strings take a bare bucket name and a prefix, not a URL: write "
            f"'JUMPS3MultiView:bucket=<bucket>:prefix=<path>' instead of {text!r}"
        )
    if not bucket or "/" in bucket:
        raise DatasetError(f"bucket must be a bare bucket name like 'cellpainting-gallery', got {bucket!r}")
    prefix = values.get("prefix", "").strip("/")
    return DatasetSpec(name, S3Location(bucket, prefix), max_samples=max_samples,
                       channels=channels, index=values.get("index"), text=text)
