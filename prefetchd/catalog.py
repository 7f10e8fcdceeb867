"""The catalog: every field of a dataset location, for ALL channels, as one Arrow table plus its plates.

A catalog is what gets cached on disk. It does not depend on the channels, wells or max_samples a dataset
string selects (source, batch, plate and plate_type narrow which plates are read, and key the cache);
`index.select_index` turns it into the `Index` of one dataset string.

`Catalog.fields`, one row per field, sorted by plate name, well, site:

    plate          int32               position in `Catalog.plates`
    well           dictionary<string>  "A01"
    site           int32               1-based
    dir            dictionary<string>  the key prefix the channels' files share
    file_<stain>   dictionary<string>  null when the field has no file for that stain; key = dir + file
    size_<stain>   int64               (-1 unknown), and
    etag_<stain>   string              only when the source knew them (a LIST, an inventory)

Everything that is the same for a whole plate (source, batch, folder, barcode, layout, illum files) lives
once in `Catalog.plates`: 8M fields cost a few ints each, not eight strings.

Parts (`CatalogPart`) come from a LIST or keys file (`KeyCollector`), or from load_data / jump_index tables
(`prefetchd.load_data`); `assemble` merges them: plates by folder path (first part wins), rows sorted,
duplicate rows dropped and counted.
"""

from __future__ import annotations

import json
import re
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prefetchd.arrow_columns import dictionary_codes
from prefetchd.channel_map import ChannelMaps, fixed_stain
from prefetchd.channels import PHENIX_CHANNELS
from prefetchd.layouts import (
    barcode_of,
    family_of,
    folder_location,
    has_acquisition_time,
    illum_plate_key,
    parse_illum_key,
)

STAINS: tuple[str, ...] = tuple(PHENIX_CHANNELS)
MAX_EXAMPLES = 5                 # per (source, batch) group and kind
MAX_UNPARSED_EXAMPLES = 20       # over the whole catalog
METADATA_KEY = b"prefetchd.catalog"
LABEL = pa.dictionary(pa.int32(), pa.string())

_GROUP_OF_KEY = re.compile(r"(?:^|/)(source_\w+)/images/([^/]+)/")
_BATCH_OF_KEY = re.compile(r"(?:^|/)images/([^/]+)/(?:images|illum)/")


def group_name(source: str, batch: str) -> str:
    """The report group of a plate: "source_4/2021_04_26_Batch1", "2020_11_04_CPJUMP1", or ""."""
    return "/".join(part for part in (source, batch) if part)


def group_of_key(key: str, context: str = "") -> str:
    path = f"{context.rstrip('/')}/{key}" if context else key
    match = _GROUP_OF_KEY.search(path)
    if match:
        return group_name(match[1], match[2])
    match = _BATCH_OF_KEY.search(path)
    return match[1] if match else ""


# ---- plates and reports ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PlateInfo:
    """One imaging run of one plate: what every field of it shares."""

    path: str                    # key prefix of the plate folder, "…/images/<folder>/": unique by construction
    source: str                  # "source_4"; "" when the path does not say
    batch: str
    folder: str                  # the plate folder (barcode, maybe with acquisition time)
    barcode: str                 # Metadata_Plate
    layout: str                  # "phenix" | "yokogawa" | "imagexpress"
    name: str = ""               # unique over the catalog: the field id is "<name>/<well>/<site>"
    illum: str | None = None     # key into Catalog.illum, None when the plate has no illum files
    plate_type: str | None = None  # Metadata_PlateType from the plate table, when one was given

    @property
    def group(self) -> str:
        return group_name(self.source, self.batch)


@dataclass
class GroupReport:
    """What indexing one (source, batch) found beyond its fields: where from, and what it could not use."""

    origins: list[str] = field(default_factory=list)       # "load_data", "LIST", "index file"
    unparsed: int = 0                                        # keys that match no layout
    unparsed_examples: list[str] = field(default_factory=list)
    unmapped: int = 0                                        # image keys whose channel names no known stain
    unmapped_examples: list[str] = field(default_factory=list)
    skipped: int = 0                                         # thumbnails, stored beside the images on purpose
    duplicates: int = 0                                      # rows naming a field already seen
    notes: list[str] = field(default_factory=list)

    def add_origin(self, origin: str) -> None:
        if origin not in self.origins:
            self.origins.append(origin)

    def note(self, text: str) -> None:
        if text not in self.notes and len(self.notes) < MAX_EXAMPLES:
            self.notes.append(text)

    def count_unparsed(self, key: str) -> None:
        self.unparsed += 1
        if len(self.unparsed_examples) < MAX_EXAMPLES:
            self.unparsed_examples.append(key)

    def count_unmapped(self, key: str, times: int = 1) -> None:
        self.unmapped += times
        if len(self.unmapped_examples) < MAX_EXAMPLES:
            self.unmapped_examples.append(key)

    def merge(self, other: "GroupReport") -> None:
        for origin in other.origins:
            self.add_origin(origin)
        self.unparsed += other.unparsed
        self.unparsed_examples = (self.unparsed_examples + other.unparsed_examples)[:MAX_EXAMPLES]
        self.unmapped += other.unmapped
        self.unmapped_examples = (self.unmapped_examples + other.unmapped_examples)[:MAX_EXAMPLES]
        self.skipped += other.skipped
        self.duplicates += other.duplicates
        for text in other.notes:
            self.note(text)


