"""The dataset index: which fields exist, which object holds each channel, where the illum files are.

Built once per (dataset location, endpoint) and cached on disk; see `build_index`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

import pyarrow as pa
import pyarrow.compute as pc

from prefetchd.catalog import Catalog, CatalogBuilder, spread
from prefetchd.dataset import DatasetSpec
from prefetchd.errors import EmptyDatasetError, PrefetchdError
from prefetchd.index_cache import CacheWriteError, cache_file, load_catalog, save_catalog
from prefetchd.listing import Progress, read_index_file
from prefetchd.s3 import resolve_endpoint
from prefetchd.storage_errors import classify_storage_error

LAYOUT_EXAMPLE = "…/<batch>/images/<plate folder>/Images/r01c01f01p01-ch1sk1fk1fl1.tiff"


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
    etags: tuple[str | None, ...] = ()  # ETags from the listing without quotes (None when unknown)


@dataclass
class Index:
    dataset: str                             # the dataset string it was built for
    channels: tuple[str, ...]
    fields: Sequence[Field]                  # sorted by id; position = field index used everywhere
                                             # (a FieldTable when built here: Fields made on access)
    illum: dict[str, tuple[str | None, ...]] = field(default_factory=dict)  # per channel, in order
    incomplete: int = 0                      # fields missing a selected channel (skipped)
    unparsed: int = 0                        # keys that match no known layout
    unparsed_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0                     # time the build (or cache load) took
    from_cache: bool = False
    cache_path: str | None = None            # where the listing is cached
    cache_error: str | None = None           # why it could not be cached (the index still works)
    total_fields: int = 0                    # complete fields before max_samples

    def __len__(self) -> int:
        return len(self.fields)

    @property
    def plates(self) -> list[str]:
        if isinstance(self.fields, FieldTable):
            return self.fields.distinct("plate")
        return sorted({f.plate for f in self.fields})

    @property
    def batches(self) -> list[str]:
        if isinstance(self.fields, FieldTable):
            return self.fields.distinct("batch")
        return sorted({f.batch for f in self.fields})

    @property
    def ids(self) -> list[str]:
        if isinstance(self.fields, FieldTable):
            return self.fields.ids
        return [f.id for f in self.fields]


# ---- catalog → index -------------------------------------------------------------------------------

class FieldTable(Sequence[Field]):
    """`Index.fields`: the selected fields held as Arrow columns; a `Field` is made when one is accessed.

    Building 375k `Field` objects (1.9M key strings) takes seconds; the daemon needs one at a time.
    """

    def __init__(self, table: pa.Table, channels: tuple[str, ...], illum: dict[str, Any]):
        self._table = table.combine_chunks()
        self._channels = channels
        self.ids: list[str] = self._table["id"].to_pylist()
        self._labels = {name: _dictionary(self._table[name]) for name in ("batch", "plate", "well", "dir",
                                                                            "illum_plate")}
        self._illum_values = [v if v in illum else None for v in self._labels["illum_plate"][0]]
        self._sites = self._table["site"].to_numpy()
        self._files = [self._table[f"file_{ch}"].chunk(0) if self._table.num_rows else None for ch in channels]
        self._etags = [self._table[f"etag_{ch}"].chunk(0) if self._table.num_rows else None for ch in channels]
        self._sizes = np.stack([self._table[f"size_{ch}"].to_numpy() for ch in channels], axis=1) \
            if self._table.num_rows else np.zeros((0, len(channels)), np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, position):  # type: ignore[override]
        if isinstance(position, slice):
            return [self._field(i) for i in range(*position.indices(len(self)))]
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"field position {position} out of range (0..{len(self) - 1})")
        return self._field(position)

    def _label(self, name: str, position: int) -> Any:
        values, codes = self._labels[name]
        return values[codes[position]]

    def _field(self, i: int) -> Field:
        directory = self._label("dir", i)
        illum_values, illum_codes = self._illum_values, self._labels["illum_plate"][1]
        return Field(
            id=self.ids[i],
            batch=self._label("batch", i),
            plate=self._label("plate", i),
            well=self._label("well", i),
            site=int(self._sites[i]),
            keys=tuple(directory + files[i].as_py() for files in self._files),
            sizes=tuple(int(size) for size in self._sizes[i]),
            illum_plate=illum_values[illum_codes[i]] if illum_codes[i] >= 0 else None,
            etags=tuple(etags[i].as_py() for etags in self._etags),
        )

    def distinct(self, name: str) -> list[str]:
        """Sorted distinct values of a label column present in the selection ("plate", "batch", …)."""
        values, codes = self._labels[name]
        return sorted({values[c] for c in np.unique(codes) if c >= 0})


def _dictionary(column: pa.ChunkedArray) -> tuple[list, np.ndarray]:
    """(distinct values, code per row; -1 for null) of a dictionary-encoded column."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not pa.types.is_dictionary(array.type):
        array = array.dictionary_encode()
    codes = array.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return array.dictionary.to_pylist(), codes


