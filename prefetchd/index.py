"""The dataset index: which fields exist, which object holds each channel, where the illum files are.

Built once per (dataset location, endpoint) and cached on disk; see `build_index`. Where the keys come from,
in order: an `index=` file (keys, inventory, load_data, jump_index), the per-plate load_data beside the
images (`prefetchd.workspace`), a LIST (`prefetchd.listing`).
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

from prefetchd.arrow_columns import dictionary_codes
from prefetchd.catalog import Catalog, KeyCollector, Reports, assemble, spread
from prefetchd.channel_map import ChannelMaps
from prefetchd.dataset import DatasetSpec
from prefetchd.errors import DatasetError, EmptyDatasetError, PrefetchdError
from prefetchd.field_table import Field, FieldTable
from prefetchd.index_cache import CacheWriteError, cache_file, load_catalog, save_catalog
from prefetchd.index_summary import GroupSummary, index_summary, print_index_summary, summarise_groups
from prefetchd.jump_sources import optics_of
from prefetchd.layouts import LAYOUT_EXAMPLES
from prefetchd.listing import Progress, read_index_file
from prefetchd.load_data import TableReader
from prefetchd.plate_metadata import PlateTable, load_plate_table
from prefetchd.s3 import resolve_endpoint
from prefetchd.selection import PlateFilter, check_plate_types, explain_empty, plate_mask, well_mask
from prefetchd.storage_errors import classify_storage_error

__all__ = ["Field", "FieldTable", "GroupSummary", "Index", "build_index", "cli_index", "collect_catalog",
           "index_summary", "select_index"]


@dataclass
class Index:
    dataset: str                             # the dataset string it was built for
    channels: tuple[str, ...]
    fields: Sequence[Field]                  # sorted by plate, well, site; position = field index used everywhere
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
    unmapped: int = 0                        # image keys whose channel names no known stain
    groups: list[GroupSummary] = field(default_factory=list)
    optics: dict[str, dict] = field(default_factory=dict)   # source → microscope, pixel_size_um, shape
    discovery: dict = field(default_factory=dict)
    channel_maps: dict = field(default_factory=dict)

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
    def ids(self) -> Sequence[str]:
        if isinstance(self.fields, FieldTable):
            return self.fields.ids
        return [f.id for f in self.fields]

    def source_groups(self) -> tuple[list[str], np.ndarray]:
        """(names, per field the code of its name): its source, or its layout where the keys name none."""
        if isinstance(self.fields, FieldTable):
            return self.fields.source_groups()
        per_field = [f.source or f.layout for f in self.fields]
        names = sorted(set(per_field))
        code_of = {name: i for i, name in enumerate(names)}
        return names, np.array([code_of[n] for n in per_field], np.int32)

    def nominal_shape(self, group: str) -> tuple[int, int] | None:
        """The nominal (height, width) of a source's fields (`optics`), None when unknown."""
        shape = self.optics.get(group, {}).get("shape")
        return tuple(shape) if shape else None

    def pixel_size_um(self, positions: Sequence[int]) -> list[float | None]:
        """µm per pixel of the fields at `positions` (None where the microscope is unknown)."""
        if isinstance(self.fields, FieldTable):
            sizes = self.fields.pixel_size_um(positions)
            return [None if np.isnan(v) else round(float(v), 6) for v in sizes]
        return [self.fields[int(p)].pixel_size_um for p in positions]


# ---- catalog → index -------------------------------------------------------------------------------

def _complete_mask(table: pa.Table, channels: tuple[str, ...]) -> np.ndarray:
    mask = np.ones(table.num_rows, bool)
    for ch in channels:
        name = f"file_{ch}"
        if name not in table.column_names:
            return np.zeros(table.num_rows, bool)
        mask &= pc.is_valid(table[name]).to_numpy(zero_copy_only=False)
    return mask


def _illum_for(catalog: Catalog, channels: tuple[str, ...]) -> dict[str, tuple[str | None, ...]]:
    """Per plate key, the illum key of each selected channel; plates without any are left out."""
    out = {}
    for plate_key, by_channel in catalog.illum.items():
        keys = tuple(by_channel.get(ch) for ch in channels)
        if any(keys):
            out[plate_key] = keys
    return out