class Reports(dict):
    """GroupReport per group name, created on first use."""

    def __missing__(self, group: str) -> GroupReport:
        report = self[group] = GroupReport()
        return report

    def merge(self, other: "Reports") -> None:
        for group, report in other.items():
            self[group].merge(report)


# ---- the catalog -----------------------------------------------------------------------------------

@dataclass
class Catalog:
    fields: pa.Table
    plates: list[PlateInfo]
    illum: dict[str, dict[str, str]] = field(default_factory=dict)   # illum plate key → stain → key
    reports: Reports = field(default_factory=Reports)
    keys_seen: int = 0                                                # keys or rows read
    channel_maps: dict[str, dict[str, str]] = field(default_factory=dict)  # learned, for the report
    discovery: dict = field(default_factory=dict)           # how the keys were found (requests, plates)
    plate_types: list[str] = field(default_factory=list)    # every type in the plate table used

    def __len__(self) -> int:
        return self.fields.num_rows

    @property
    def unparsed(self) -> int:
        return sum(report.unparsed for report in self.reports.values())

    @property
    def unparsed_examples(self) -> list[str]:
        examples = [key for report in self.reports.values() for key in report.unparsed_examples]
        return examples[:MAX_UNPARSED_EXAMPLES]

    @property
    def unmapped(self) -> int:
        return sum(report.unmapped for report in self.reports.values())

    @property
    def stains(self) -> tuple[str, ...]:
        return tuple(s for s in STAINS if f"file_{s}" in self.fields.column_names)

    def metadata(self) -> dict:
        return {
            "plates": [asdict(p) for p in self.plates],
            "illum": self.illum,
            "reports": {group: asdict(report) for group, report in self.reports.items()},
            "keys_seen": self.keys_seen,
            "channel_maps": self.channel_maps,
            "discovery": self.discovery,
            "plate_types": self.plate_types,
        }

    def with_metadata(self, extra: dict) -> pa.Table:
        meta = {**self.metadata(), **extra}
        return self.fields.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})

    @classmethod
    def from_table(cls, table: pa.Table) -> tuple["Catalog", dict]:
        meta = json.loads((table.schema.metadata or {})[METADATA_KEY])
        reports = Reports({group: GroupReport(**report) for group, report in meta["reports"].items()})
        catalog = cls(table.replace_schema_metadata(None), [PlateInfo(**p) for p in meta["plates"]],
                      meta["illum"], reports, meta["keys_seen"], meta.get("channel_maps", {}),
                      meta.get("discovery", {}), meta.get("plate_types", []))
        return catalog, meta


