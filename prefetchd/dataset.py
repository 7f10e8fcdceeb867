"""Dataset strings in the DINOv2/v3 convention: `Name:key=value:key=value`.

    JUMPS3MultiView:bucket=cellpainting-gallery:prefix=cpg0000-jump-pilot/source_4/images
    JUMPS3MultiView:bucket=cellpainting-gallery:prefix=cpg0016-jump/source_2,cpg0016-jump/source_8:plate_type=ORF:plate_table=plate.csv.gz
    JUMPLocal:root=/data/jump

Several prefixes are a comma list (or give a list of dataset strings: `parse_dataset([...])` joins them).
Metadata selection keys take comma lists too: source, batch, plate, well, plate_type (the last needs
plate_table=, a table shaped like jump-cellpainting/datasets `metadata/plate.csv.gz`).

The endpoint is deliberately not part of the string (see `prefetchd.s3.resolve_endpoint`).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

from prefetchd.channels import DEFAULT_CHANNELS, parse_channels
from prefetchd.errors import DatasetError
from prefetchd.storage import LocalDirectory, S3Location, Storage

DEFAULT_DATASET = (
    "JUMPS3MultiView:bucket=cellpainting-gallery:prefix=cpg0000-jump-pilot/source_4/images"
)

_S3_URL = re.compile(r"s3://(?P<bucket>[^/:]+)(?P<prefix>/[^:]*)?")
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")   # what botocore accepts as a bucket name (besides ARNs)
_SELECTION_KEYS = ("source", "batch", "plate", "well", "plate_type")
_COMMON = {"max_samples": False, "channels": False, "index": False, "plate_table": False,
           **{key: False for key in _SELECTION_KEYS}}
_KEYS: dict[str, dict[str, bool]] = {
    # name -> {key: required}
    "JUMPS3MultiView": {"bucket": True, "prefix": False, **_COMMON},
    "JUMPLocal": {"root": True, **_COMMON},
}


@dataclass(frozen=True)
class Selection:
    """Which fields of the indexed locations a dataset string keeps (empty tuple: all)."""

    source: tuple[str, ...] = ()       # "source_4"
    batch: tuple[str, ...] = ()
    plate: tuple[str, ...] = ()        # barcode (Metadata_Plate), plate folder, or plate name
    well: tuple[str, ...] = ()         # "A01"
    plate_type: tuple[str, ...] = ()   # Metadata_PlateType from the plate table: COMPOUND, ORF, CRISPR, …

    def __bool__(self) -> bool:
        return any((self.source, self.batch, self.plate, self.well, self.plate_type))

    def scope(self) -> str:
        """What narrows which plates are read (so it keys the index cache); wells only filter rows."""
        return "|".join(f"{k}={','.join(getattr(self, k))}" for k in ("source", "batch", "plate", "plate_type")
                        if getattr(self, k))


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    storage: Storage          # where the objects live: S3Location or LocalDirectory
    max_samples: int | None = None
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    index: str | None = None
    text: str = field(default="", compare=False)
    selection: Selection = field(default_factory=Selection)
    plate_table: str | None = None

    @property
    def bucket(self) -> str | None:
        return getattr(self.storage, "bucket", None)

    @property
    def prefix(self) -> str:
        """The prefixes as written in the dataset string (comma separated); "" for a local root."""
        return getattr(self.storage, "prefix", "")

    @property
    def root(self) -> str | None:
        return getattr(self.storage, "root", None)

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The prefixes a JUMPS3MultiView string names (`prefix=a,b`); ("",) for the whole bucket or a root."""
        return getattr(self.storage, "prefixes", ("",))

    @property
    def location(self) -> str:
        return self.storage.url

    def cache_key(self, endpoint: str | None) -> str:
        """Key of the on-disk index cache: where the listing comes from and what narrows which plates are
        read; not channels, wells or max_samples, which only select from it."""
        where = self.storage.cache_where(endpoint)
        scope = "" if self.index else self.selection.scope()
        text = f"{where}|index={self.index or ''}|plate_table={self.plate_table or ''}|{scope}"
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def join_datasets(texts: list[str] | tuple[str, ...]) -> str:
    """Several dataset strings of one bucket (a config list) as one: their prefixes joined by commas.

    All must agree on everything but the prefix; a difference names the key."""
    if not texts:
        raise DatasetError("empty list of datasets; give at least one dataset string")
    specs = [parse_dataset(t) for t in texts]
    first = specs[0]
    if len(specs) == 1:
        return first.text
    if isinstance(first.storage, LocalDirectory):
        raise DatasetError("a list of datasets can only join JUMPS3MultiView prefixes of one bucket, not "
                           "JUMPLocal roots: give one root (the folder above them)")
    for spec in specs[1:]:
        for key in ("name", "bucket", "max_samples", "channels", "index", "selection", "plate_table"):
            if getattr(spec, key) != getattr(first, key):
                raise DatasetError(f"the datasets in the list differ in {key} ({first.text!r} vs {spec.text!r});"
                                   " a list may differ only in prefix=")
    name, pairs = _split(first.text)
    prefixes = ",".join(p for spec in specs for p in spec.prefixes)
    pairs = [(k, prefixes if k == "prefix" else v) for k, v in pairs]
    if "prefix" not in dict(pairs):
        pairs.append(("prefix", prefixes))
    return ":".join([name, *(f"{k}={v}" for k, v in pairs)])