def _scope_mask(catalog: Catalog, spec: DatasetSpec) -> np.ndarray:
    """Rows in the selected plates and wells (raises on a selection value that matches nothing)."""
    plates = plate_mask(catalog.plates, spec.selection, catalog.plate_types, spec.plate_table or "")
    table = catalog.fields
    if not table.num_rows:
        return np.zeros(0, bool)
    mask = plates[table["plate"].to_numpy()]
    if spec.selection.well:
        wells, codes = dictionary_codes(table["well"])
        mask &= well_mask(wells.to_pylist(), spec.selection)[codes]
    return mask


def select_index(catalog: Catalog, spec: DatasetSpec) -> Index:
    """The Index of one dataset string: its plates and wells, its channels (in order), complete fields only,
    max_samples spread. The catalog's columns are not copied: the FieldTable keeps row positions."""
    channels = spec.channels
    in_scope = _scope_mask(catalog, spec)
    complete = _complete_mask(catalog.fields, channels)
    chosen = in_scope & complete
    total = int(chosen.sum())
    rows = None if total == len(chosen) else np.flatnonzero(chosen)
    positions = spread(total, spec.max_samples)
    if positions is not None:
        rows = (np.arange(total) if rows is None else rows)[np.array(positions, np.int64)]
    illum = _illum_for(catalog, channels)
    return Index(spec.text, channels, FieldTable(catalog.fields, rows, channels, catalog.plates, illum),
                 illum=illum, incomplete=int((in_scope & ~complete).sum()), unparsed=catalog.unparsed,
                 unparsed_examples=list(catalog.unparsed_examples), total_fields=total,
                 unmapped=catalog.unmapped, groups=summarise_groups(catalog, in_scope, complete),
                 optics=_optics(catalog, in_scope), discovery=dict(catalog.discovery),
                 channel_maps=dict(catalog.channel_maps))


def _optics(catalog: Catalog, in_scope: np.ndarray) -> dict[str, dict]:
    used = np.unique(catalog.fields["plate"].to_numpy()[in_scope]) if len(in_scope) else []
    kinds = {(catalog.plates[int(p)].source, catalog.plates[int(p)].layout) for p in used}
    return {source or layout: optics_of(source, layout).to_json() for source, layout in sorted(kinds)}


# ---- building --------------------------------------------------------------------------------------

def _location(spec: DatasetSpec) -> str:
    return spec.storage.describe()


def _check_not_empty(catalog: Catalog, spec: DatasetSpec, source: str | None) -> None:
    where = f"index file {source} (for {_location(spec)})" if source else _location(spec)
    if not len(catalog) and not source and (why := explain_empty(spec.selection, catalog.discovery, where)):
        raise DatasetError(why)
    if catalog.keys_seen == 0 and not len(catalog):
        hint = "fix index=/--keys-file" if source else spec.storage.fix_hint
        raise EmptyDatasetError(f"no objects under {where}: {hint} in the dataset string")
    if len(catalog) == 0:
        examples = ", ".join(catalog.unparsed_examples[:3])
        raise EmptyDatasetError(f"none of the {catalog.keys_seen} keys under {where} match a JUMP image "
                                f"layout ({LAYOUT_EXAMPLES}); examples: {examples}")


def _check_has_fields(index: Index, spec: DatasetSpec) -> None:
    if index.fields:
        return
    if index.unmapped:
        examples = [e for g in index.groups for e in g.unmapped_examples][:2]
        raise EmptyDatasetError(
            f"no field under {_location(spec)} has all of {', '.join(spec.channels)}: {index.unmapped} image "
            f"keys hold channels whose stain is unknown (e.g. {', '.join(examples)}); the stain of each file "
            "comes from the plate's load_data (workspace/load_data_csv/<batch>/<plate>/): copy it beside the "
            "images or pass index=<load_data or jump_index file>")
    if index.incomplete:
        raise EmptyDatasetError(f"all {index.incomplete} fields under {_location(spec)} miss one of the "
                                f"channels {', '.join(spec.channels)}: choose channels= among those imaged")
    raise EmptyDatasetError(f"the selection {spec.selection.scope() or 'of wells'} keeps no field of "
                            f"{_location(spec)}: widen source=, batch=, plate=, well= or plate_type=")