def _complete_mask(table: pa.Table, channels: tuple[str, ...]) -> pa.ChunkedArray:
    masks = [pc.is_valid(table[f"file_{ch}"]) for ch in channels]
    mask = masks[0]
    for other in masks[1:]:
        mask = pc.and_(mask, other)
    return mask


def _selected_columns(table: pa.Table, channels: tuple[str, ...]) -> pa.Table:
    names = ["id", "batch", "plate", "well", "site", "dir", "illum_plate"]
    return table.select(names + [f"{kind}_{ch}" for ch in channels for kind in ("file", "size", "etag")])


def _illum_for(catalog: Catalog, channels: tuple[str, ...]) -> dict[str, tuple[str | None, ...]]:
    """Per plate key, the illum key of each selected channel; plates without any are left out."""
    out = {}
    for plate_key, by_channel in catalog.illum.items():
        keys = tuple(by_channel.get(ch) for ch in channels)
        if any(keys):
            out[plate_key] = keys
    return out


def select_index(catalog: Catalog, spec: DatasetSpec) -> Index:
    """The Index of one dataset string: its channels (in order), complete fields only, max_samples spread."""
    channels = spec.channels
    table = _selected_columns(catalog.table, channels)
    mask = _complete_mask(table, channels)
    if not pc.all(mask).as_py():
        table = table.filter(mask)
    incomplete = catalog.table.num_rows - table.num_rows
    total = table.num_rows
    positions = spread(total, spec.max_samples)
    if positions is not None:
        table = table.take(pa.array(positions, pa.int64()))
    illum = _illum_for(catalog, channels)
    return Index(spec.text, channels, FieldTable(table, channels, illum), illum=illum, incomplete=incomplete,
                 unparsed=catalog.unparsed, unparsed_examples=list(catalog.unparsed_examples),
                 total_fields=total)


# ---- building --------------------------------------------------------------------------------------

def _location(spec: DatasetSpec) -> str:
    return spec.storage.describe()


def _check_not_empty(catalog: Catalog, spec: DatasetSpec, source: str | None) -> None:
    where = f"index file {source} (for {_location(spec)})" if source else _location(spec)
    if catalog.keys_seen == 0:
        hint = "fix index=/--keys-file" if source else spec.storage.fix_hint
        raise EmptyDatasetError(f"no objects under {where}: {hint} in the dataset string")
    if len(catalog) == 0:
        examples = ", ".join(catalog.unparsed_examples[:3])
        raise EmptyDatasetError(f"none of the {catalog.keys_seen} keys under {where} match the JUMP image "
                                f"layout {LAYOUT_EXAMPLE}; examples: {examples}")


def _check_has_fields(index: Index, spec: DatasetSpec) -> None:
    if not index.fields:
        raise EmptyDatasetError(f"all {index.incomplete} fields under {_location(spec)} miss one of the "
                                f"channels {', '.join(spec.channels)}: choose channels= among those imaged")


