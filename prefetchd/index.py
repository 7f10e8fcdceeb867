"""The dataset index: which fields exist, which object holds each channel, where the illum files are.

Built once per (dataset location, endpoint) and cached on disk; see `build_index`. Where the keys come from,
in order: an `index=` file (keys, inventory, load_data, jump_index), the per-plate load_data beside the
images (`prefetchd.workspace`), a LIST (`prefetchd.listing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Sequence as SequenceABC
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prefetchd.catalog import Catalog, KeyCollector, PlateInfo, Reports, assemble, spread
from prefetchd.channel_map import ChannelMaps
from prefetchd.channels import BRIGHTFIELD_CHANNELS, DEFAULT_CHANNELS
from prefetchd.dataset import DatasetSpec
from prefetchd.errors import DatasetError, EmptyDatasetError, PrefetchdError
from prefetchd.index_cache import CacheWriteError, cache_file, load_catalog, save_catalog
from prefetchd.jump_sources import optics_of
from prefetchd.layouts import LAYOUT_EXAMPLES
from prefetchd.listing import Progress, list_root, read_index_file
from prefetchd.load_data import TableReader, local_rebase, prefix_filter, s3_rebase
from prefetchd.plate_metadata import PlateTable, load_plate_table
from prefetchd.s3 import make_s3_client, resolve_endpoint
from prefetchd.selection import PlateFilter, check_plate_types, explain_empty, plate_mask, well_mask
from prefetchd.storage_errors import classify_storage_error
from prefetchd.workspace import WorkspaceIndexer, index_local

LAYOUT_EXAMPLE = LAYOUT_EXAMPLES
STAIN_ORDER = DEFAULT_CHANNELS + BRIGHTFIELD_CHANNELS


@dataclass(frozen=True)
class Field:
    """One field of view: `<plate>/<well>/<site>` with one object key per selected channel."""

    id: str                      # e.g. "BR00116991__2020-11-05T19_51_35-Measurement1/A01/1"
    batch: str                   # e.g. "2020_11_04_CPJUMP1"
    plate: str                   # unique plate name (the id's first part): plate folder, or source/batch/folder
    well: str                    # "A01"
    site: int                    # 1-based
    keys: tuple[str, ...]        # object keys (S3) or paths relative to root (local), in channel order
    sizes: tuple[int, ...]       # expected byte sizes (-1 when unknown)
    illum_plate: str | None      # key into Index.illum, None when no illum files
    etags: tuple[str | None, ...] = ()  # ETags from the listing without quotes (None when unknown)
    source: str = ""             # "source_4" ("" when the path does not say)
    layout: str = ""             # "phenix" | "yokogawa" | "imagexpress"
    barcode: str = ""            # Metadata_Plate
    pixel_size_um: float | None = None    # of the source's microscope (jump_sources), None when unknown
    shape: tuple[int, int] | None = None  # nominal (height, width); the TIFFs are what counts


@dataclass
class GroupSummary:
    """What `prefetchd index` prints per source and batch."""

    source: str
    batch: str
    layouts: list[str]
    plates: int
    fields: int                  # complete and selected
    incomplete: int              # selected plates/wells, missing a selected channel
    channels_found: list[str]    # stains with at least one file in the group
    origins: list[str]
    unparsed: int = 0
    unparsed_examples: list[str] = field(default_factory=list)
    unmapped: int = 0
    unmapped_examples: list[str] = field(default_factory=list)
    skipped: int = 0
    duplicates: int = 0
    notes: list[str] = field(default_factory=list)
    pixel_size_um: float | None = None
    shape: list[int] | None = None


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


# ---- catalog → index -------------------------------------------------------------------------------

class FieldIds(SequenceABC):
    """`Index.ids` of a FieldTable: "<plate>/<well>/<site>" made on access (8M ids would be ~1 GB)."""

    def __init__(self, table: "FieldTable"):
        self._t = table

    def __len__(self) -> int:
        return len(self._t)

    def __getitem__(self, position):  # type: ignore[override]
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        t = self._t
        return f"{t.plate_names[t.plate[position]]}/{t.well_values[t.well[position]]}/{t.site[position]}"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, SequenceABC)) and not isinstance(other, str):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        shown = ", ".join(repr(self[i]) for i in range(min(3, len(self))))
        return f"FieldIds([{shown}{', …' if len(self) > 3 else ''}] of {len(self)})"


class FieldTable(Sequence[Field]):
    """`Index.fields`: the selected fields held as Arrow/numpy columns; a `Field` is made when one is accessed.

    Building 8M `Field` objects (40M key strings) would take minutes; the daemon needs one at a time."""

    def __init__(self, table: pa.Table, channels: tuple[str, ...], plates: list[PlateInfo],
                 illum: dict[str, Any]):
        table = table.combine_chunks()
        self._channels = channels
        self.plates = plates
        self.plate_names = [p.name for p in plates]
        self.plate = table["plate"].to_numpy() if table.num_rows else np.zeros(0, np.int32)
        self.well_values, self.well = _dictionary(table["well"])
        self.site = table["site"].to_numpy() if table.num_rows else np.zeros(0, np.int32)
        self._dirs, self._dir = _dictionary(table["dir"])
        self._files = [_lookup(*_dictionary_arrow(table[f"file_{ch}"])) for ch in channels]
        sizes = [table[f"size_{ch}"].to_numpy() for ch in channels if f"size_{ch}" in table.column_names]
        self._sizes = np.stack(sizes, axis=1) if sizes and len(sizes) == len(channels) else None
        self._etags = [table[f"etag_{ch}"].chunk(0) if f"etag_{ch}" in table.column_names and table.num_rows
                       else None for ch in channels]
        self._illum_of = [p.illum if p.illum in illum else None for p in plates]
        self._optics = [optics_of(p.source, p.layout) for p in plates]
        self.ids = FieldIds(self)

    def __len__(self) -> int:
        return len(self.site)

    def __getitem__(self, position):  # type: ignore[override]
        if isinstance(position, slice):
            return [self._field(i) for i in range(*position.indices(len(self)))]
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"field position {position} out of range (0..{len(self) - 1})")
        return self._field(position)

    def _field(self, i: int) -> Field:
        plate_index = int(self.plate[i])
        plate = self.plates[plate_index]
        directory = self._dirs[self._dir[i]]
        keys = tuple(directory + name(codes[i]) for name, codes in self._files)
        sizes = tuple(int(s) for s in self._sizes[i]) if self._sizes is not None else (-1,) * len(keys)
        etags = tuple(etags[i].as_py() if etags is not None else None for etags in self._etags)
        optics = self._optics[plate_index]
        well = self.well_values[self.well[i]]
        return Field(id=f"{plate.name}/{well}/{self.site[i]}", batch=plate.batch, plate=plate.name, well=well,
                     site=int(self.site[i]), keys=keys, sizes=sizes, illum_plate=self._illum_of[plate_index],
                     etags=etags, source=plate.source, layout=plate.layout, barcode=plate.barcode,
                     pixel_size_um=optics.pixel_size_um, shape=optics.shape)

    def distinct(self, name: str) -> list[str]:
        """Sorted distinct values of a plate attribute present in the selection ("plate", "batch", …)."""
        attribute = "name" if name == "plate" else name
        return sorted({getattr(self.plates[p], attribute) for p in np.unique(self.plate)})


def _dictionary(column: pa.ChunkedArray) -> tuple[list, np.ndarray]:
    """(distinct values, code per row; -1 for null) of a dictionary-encoded column."""
    values, codes = _dictionary_arrow(column)
    return values.to_pylist(), codes


def _dictionary_arrow(column: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_dictionary(array.type):
        array = array.dictionary_encode()
    codes = array.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return array.dictionary, codes


PYTHON_DICTIONARY_MAX = 1_000_000   # file names held as Python strings up to this many; beyond, read from Arrow


def _lookup(values: pa.Array, codes: np.ndarray):
    """(code → file name, codes): a Python list for the usual few-thousand names, Arrow for millions."""
    if len(values) <= PYTHON_DICTIONARY_MAX:
        names = values.to_pylist()
        return names.__getitem__, codes
    return (lambda code: values[code].as_py()), codes


def _complete_mask(table: pa.Table, channels: tuple[str, ...]) -> np.ndarray:
    mask = np.ones(table.num_rows, bool)
    for ch in channels:
        name = f"file_{ch}"
        if name not in table.column_names:
            return np.zeros(table.num_rows, bool)
        mask &= pc.is_valid(table[name]).to_numpy(zero_copy_only=False)
    return mask


def _selected_columns(table: pa.Table, channels: tuple[str, ...]) -> pa.Table:
    names = ["plate", "well", "site", "dir"]
    names += [f"{kind}_{ch}" for ch in channels for kind in ("file", "size", "etag")
              if f"{kind}_{ch}" in table.column_names]
    return table.select(names)


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
    mask = plates[table["plate"].to_numpy()] if table.num_rows else np.zeros(0, bool)
    wells, codes = _dictionary(table["well"])
    chosen = well_mask(wells, spec.selection)
    if chosen is not None:
        mask &= chosen[codes]
    return mask


def select_index(catalog: Catalog, spec: DatasetSpec) -> Index:
    """The Index of one dataset string: its plates and wells, its channels (in order), complete fields only,
    max_samples spread."""
    channels = spec.channels
    in_scope = _scope_mask(catalog, spec)
    complete = _complete_mask(catalog.fields, channels)
    chosen = in_scope & complete
    total = int(chosen.sum())
    rows = np.flatnonzero(chosen)
    positions = spread(total, spec.max_samples)
    if positions is not None:
        rows = rows[np.array(positions, np.int64)]
    table = _selected_columns(catalog.fields, channels)
    if len(rows) != table.num_rows:
        table = table.take(pa.array(rows))
    illum = _illum_for(catalog, channels)
    groups = summarise_groups(catalog, spec, in_scope, complete)
    return Index(spec.text, channels, FieldTable(table, channels, catalog.plates, illum), illum=illum,
                 incomplete=int((in_scope & ~complete).sum()), unparsed=catalog.unparsed,
                 unparsed_examples=list(catalog.unparsed_examples), total_fields=total,
                 unmapped=catalog.unmapped, groups=groups, optics=_optics(catalog, in_scope),
                 discovery=dict(catalog.discovery), channel_maps=dict(catalog.channel_maps))


def _optics(catalog: Catalog, in_scope: np.ndarray) -> dict[str, dict]:
    used = np.unique(catalog.fields["plate"].to_numpy()[in_scope]) if len(in_scope) else []
    out = {}
    for p in used:
        info = catalog.plates[int(p)]
        out.setdefault(info.source or info.layout, optics_of(info.source, info.layout).to_json())
    return out


def summarise_groups(catalog: Catalog, spec: DatasetSpec, in_scope: np.ndarray, complete: np.ndarray) \
        -> list[GroupSummary]:
    """Per (source, batch): plates, fields, layouts, channels found, incomplete, what could not be used."""
    plates = catalog.plates
    names = sorted({p.group for p in plates} | set(catalog.reports))
    position = {name: i for i, name in enumerate(names)}
    group_of_plate = np.array([position[p.group] for p in plates] + [0], np.int64)
    plate_codes = catalog.fields["plate"].to_numpy() if len(catalog) else np.zeros(0, np.int32)
    group = group_of_plate[plate_codes]
    n = len(names)
    fields = np.bincount(group[in_scope & complete], minlength=n)
    incomplete = np.bincount(group[in_scope & ~complete], minlength=n)
    found: list[set[str]] = [set() for _ in names]
    for stain in catalog.stains:
        present = pc.is_valid(catalog.fields[f"file_{stain}"]).to_numpy(zero_copy_only=False)
        for g in np.flatnonzero(np.bincount(group[present & in_scope], minlength=n)):
            found[g].add(stain)
    used_plates = set(np.unique(plate_codes[in_scope]).tolist())
    out = []
    for g, name in enumerate(names):
        members = [p for i, p in enumerate(plates) if p.group == name and i in used_plates]
        report = catalog.reports.get(name)
        if not members and (report is None or not (report.unparsed or report.unmapped or report.notes)):
            continue
        source, batch = _split_group(name, members)
        optics = optics_of(source, members[0].layout) if members else None
        out.append(GroupSummary(
            source=source, batch=batch, layouts=sorted({p.layout for p in members}), plates=len(members),
            fields=int(fields[g]), incomplete=int(incomplete[g]),
            channels_found=[s for s in STAIN_ORDER if s in found[g]],
            origins=list(report.origins) if report else [],
            unparsed=report.unparsed if report else 0,
            unparsed_examples=list(report.unparsed_examples) if report else [],
            unmapped=report.unmapped if report else 0,
            unmapped_examples=list(report.unmapped_examples) if report else [],
            skipped=report.skipped if report else 0, duplicates=report.duplicates if report else 0,
            notes=list(report.notes) if report else [],
            pixel_size_um=optics.pixel_size_um if optics else None,
            shape=list(optics.shape) if optics and optics.shape else None))
    return out


def _split_group(name: str, members: list[PlateInfo]) -> tuple[str, str]:
    if members:
        return members[0].source, members[0].batch
    if name.startswith("source_") and "/" in name:
        source, _, batch = name.partition("/")
        return source, batch
    return "", name


# ---- building --------------------------------------------------------------------------------------

def _location(spec: DatasetSpec) -> str:
    return spec.root if spec.is_local else ", ".join(f"s3://{spec.bucket}/{list_root(p)}" for p in spec.prefixes)


def _check_not_empty(catalog: Catalog, spec: DatasetSpec, source: str | None) -> None:
    where = f"index file {source} (for {_location(spec)})" if source else _location(spec)
    if not len(catalog) and not source and (why := explain_empty(spec.selection, catalog.discovery, where)):
        raise DatasetError(why)
    if catalog.keys_seen == 0 and not len(catalog):
        hint = "fix index=/--keys-file" if source else ("fix root=" if spec.is_local else "fix prefix=")
        raise EmptyDatasetError(f"no objects under {where}: {hint} in the dataset string")
    if len(catalog) == 0:
        examples = ", ".join(catalog.unparsed_examples[:3])
        raise EmptyDatasetError(f"none of the {catalog.keys_seen} keys under {where} match a JUMP image "
                                f"layout ({LAYOUT_EXAMPLE}); examples: {examples}")


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
    context = os.path.abspath(spec.root) if spec.is_local else ""
    origin = "index file" if source else "LIST"
    collector = KeyCollector(context, origin="walk" if spec.is_local and not source else origin)
    reader = TableReader(origin="index file" if source else "load_data",
                         rebase=local_rebase(spec.root, spec.prefixes) if spec.is_local else s3_rebase(spec.prefixes),
                         keep=(lambda folder: True) if spec.is_local else prefix_filter(spec.prefixes),
                         maps=maps, reports=reports, context=context)
    wanted = PlateFilter(spec.selection, plate_table)
    endpoint = resolve_endpoint(s3cfg.get("endpoint_url"))
    discovery: dict = {}
    try:
        if source:
            discovery["index_format"] = await read_index_file(source, spec, s3cfg, collector.add, reader.add)
        elif spec.is_local:
            discovery["load_data_plates"] = await asyncio.to_thread(index_local, spec.root, reader, collector,
                                                                    wanted, progress)
        else:
            concurrency = int(s3cfg.get("list_concurrency", 16))
            async with make_s3_client(s3cfg, max_pool=concurrency) as client:
                indexer = WorkspaceIndexer(client, spec.bucket, reader=reader, collector=collector, wanted=wanted,
                                           plate_table=plate_table, concurrency=concurrency, progress=progress)
                try:
                    await indexer.index(spec.prefixes)
                except BaseExceptionGroup as group:
                    raise _first(group) from None
                discovery = asdict(indexer.stats)
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


def _first(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


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


def index_summary(index: Index) -> dict:
    """Everything `prefetchd index` prints, as JSON-ready data (`--json`)."""
    return {
        "dataset": index.dataset,
        "fields": len(index.fields),
        "total_fields": index.total_fields,
        "plates": len(index.plates),
        "batches": len(index.batches),
        "channels": list(index.channels),
        "incomplete": index.incomplete,
        "unparsed": index.unparsed,
        "unparsed_examples": index.unparsed_examples,
        "unmapped": index.unmapped,
        "groups": [asdict(g) for g in index.groups],
        "optics": index.optics,
        "channel_maps": index.channel_maps,
        "discovery": index.discovery,
        "seconds": round(index.seconds, 3),
        "from_cache": index.from_cache,
        "cache": index.cache_path,
    }


def print_index_summary(index: Index, console: Any) -> None:
    from rich.table import Table

    console.print(f"fields:            {len(index.fields):,}")
    console.print(f"plates:            {len(index.plates):,}")
    console.print(f"batches:           {len(index.batches):,}")
    console.print(f"channels:          {', '.join(index.channels)}")
    console.print(f"incomplete fields: {index.incomplete:,} (missing a selected channel, skipped)")
    console.print(f"unparsed keys:     {index.unparsed:,}")
    for example in index.unparsed_examples[:5]:
        console.print(f"  e.g. {example}", markup=False)
    if index.unmapped:
        console.print(f"unmapped channels: {index.unmapped:,} image keys whose stain is unknown (no load_data)")
    table = Table(title="per source and batch", title_justify="left")
    for column in ("source", "batch", "layout", "plates", "fields", "incomplete", "channels found", "from",
                   "unparsed", "unmapped", "µm/px"):
        table.add_column(column, justify="right" if column in ("plates", "fields", "incomplete", "unparsed",
                                                               "unmapped", "µm/px") else "left")
    for g in index.groups:
        table.add_row(g.source or "-", g.batch or "-", ",".join(g.layouts) or "-", f"{g.plates:,}",
                      f"{g.fields:,}", f"{g.incomplete:,}", ",".join(g.channels_found) or "-",
                      ",".join(g.origins) or "-", f"{g.unparsed:,}", f"{g.unmapped:,}",
                      f"{g.pixel_size_um:.3f}" if g.pixel_size_um else "-")
    console.print(table)
    for g in index.groups:
        label = "/".join(part for part in (g.source, g.batch) if part) or "(no source/batch)"
        for kind, examples in (("unparsed", g.unparsed_examples), ("unmapped", g.unmapped_examples),
                               ("note", g.notes)):
            for example in examples[:3]:
                console.print(f"  {label} {kind}: {example}", markup=False)
    d = index.discovery
    if "load_data_plates" in d and "folder_lists" in d:
        console.print(f"discovery:         {d['load_data_plates']:,} plates from load_data "
                      f"({d['load_data_gets']:,} GETs, {d['folder_lists']:,} folder LISTs), "
                      f"{len(d['listed_prefixes']):,} prefixes LISTed key by key ({d['list_requests']:,} LISTs)")
    console.print(f"seconds:           {index.seconds:.2f}")
    console.print(f"cache:             {index.cache_path or 'not written'}", markup=False)


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