async def collect_catalog(spec: DatasetSpec, s3cfg: dict, *, source: str | None = None,
                          progress: Progress | None = None, plate_table: PlateTable | None = None) -> Catalog:
    """Read every key (or load_data row) of the dataset's locations and group them, all channels kept."""
    maps = ChannelMaps()
    reports = Reports()
    storage = spec.storage
    collector = KeyCollector(storage.context, origin="index file" if source else storage.key_origin)
    reader = TableReader(origin="index file" if source else "load_data", rebase=storage.rebase(),
                         keep=storage.keeps_folder(), maps=maps, reports=reports, context=storage.context)
    wanted = PlateFilter(spec.selection, plate_table)
    endpoint = resolve_endpoint(s3cfg.get("endpoint_url"))
    discovery: dict = {}
    try:
        if source:
            discovery["index_format"] = await read_index_file(source, spec, s3cfg, collector.add, reader.add)
        else:
            discovery = await storage.find_keys(s3cfg, reader=reader, collector=collector, wanted=wanted,
                                                plate_table=plate_table, progress=progress)
    except PrefetchdError:
        raise
    except Exception as exc:
        raise classify_storage_error(exc, endpoint, spec.bucket, region=s3cfg.get("region") or "us-east-1") \
            from None

    def finish() -> Catalog:
        parts = [reader.part(), collector.part(maps)]
        reports.merge(collector.reports)
        typing = (lambda info: (r.plate_type if (r := plate_table.find(info.source, info.batch, info.barcode))
                                else None)) if plate_table is not None else None
        catalog = assemble(parts, reports, collector.keys_seen + reader.rows_read, maps, typing)
        catalog.discovery = discovery
        catalog.plate_types = plate_table.plate_types if plate_table is not None else []
        return catalog

    catalog = await asyncio.to_thread(finish)
    _check_not_empty(catalog, spec, source)
    return catalog


async def build_index(spec: DatasetSpec, s3cfg: dict, cache_dir: Path, *, refresh: bool = False,
                      progress: Progress | None = None, keys_file: str | None = None) -> Index:
    """The dataset's Index, from the on-disk cache when present (unless refresh), else read and cached.

    `keys_file` reads the listing from that file instead of `spec.index` / load_data / LIST, and caches it
    under the dataset's own cache key, so the daemon's warm start uses it.
    """
    started = time.perf_counter()
    endpoint = resolve_endpoint(s3cfg.get("endpoint_url"))
    path = cache_file(cache_dir, spec.cache_key(endpoint))
    catalog = None if refresh else await asyncio.to_thread(load_catalog, path)
    from_cache = catalog is not None
    cache_error = None
    if catalog is None:
        plate_table = await load_plate_table(spec.plate_table, s3cfg) if spec.plate_table else None
        if plate_table is not None:
            check_plate_types(spec.selection, plate_table.plate_types, spec.plate_table)
        catalog = await collect_catalog(spec, s3cfg, source=keys_file or spec.index, progress=progress,
                                        plate_table=plate_table)
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
    """A rich progress bar over plates read or folders listed, when stdout is a terminal; else none."""
    if not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    with RichProgress(TextColumn("indexing plates"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[keys]:,} keys/rows"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("index", total=None, keys=0)
        yield lambda done, total, keys: bar.update(task, completed=done, total=total or None, keys=keys)


def cli_index(args: Any, config: Any) -> int:
    """`prefetchd index DATASET [--endpoint-url URL] [--keys-file FILE] [--json]`: always rebuilds."""
    import json

    from rich.console import Console

    from prefetchd.dataset import parse_dataset

    console = Console()
    if not console.is_terminal:          # a log or a pipe: full lines, nothing cut to 80 columns
        console = Console(width=240)
    s3cfg = dict(config.get("s3"))
    if getattr(args, "endpoint_url", None):
        s3cfg["endpoint_url"] = args.endpoint_url
    as_json = bool(getattr(args, "json", False))
    try:
        spec = parse_dataset(args.dataset)
        with listing_progress(console) if not as_json else contextlib.nullcontext(None) as progress:
            index = run_async(build_index(spec, s3cfg, config.cache_dir, refresh=True, progress=progress,
                                          keys_file=getattr(args, "keys_file", None)))
    except PrefetchdError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(index_summary(index), indent=2))
    else:
        print_index_summary(index, console)
    if index.cache_error:
        print(f"error: {index.cache_error}", file=sys.stderr)
        return 1
    return 0