async def collect_catalog(spec: DatasetSpec, s3cfg: dict, *, source: str | None = None,
                          progress: Progress | None = None) -> Catalog:
    """List (or read) every key of the dataset location and group them, all channels kept."""
    builder = CatalogBuilder()
    endpoint = resolve_endpoint(s3cfg.get("endpoint_url"))
    try:
        if source:
            await read_index_file(source, spec, s3cfg, builder.add)
        else:
            await spec.storage.list_keys(spec, s3cfg, builder.add, progress)
    except PrefetchdError:
        raise
    except Exception as exc:
        raise classify_storage_error(exc, endpoint, spec.bucket, region=s3cfg.get("region") or "us-east-1") \
            from None
    catalog = await asyncio.to_thread(builder.finish)
    _check_not_empty(catalog, spec, source)
    return catalog


async def build_index(spec: DatasetSpec, s3cfg: dict, cache_dir: Path, *, refresh: bool = False,
                      progress: Progress | None = None, keys_file: str | None = None) -> Index:
    """The dataset's Index, from the on-disk cache when present (unless refresh), else listed and cached.

    `keys_file` reads the listing from that file instead of `spec.index` / LIST, and caches it under the
    dataset's own cache key, so the daemon's warm start uses it.
    """
    started = time.perf_counter()
    endpoint = resolve_endpoint(s3cfg.get("endpoint_url"))
    path = cache_file(cache_dir, spec.cache_key(endpoint))
    catalog = None if refresh else await asyncio.to_thread(load_catalog, path)
    from_cache = catalog is not None
    cache_error = None
    if catalog is None:
        catalog = await collect_catalog(spec, s3cfg, source=keys_file or spec.index, progress=progress)
        try:
            await asyncio.to_thread(save_catalog, path, catalog, location=_location(spec), endpoint=endpoint)
        except CacheWriteError as exc:
            cache_error = exc.message
    index = await asyncio.to_thread(select_index, catalog, spec)
    _check_has_fields(index, spec)
    index.from_cache = from_cache
    index.cache_path = None if cache_error else str(path)
    index.cache_error = cache_error
    index.seconds = time.perf_counter() - started
    return index


# ---- CLI: prefetchd index --------------------------------------------------------------------------

def run_async(coroutine: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio works the same
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


@contextlib.contextmanager
def listing_progress(console: Any) -> Iterator[Progress | None]:
    """A rich progress bar over plate folders listed, when stdout is a terminal; else no callback."""
    if not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    with RichProgress(TextColumn("listing folders"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[keys]:,} keys"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("index", total=None, keys=0)
        yield lambda done, total, keys: bar.update(task, completed=done, total=total or None, keys=keys)


def print_index_summary(index: Index, console: Any) -> None:
    console.print(f"fields:            {len(index.fields):,}")
    console.print(f"plates:            {len(index.plates):,}")
    console.print(f"batches:           {len(index.batches):,}")
    console.print(f"channels:          {', '.join(index.channels)}")
    console.print(f"incomplete fields: {index.incomplete:,} (missing a selected channel, skipped)")
    console.print(f"unparsed keys:     {index.unparsed:,}")
    for example in index.unparsed_examples[:5]:
        console.print(f"  e.g. {example}", markup=False)
    console.print(f"seconds:           {index.seconds:.2f}")
    console.print(f"cache:             {index.cache_path or 'not written'}", markup=False)


def cli_index(args: Any, config: Any) -> int:
    """`prefetchd index DATASET [--endpoint-url URL] [--keys-file FILE] [--refresh]`: always rebuilds."""
    from rich.console import Console

    from prefetchd.dataset import parse_dataset

    console = Console()
    s3cfg = dict(config.get("s3"))
    if getattr(args, "endpoint_url", None):
        s3cfg["endpoint_url"] = args.endpoint_url
    try:
        spec = parse_dataset(args.dataset)
        with listing_progress(console) as progress:
            index = run_async(build_index(spec, s3cfg, config.cache_dir, refresh=True, progress=progress,
                                          keys_file=getattr(args, "keys_file", None)))
    except PrefetchdError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print_index_summary(index, console)
    if index.cache_error:
        print(f"error: {index.cache_error}", file=sys.stderr)
        return 1
    return 0