def spread(count: int, wanted: int | None) -> list[int] | None:
    """`wanted` evenly spaced positions in range(count) (None = all): a small subset still spans plates."""
    if wanted is None or wanted >= count:
        return None
    return [(i * count) // wanted for i in range(wanted)]


# ---- parts -----------------------------------------------------------------------------------------

@dataclass
class CatalogPart:
    """Fields from one source of keys; `fields.plate` indexes `plates` (names not assigned yet)."""

    fields: pa.Table
    plates: list[PlateInfo]
    illum: dict[str, dict[str, str]] = field(default_factory=dict)


def empty_fields() -> pa.Table:
    return pa.table({"plate": pa.array([], pa.int32()), "well": pa.array([], LABEL),
                     "site": pa.array([], pa.int32()), "dir": pa.array([], LABEL)})


def dictionary_column(codes: np.ndarray, values: list[str]) -> pa.DictionaryArray:
    """A dictionary array from int codes (-1 = null) and their values."""
    codes = np.asarray(codes, dtype=np.int32)
    indices = pa.array(codes, pa.int32(), mask=codes < 0) if (codes < 0).any() else pa.array(codes, pa.int32())
    return pa.DictionaryArray.from_arrays(indices, pa.array(values, pa.string()))


class KeyCollector:
    """Groups object keys (a LIST, a keys file, a local walk) into fields; `part()` resolves channels.

    Keys are kept as (field row, channel token, file) records until `part()`, because which stain a
    channel token holds may only be known once the load_data of another plate has been read.
    """

    def __init__(self, context: str = "", origin: str = "LIST"):
        self.context = context
        self.origin = origin
        self.keys_seen = 0
        self.reports = Reports()
        self.illum: dict[str, dict[str, str]] = {}
        self._plates: dict[str, int] = {}
        self._plate_info: list[PlateInfo] = []
        self._rows: dict[tuple[int, str, int], int] = {}
        self._row_plate = array("i")
        self._row_well: list[str] = []
        self._row_site = array("i")
        self._row_dir: list[str] = []
        self._tokens: dict[tuple[int, str], int] = {}               # (plate, channel token) → id
        self._folders: dict[tuple[str, str], int] = {}              # (image folder, family) → plate or -1
        self._project: list[str] = []                               # per plate, for the fixed tables
        self._token_example: list[str] = []
        self._rec_row = array("i")
        self._rec_token = array("i")
        self._rec_file = array("i")
        self._rec_size = array("q")
        self._rec_etag: list[str | None] = []
        self._strings: dict[str, int] = {}
        self._string_values: list[str] = []
        self._any_size = False
        self._any_etag = False

    def __len__(self) -> int:
        return len(self._row_site)

    def add(self, key: str, size: int = -1, etag: str | None = None) -> None:
        self.keys_seen += 1
        directory, _, filename = key.rpartition("/")
        family = family_of(filename)
        parsed = family.parse_file(filename) if family is not None else None
        if isinstance(parsed, tuple):
            plate = self._plate_of(directory, family)
            if plate >= 0:
                self._add_image(plate, directory, filename, parsed, key, size, etag)
                return
        elif parsed is not None:                      # a thumbnail
            self.reports[group_of_key(key, self.context)].skipped += 1
            return
        illum = parse_illum_key(key, self.context)
        if illum is not None:
            plate_key = illum_plate_key(illum.source, illum.batch, illum.barcode)
            self.illum.setdefault(plate_key, {})[illum.channel] = key
            return
        self.reports[group_of_key(key, self.context)].count_unparsed(key)

    def _plate_of(self, directory: str, family) -> int:
        """The plate of an image folder (-1: not under `<batch>/images/<plate>/`); parsed once per folder."""
        plate = self._folders.get((directory, family.NAME))
        if plate is not None:
            return plate
        where = folder_location(directory, self.context, family.IN_IMAGES_FOLDER)
        if where is None:
            plate = -1
        else:
            location, project = where
            path = directory[: -len("Images")] if family.IN_IMAGES_FOLDER else f"{directory}/"
            plate = self._plates.get(path, -1)
            if plate < 0:
                plate = self._plates[path] = len(self._plate_info)
                self._plate_info.append(PlateInfo(path, location.source, location.batch, location.plate,
                                                  barcode_of(location.plate), family.NAME))
                self._project.append(project)
                self.reports[group_name(location.source, location.batch)].add_origin(self.origin)
        self._folders[directory, family.NAME] = plate
        return plate

    def _add_image(self, plate: int, directory: str, filename: str, parsed: tuple, key: str, size: int,
                   etag: str | None) -> None:
        well, site, token = parsed
        ident = (plate, well, site)
        row = self._rows.get(ident)
        if row is None:
            row = self._rows[ident] = len(self._row_site)
            self._row_plate.append(plate)
            self._row_well.append(well)
            self._row_site.append(site)
            self._row_dir.append(directory + "/")
        token_id = self._tokens.get((plate, token))
        if token_id is None:
            token_id = self._tokens[plate, token] = len(self._token_example)
            self._token_example.append(key)
        self._rec_row.append(row)
        self._rec_token.append(token_id)
        code = self._strings.get(filename)
        if code is None:
            code = self._strings[filename] = len(self._string_values)
            self._string_values.append(filename)
        self._rec_file.append(code)
        if size >= 0:
            self._any_size = True
        self._rec_size.append(size)
        if etag:
            self._any_etag = True
            self._rec_etag.append(etag.strip('"'))
        else:
            self._rec_etag.append(None)

    def token_stains(self, maps: ChannelMaps) -> np.ndarray:
        """Stain position (in STAINS) per token id; -1 when unmapped (counted in the reports)."""
        out = np.full(len(self._token_example), -1, np.int64)
        records = np.bincount(np.frombuffer(self._rec_token, np.int32), minlength=len(out)) \
            if len(self._rec_token) else np.zeros(len(out), np.int64)
        for (plate, token), token_id in self._tokens.items():
            info = self._plate_info[plate]
            fixed = fixed_stain(info.layout, token, self._project[plate], info.source)
            stain = maps.stain(info.source, info.layout, token, fixed)
            if stain is None:
                self.reports[info.group].count_unmapped(self._token_example[token_id], int(records[token_id]))
            else:
                out[token_id] = STAINS.index(stain)
        return out

    def part(self, maps: ChannelMaps | None = None) -> CatalogPart:
        maps = maps or ChannelMaps()
        rows = len(self._row_site)
        wells = sorted(set(self._row_well))
        well_code = {w: i for i, w in enumerate(wells)}
        dirs = sorted(set(self._row_dir))
        dir_code = {d: i for i, d in enumerate(dirs)}
        columns: dict[str, pa.Array] = {
            "plate": pa.array(np.frombuffer(self._row_plate, np.int32) if rows else [], pa.int32()),
            "well": dictionary_column(np.array([well_code[w] for w in self._row_well], np.int32), wells),
            "site": pa.array(np.frombuffer(self._row_site, np.int32) if rows else [], pa.int32()),
            "dir": dictionary_column(np.array([dir_code[d] for d in self._row_dir], np.int32), dirs),
        }
        stain_of_token = self.token_stains(maps)
        rec_row = np.frombuffer(self._rec_row, np.int32) if len(self._rec_row) else np.zeros(0, np.int32)
        rec_stain = stain_of_token[np.frombuffer(self._rec_token, np.int32)] if len(self._rec_token) else \
            np.zeros(0, np.int64)
        rec_file = np.frombuffer(self._rec_file, np.int32) if len(self._rec_file) else np.zeros(0, np.int32)
        rec_size = np.frombuffer(self._rec_size, np.int64) if len(self._rec_size) else np.zeros(0, np.int64)
        etags = np.array(self._rec_etag, dtype=object)
        files = pa.array(self._string_values, pa.string())
        for position, stain in enumerate(STAINS):
            mine = rec_stain == position
            if not mine.any():
                continue
            codes = np.full(rows, -1, np.int32)
            codes[rec_row[mine]] = rec_file[mine]
            indices = pa.array(codes, pa.int32(), mask=codes < 0)
            columns[f"file_{stain}"] = pa.DictionaryArray.from_arrays(indices, files)
            if self._any_size:
                sizes = np.full(rows, -1, np.int64)
                sizes[rec_row[mine]] = rec_size[mine]
                columns[f"size_{stain}"] = pa.array(sizes, pa.int64())
            if self._any_etag:
                values = np.full(rows, None, dtype=object)
                values[rec_row[mine]] = etags[mine]
                columns[f"etag_{stain}"] = pa.array(values, pa.string())
        return CatalogPart(pa.table(columns), list(self._plate_info), dict(self.illum))


# ---- assembling parts into a catalog ---------------------------------------------------------------

def plate_names(plates: list[PlateInfo]) -> list[str]:
    """Unique plate names for field ids.

    A folder with an acquisition time names one imaging run: it is the name (today's cpg0000 ids), or
    `<batch>/<folder>` when the same folder occurs in several batches. Other folders (Yokogawa, ImageXpress,
    cpg0016 source 9) are reused across batches and sources: `<source>/<batch>/<folder>`. Whatever still
    collides (the same source/batch/folder under two projects) is named by its full path.
    """
    folders = Counter(p.folder for p in plates)
    batch_folders = Counter((p.batch, p.folder) for p in plates)
    names = []
    for p in plates:
        if has_acquisition_time(p.folder) and folders[p.folder] == 1:
            names.append(p.folder)
        elif has_acquisition_time(p.folder) and batch_folders[p.batch, p.folder] == 1:
            names.append(f"{p.batch}/{p.folder}")
        else:
            names.append("/".join(part for part in (p.source, p.batch, p.folder) if part))
    taken = Counter(names)
    return [name if taken[name] == 1 else p.path.rstrip("/") for name, p in zip(names, plates)]


def _ranks(values: list[str]) -> np.ndarray:
    order = np.argsort(np.array(values, dtype=object), kind="stable") if values else np.zeros(0, np.int64)
    ranks = np.empty(len(values), np.int64)
    ranks[order] = np.arange(len(values))
    return ranks


def _codes(column: pa.ChunkedArray | pa.Array) -> tuple[list[str], np.ndarray]:
    values, codes = dictionary_codes(column)
    return values.to_pylist(), codes


def _normalise(table: pa.Table) -> pa.Table:
    """Column types every part agrees on (labels as dictionary<int32, string>)."""
    for name in table.column_names:
        column = table[name]
        if name in ("well", "dir") or name.startswith("file_"):
            if not pa.types.is_dictionary(column.type):
                column = pc.dictionary_encode(column.cast(pa.string()))
            if column.type != LABEL:
                column = column.cast(LABEL)
            table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def assemble(parts: Iterable[CatalogPart], reports: Reports | None = None, keys_seen: int = 0,
             maps: ChannelMaps | None = None, plate_type: Callable[[PlateInfo], str | None] | None = None) \
        -> Catalog:
    """Merge parts into a catalog. Consumes the parts (their tables are released as they are merged, so an
    8M-row build holds two copies of the compact columns at most, not four)."""
    reports = reports if reports is not None else Reports()
    plates: list[PlateInfo] = []
    plate_of_path: dict[str, int] = {}
    tables: list[pa.Table] = []
    illum: dict[str, dict[str, str]] = {}
    for part in parts:
        for plate_key, by_stain in part.illum.items():
            illum.setdefault(plate_key, {}).update({s: k for s, k in by_stain.items()
                                                    if s not in illum.get(plate_key, {})})
        remap = np.full(len(part.plates), -1, np.int32)
        for i, info in enumerate(part.plates):
            if info.path not in plate_of_path:           # a plate already read from another part keeps those rows
                plate_of_path[info.path] = len(plates)
                plates.append(info)
                remap[i] = plate_of_path[info.path]
        if not part.fields.num_rows:
            continue
        codes = part.fields["plate"].to_numpy()
        mapped = remap[codes]
        table = part.fields.set_column(0, "plate", pa.array(mapped, pa.int32()))
        part.fields = empty_fields()
        if (mapped < 0).any():
            table = table.filter(pa.array(mapped >= 0))
        tables.append(_normalise(table))
        del table
    if tables:
        fields = pa.concat_tables(tables, promote_options="permissive")
        tables.clear()
        fields = fields.unify_dictionaries()
        for name in fields.column_names:      # parts that did not know sizes (load_data) say -1
            if name.startswith("size_") and fields[name].null_count:
                fields = fields.set_column(fields.schema.get_field_index(name), name,
                                           pc.fill_null(fields[name], -1))
    else:
        fields = empty_fields()
    names = plate_names(plates)
    plates = [_finish_plate(info, name, illum, plate_type) for info, name in zip(plates, names)]
    fields, duplicates = _sort_and_dedupe(fields, names)
    for plate, count in duplicates.items():
        reports[plates[plate].group].duplicates += count
    order = [f"file_{s}" for s in STAINS] + [f"size_{s}" for s in STAINS] + [f"etag_{s}" for s in STAINS]
    head = ["plate", "well", "site", "dir"]
    fields = fields.select(head + [name for name in order if name in fields.column_names])
    return Catalog(fields, plates, illum, reports, keys_seen, maps.to_json() if maps else {})


def _finish_plate(info: PlateInfo, name: str, illum: dict, plate_type) -> PlateInfo:
    key = illum_plate_key(info.source, info.batch, info.barcode)
    return PlateInfo(info.path, info.source, info.batch, info.folder, info.barcode, info.layout, name,
                     key if key in illum else None, plate_type(info) if plate_type else None)


def _sort_and_dedupe(fields: pa.Table, names: list[str]) -> tuple[pa.Table, Counter]:
    if not fields.num_rows:
        return fields, Counter()
    plate = fields["plate"].to_numpy()
    wells, well_codes = _codes(fields["well"])
    site = fields["site"].to_numpy()
    plate_rank = _ranks(names)[plate]
    well_rank = _ranks(wells)[well_codes]
    order = np.lexsort((site, well_rank, plate_rank))
    plate_rank, well_rank, site = plate_rank[order], well_rank[order], site[order]
    duplicate = np.zeros(len(order), bool)
    duplicate[1:] = (plate_rank[1:] == plate_rank[:-1]) & (well_rank[1:] == well_rank[:-1]) & (site[1:] == site[:-1])
    if not (np.diff(order) == 1).all() or fields["plate"].num_chunks > 1:
        fields = fields.take(pa.array(order))       # one copy, in order, one chunk
    counts: Counter = Counter()
    if duplicate.any():
        counts.update(fields["plate"].to_numpy()[duplicate].tolist())
        fields = fields.filter(pa.array(~duplicate))
    return fields, counts
