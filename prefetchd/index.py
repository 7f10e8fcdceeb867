"""The dataset index: which fields exist, which object holds each channel, where the illum files are.

Built once per (dataset location, endpoint) and cached on disk; see `build_index`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Field:
    """One field of view: `<plate folder>/<well>/<site>` with one object key per selected channel."""

    id: str                      # e.g. "BR00116991__2020-11-05T19_51_35-Measurement1/A01/1"
    batch: str                   # e.g. "2020_11_04_CPJUMP1"
    plate: str                   # plate folder (barcode + acquisition time): unique per imaging run
    well: str                    # "A01"
    site: int                    # 1-based
    keys: tuple[str, ...]        # object keys (S3) or paths relative to root (local), in channel order
    sizes: tuple[int, ...]       # expected byte sizes (-1 when unknown)
    illum_plate: str | None      # key into Index.illum (batch/barcode), None when no illum files


@dataclass
class Index:
    dataset: str                             # the dataset string it was built for
    channels: tuple[str, ...]
    fields: list[Field]                      # sorted by id; position = field index used everywhere
    illum: dict[str, tuple[str | None, ...]] = field(default_factory=dict)  # per channel, in order
    incomplete: int = 0                      # fields missing a selected channel (skipped)
    unparsed: int = 0                        # keys that match no known layout
    unparsed_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0                     # time the build (or cache load) took
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.fields)

    @property
    def plates(self) -> list[str]:
        return sorted({f.plate for f in self.fields})