def _split(text: str) -> tuple[str, list[tuple[str, str]]]:
    """`Name:k=v:k=v` → (Name, [(k, v), ...]); `s3://` inside a value survives the ':' split."""
    name, *parts = text.strip().replace("://", "\0//").split(":")
    pairs = []
    for part in parts:
        part = part.replace("\0//", "://")
        key, sep, value = part.partition("=")
        if not sep or not key or "=" in value:
            raise DatasetError(
                f"malformed part {part!r} in dataset string {text!r}: expected key=value "
                "separated by ':' (values cannot contain ':' or '=')"
            )
        pairs.append((key, value))
    return name, pairs


def _comma_list(key: str, value: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise DatasetError(f"{key}= is empty; give one value or a comma list")
    return items


def _selection(values: dict[str, str]) -> Selection:
    from prefetchd.layouts.common import well_name

    chosen = {key: _comma_list(key, values[key]) for key in _SELECTION_KEYS if key in values}
    if "source" in chosen:
        chosen["source"] = tuple(s if s.startswith("source_") else f"source_{s}" for s in chosen["source"])
    if "well" in chosen:
        wells = []
        for raw in chosen["well"]:
            name = well_name(raw)
            if name is None:
                raise DatasetError(f"well={raw!r} is not a well name; accepted: A01 … P24 (384-well), up to "
                                   "AF48 (1536-well), comma separated")
            wells.append(name)
        chosen["well"] = tuple(wells)
    if "plate_type" in chosen:
        chosen["plate_type"] = tuple(t.upper() for t in chosen["plate_type"])
        if "plate_table" not in values:
            raise DatasetError("plate_type= needs plate_table=<path or s3://… of a plate table shaped like "
                               "jump-cellpainting/datasets metadata/plate.csv.gz>")
    return Selection(**chosen)


def parse_dataset(text: "str | list[str] | tuple[str, ...]") -> DatasetSpec:
    """Parse and validate a dataset string (or a list of them, joined); every mistake names what to change."""
    if isinstance(text, (list, tuple)):
        text = join_datasets(list(text))
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"empty dataset string; expected for example {DEFAULT_DATASET!r}")
    control = next((c for c in text if not c.isprintable()), None)
    if control is not None:
        raise DatasetError(f"dataset string {text!r} contains the control character {control!r}: remove it")
    url = _S3_URL.fullmatch(text.strip())
    if url:
        raise DatasetError(f"dataset strings are not URLs: for {text.strip()} write "
                           f"'JUMPS3MultiView:bucket={url['bucket']}:prefix={(url['prefix'] or '').strip('/')}'")
    name, pairs = _split(text)  # no placeholder clash: control characters were refused above
    if name not in _KEYS:
        raise DatasetError(
            f"unknown dataset name {name!r}; accepted names: {', '.join(_KEYS)} "
            f"(for example {DEFAULT_DATASET!r})"
        )
    accepted = _KEYS[name]
    values: dict[str, str] = {}
    for key, value in pairs:
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
    selection = _selection(values)
    plate_table = values.get("plate_table")
    if name == "JUMPLocal":
        root = os.path.expanduser(values["root"])
        return DatasetSpec(name, LocalDirectory(root), max_samples=max_samples, channels=channels,
                           index=values.get("index"), text=text, selection=selection, plate_table=plate_table)
    bucket = values["bucket"]
    if "://" in bucket:
        raise DatasetError(
            f"dataset strings take a bare bucket name and a prefix, not a URL: write "
            f"'JUMPS3MultiView:bucket=<bucket>:prefix=<path>' instead of {text!r}"
        )
    if not bucket or "/" in bucket:
        raise DatasetError(f"bucket must be a bare bucket name like 'cellpainting-gallery', got {bucket!r}")
    if not _BUCKET.fullmatch(bucket):
        raise DatasetError(f"bucket names use only ASCII letters, digits, '.', '-' and '_' (S3 naming rules), "
                           f"got {bucket!r}: fix bucket= in the dataset string")
    prefixes = _prefixes(values.get("prefix", ""))
    return DatasetSpec(name, S3Location(bucket, tuple(prefixes)), max_samples=max_samples,
                       channels=channels, index=values.get("index"), text=text, selection=selection,
                       plate_table=plate_table)


def _prefixes(value: str) -> list[str]:
    """`a/,a/b,c` → ["a", "c"]: stripped, deduplicated, a prefix inside another one dropped (its keys are
    listed with the outer one), the order given kept. An empty prefix is the whole bucket."""
    given = [p.strip().strip("/") for p in value.split(",")]
    if len(given) == 1:
        return given
    if not all(given):
        raise DatasetError(f"prefix={value!r} has an empty item; give comma separated prefixes")
    kept: list[str] = []
    for prefix in sorted(set(given), key=lambda p: p.count("/")):
        if not any(prefix.startswith(outer + "/") for outer in kept):
            kept.append(prefix)
    return [p for i, p in enumerate(given) if p in kept and p not in given[:i]]
