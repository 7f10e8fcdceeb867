"""load_data and jump_index tables → catalog parts: vectorised, one record batch at a time.

CellProfiler LoadData tables (`load_data.csv`, `load_data_with_illum.parquet`) name every site's files per
stain: `FileName_Orig<Stain>` + `PathName_Orig<Stain>` (a folder, `s3://…/` or a mount path), or
`URL_Orig<Stain>`, with `Metadata_Plate`, `Metadata_Well`, `Metadata_Site` (and in cpg0016
`Metadata_Source`, `Metadata_Batch`); `_Illum<Stain>` columns name the plate's illumination functions.
The whole-release `jump_index.parquet` has the same shape with URL columns, one row per site.

Strings are handled by Arrow compute, a record batch at a time; Python only sees what is per plate
(folders, barcodes) or per well name, so an 8M-row index builds in bounded memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prefetchd.catalog import LABEL, STAINS, CatalogPart, PlateInfo, Reports, group_name
from prefetchd.channel_map import ChannelMaps
from prefetchd.channels import canonical_stain
from prefetchd.errors import DatasetError
from prefetchd.layouts import FAMILIES, illum_plate_key, layout_of_file, plate_location, well_name

_STAIN_COLUMN = re.compile(r"^(FileName|PathName|URL)_(Orig|Illum)(.+)$")
_URL_HOST = re.compile(r"^(?:s3|https?)://[^/]+/")
_YOKOGAWA_REST = re.compile(r"[A-Za-z]{1,2}\d\d_T\d{4}F.*$")
_METADATA = {  # our name → accepted column names, first found wins
    "source": ("Metadata_Source", "source"),
    "batch": ("Metadata_Batch", "batch"),
    "plate": ("Metadata_Plate", "plate"),
    "well": ("Metadata_Well", "well"),
    "site": ("Metadata_Site", "site"),
}
SHAPE_HINT = ("Metadata_Plate, Metadata_Well, Metadata_Site and FileName_Orig<Stain> + PathName_Orig<Stain> "
              "(or URL_Orig<Stain>) columns")

Rebase = Callable[[str], "str | None"]   # a load_data folder (URL or path) → key-form folder, None to drop


@dataclass
class StainColumns:
    """Which columns give each stain's files: ("url", column) or ("path", path column, file column)."""

    orig: dict[str, tuple[str, ...]] = field(default_factory=dict)
    illum: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, names: Iterable[str]) -> "StainColumns":
        names = list(names)
        found = cls()
        for name in names:
            match = _STAIN_COLUMN.fullmatch(name)
            if match is None or match[1] == "PathName":
                continue
            kind, role, raw = match.groups()
            stain = canonical_stain(raw)
            if stain is None:
                found.ignored.append(name)
                continue
            target = found.orig if role == "Orig" else found.illum
            if kind == "URL":
                target.setdefault(stain, ("url", name))
            elif f"PathName_{role}{raw}" in names:
                target[stain] = ("path", f"PathName_{role}{raw}", name)
        found.orig = {s: found.orig[s] for s in STAINS if s in found.orig}
        return found


def wanted_columns(names: Iterable[str]) -> list[str]:
    """The columns a TableReader uses: metadata and every stain's file columns."""
    accepted = {name for names_ in _METADATA.values() for name in names_}
    return [n for n in names if n in accepted or _STAIN_COLUMN.fullmatch(n)]


def s3_rebase(prefixes: tuple[str, ...]) -> Rebase:
    """Folders as keys of the dataset's bucket: `s3://bucket/k` → k; a mount path is cut at the project."""
    projects = sorted({p.split("/", 1)[0] for p in prefixes if p})

    def rebase(folder: str) -> str | None:
        folder = folder.rstrip("/")
        if _URL_HOST.match(folder):
            return _URL_HOST.sub("", folder)
        for project in projects:
            at = folder.find(f"/{project}/")
            if at >= 0:
                return folder[at + 1:]
            if folder.startswith(f"{project}/"):
                return folder
        match = re.search(r"(?:^|/)(source_\w+/images/.+)$", folder)
        if match and len(projects) == 1:
            return f"{projects[0]}/{match[1]}"
        return folder.lstrip("/")
    return rebase


def local_rebase(root: str, prefixes: tuple[str, ...] = ()) -> Rebase:
    """Folders as paths relative to a local root (what `aws s3 sync` left), from URLs, keys or paths."""
    import os

    absolute = os.path.abspath(root).rstrip("/")
    root_parts = [p for p in absolute.split("/") if p]
    as_key = s3_rebase(prefixes)

    def rebase(folder: str) -> str | None:
        folder = folder.rstrip("/")
        if folder.startswith(absolute + "/"):
            return folder[len(absolute) + 1:]
        key = as_key(folder) or ""
        parts = [p for p in key.split("/") if p]
        # the longest tail of the root that starts the key: root …/cpg0016-jump/source_4/images, key
        # cpg0016-jump/source_4/images/<batch>/… → <batch>/…
        for start in range(len(root_parts)):
            tail = root_parts[start:]
            if parts[: len(tail)] == tail:
                return "/".join(parts[len(tail):])
        return None
    return rebase


def prefix_filter(prefixes: tuple[str, ...]) -> Callable[[str], bool]:
    wanted = tuple(f"{p}/" for p in prefixes if p)

    def keep(key_folder: str) -> bool:
        return not wanted or f"{key_folder}/".startswith(wanted)
    return keep


def _column(table: pa.Table | pa.RecordBatch, ours: str) -> pa.Array | None:
    for name in _METADATA[ours]:
        if name in table.column_names:
            column = table.column(name)
            return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return None


def _strings(array: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if not pa.types.is_string(array.type) and not pa.types.is_large_string(array.type):
        array = array.cast(pa.string())
    return array


def _split_url(urls: pa.Array) -> tuple[pa.Array, pa.Array]:
    """URL column → (folder, file name) at the last "/", null where the URL is null or has no "/"."""
    urls = _strings(urls)
    parts = pc.split_pattern(urls, "/", max_splits=1, reverse=True)
    lengths = pc.list_value_length(parts)
    if not urls.null_count and pc.min(lengths).as_py() == 2:       # the usual case, half the work
        folder, file = pc.list_element(parts, 0), pc.list_element(parts, 1)
    else:
        usable = pc.fill_null(pc.equal(lengths, 2), False)
        safe = pc.if_else(usable, parts, pa.scalar(["", ""], parts.type))
        folder = pc.list_element(safe, 0)
        file = pc.if_else(usable, pc.list_element(safe, 1), pa.scalar(None, pa.string()))
    if pc.any(pc.equal(file, "")).as_py():
        file = pc.if_else(pc.fill_null(pc.equal(file, ""), True), pa.scalar(None, pa.string()), file)
    return folder, file


def _files_and_folders(table, spec: tuple[str, ...]) -> tuple[pa.Array, pa.Array]:
    """(folder, file) per row for one stain, file null when the row has none."""
    if spec[0] == "url":
        return _split_url(table.column(spec[1]))
    folder, file = _strings(_column_of(table, spec[1])), _strings(_column_of(table, spec[2]))
    file = pc.if_else(pc.fill_null(pc.equal(file, ""), True), pa.scalar(None, pa.string()), file)
    return folder, file


def _column_of(table, name: str) -> pa.Array:
    column = table.column(name)
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


class TableReader:
    """Turns load_data-shaped tables or record batches into one CatalogPart; learns channel tokens."""

    def __init__(self, *, origin: str, rebase: Rebase, keep: Callable[[str], bool], maps: ChannelMaps,
                 reports: Reports, context: str = ""):
        self.origin = origin
        self.rebase = rebase
        self.keep = keep
        self.maps = maps
        self.reports = reports
        self.context = context
        self.rows_read = 0
        self.rows_kept = 0
        self.base: str | None = None          # "<project>/<source>/images/<batch>" of the plate being read
        self.plates: list[PlateInfo] = []
        self._plate_of_path: dict[str, int] = {}
        self._stem: list[str] = []            # per plate: the file-name prefix moved into `dir` (Yokogawa)
        self._image_dir: list[str] = []       # per plate: the folder its image files are in, with "/"
        self._well_values: list[str] = []
        self._well_code: dict[str, int] = {}
        self._folder_plate: dict[str, int] = {}   # normalised folder → plate (or -1: dropped)
        self.illum: dict[str, dict[str, str]] = {}
        self._tables: list[pa.Table] = []
        self._columns: StainColumns | None = None
        self._schema_names: list[str] | None = None

    # -- per batch -----------------------------------------------------------------------------------

    def add(self, batch: pa.RecordBatch | pa.Table, where: str = "") -> None:
        if batch.num_rows == 0:
            return
        names = batch.column_names
        if names != self._schema_names:
            self._schema_names = names
            self._columns = StainColumns.of(names)
            self._check_shape(batch, where)
        columns = self._columns
        self.rows_read += batch.num_rows
        folders, files = {}, {}
        for stain, spec in columns.orig.items():
            folder, file = _files_and_folders(batch, spec)
            folders[stain] = pc.if_else(pc.is_valid(file), folder, pa.scalar(None, pa.string()))
            files[stain] = file
        any_folder = pc.coalesce(*folders.values())       # a row's folder: that of its first stain with a file
        plate = self._plates_of(batch, any_folder, pc.coalesce(*files.values()))
        same_folder = self._same_folder_mask(folders, any_folder)
        split = (plate >= 0) & ~same_folder
        if split.any():
            self.reports[self.plates[int(plate[split][0])].group].note(
                f"{int(split.sum())} rows whose channels lie in different folders were left out")
        wells, sites = self._wells_and_sites(batch)
        bad = (plate >= 0) & same_folder & (wells < 0)
        if bad.any():
            self.reports[self.plates[int(plate[bad][0])].group].note(
                f"{int(bad.sum())} rows with an unusable Metadata_Well or Metadata_Site were left out")
        keep = (plate >= 0) & same_folder & (wells >= 0)
        rows = np.flatnonzero(keep)
        if not len(rows):
            return
        self.rows_kept += len(rows)
        rows = rows[np.argsort(plate[rows], kind="stable")]      # each plate one contiguous run
        take = pa.array(rows)
        plate = plate[rows]
        starts = np.flatnonzero(np.r_[True, plate[1:] != plate[:-1]])
        runs = [(int(plate[a]), int(a), int(b)) for a, b in zip(starts, np.r_[starts[1:], len(plate)])]
        stain_files = {stain: files[stain].take(take) for stain in columns.orig}
        stripped = self._strip_stems(stain_files, runs)
        dir_codes = 2 * plate + np.where(stripped, 0, 1)
        out = {
            "plate": pa.array(plate, pa.int32()),
            "well": pa.DictionaryArray.from_arrays(pa.array(wells[rows], pa.int32()),
                                                   pa.array(self._well_values, pa.string())),
            "site": pa.array(sites[rows], pa.int32()),
            "dir": pa.DictionaryArray.from_arrays(pa.array(dir_codes, pa.int32()), self._dir_values()),
        }
        for stain, stain_column in stain_files.items():
            out[f"file_{stain}"] = pc.dictionary_encode(stain_column).cast(LABEL)
        self._learn_tokens(out, runs, stripped, columns)
        self._read_illum(batch, rows, runs, columns)
        self._tables.append(pa.table(out))

    def _dir_values(self) -> pa.Array:
        """Two dir entries per plate: with its file-name stem (2p) and without (2p + 1)."""
        values = []
        for p in range(len(self.plates)):
            values += [self._image_dir[p] + self._stem[p], self._image_dir[p]]
        return pa.array(values, pa.string())

    def _check_shape(self, batch, where: str) -> None:
        missing = [ours for ours in ("well", "site") if _column(batch, ours) is None]
        if not self._columns.orig or missing:
            what = "no FileName_Orig<Stain>/PathName_Orig<Stain> or URL_Orig<Stain> columns" if not \
                self._columns.orig else f"no {' or '.join(_METADATA[m][0] for m in missing)} column"
            raise DatasetError(f"{where or self.origin} has {what}: a load_data table needs {SHAPE_HINT}")
        if self._columns.ignored:
            self.reports[""].note(f"columns with no known stain ignored: {', '.join(self._columns.ignored)}")

    def _plates_of(self, batch, folders: pa.Array, files: pa.Array) -> np.ndarray:
        """Plate position per row (-1: dropped: outside the prefixes, no file, or not an image folder)."""
        encoded = pc.dictionary_encode(folders)
        values = encoded.dictionary.to_pylist()
        codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
        present, first = np.unique(codes, return_index=True)
        first_row = {int(code): int(row) for code, row in zip(present, first) if code >= 0}
        barcodes = _column(batch, "plate")
        sources, batches = _column(batch, "source"), _column(batch, "batch")
        lookup = np.full(len(values) + 1, -1, np.int64)
        for code, raw in enumerate(values):
            row = first_row.get(code)
            if row is None:
                continue
            meta = {name: (None if column is None else column[row].as_py())
                    for name, column in (("plate", barcodes), ("source", sources), ("batch", batches))}
            lookup[code] = self._plate(raw, files[row].as_py(), meta)
        plate = lookup[codes]
        no_file = pc.is_null(files).to_numpy(zero_copy_only=False)
        plate[no_file] = -1
        return plate

    def _plate(self, raw_folder: str, sample_file: str | None, meta: dict) -> int:
        known = self._folder_plate.get(raw_folder)
        if known is not None:
            return known
        folder = self._rebase(raw_folder)
        plate = -1
        if folder is not None and self.keep(folder) and sample_file:
            layout = layout_of_file(sample_file) or ("phenix" if folder.endswith("/Images") else "yokogawa")
            where = plate_location(folder, self.context)
            has_images = folder.endswith("/Images") or folder == "Images"
            path = folder[: -len("Images")] if has_images else f"{folder}/"
            if path == "/":
                path = ""
            if where is None:   # not under <batch>/images/<plate>/: keep it, named by what load_data says
                where_source, where_batch = str(meta["source"] or ""), str(meta["batch"] or "")
                plate_folder = path.rstrip("/").rsplit("/", 1)[-1] or str(meta["plate"] or "")
            else:
                where_source = where.source or str(meta["source"] or "")
                where_batch = where.batch or str(meta["batch"] or "")
                plate_folder = where.plate
            plate = self._plate_of_path.get(path)
            if plate is None:
                plate = self._plate_of_path[path] = len(self.plates)
                barcode = str(meta["plate"]) if meta["plate"] not in (None, "") else plate_folder.split("__")[0]
                self.plates.append(PlateInfo(path, where_source, where_batch, plate_folder, barcode, layout))
                self._stem.append(_stem_of(sample_file, layout))
                self._image_dir.append(f"{folder}/" if folder else "")
                self.reports[group_name(where_source, where_batch)].add_origin(self.origin)
        self._folder_plate[raw_folder] = plate
        return plate

    def _rebase(self, raw_folder: str) -> str | None:
        """A load_data folder as a key; a mount path (`/home/ubuntu/bucket/projects/…/<batch>/images/…`) that
        names the batch being read is placed under that batch's key prefix."""
        folder = self.rebase(raw_folder)
        if folder is not None and self.keep(folder) or self.base is None:
            return folder
        batch = self.base.rsplit("/", 1)[-1]
        for marker in (f"/{batch}/images/", f"/{batch}/illum/"):
            at = raw_folder.find(marker)
            if at >= 0:
                return self.base + raw_folder.rstrip("/")[at + len(batch) + 1:]
        return folder

    def _same_folder_mask(self, folders: dict, any_folder: pa.Array) -> np.ndarray:
        same = np.ones(len(any_folder), bool)
        for folder in folders.values():
            # a row without this stain (null folder) does not count as a different folder
            same &= pc.fill_null(pc.equal(folder, any_folder), True).to_numpy(zero_copy_only=False)
        return same

    def _wells_and_sites(self, batch) -> tuple[np.ndarray, np.ndarray]:
        wells = pc.dictionary_encode(_strings(_column(batch, "well")))
        lookup = np.full(len(wells.dictionary) + 1, -1, np.int64)
        for code, raw in enumerate(wells.dictionary.to_pylist()):
            name = well_name(raw) if raw else None
            if name is not None:
                if name not in self._well_code:
                    self._well_code[name] = len(self._well_values)
                    self._well_values.append(name)
                lookup[code] = self._well_code[name]
        codes = lookup[wells.indices.fill_null(-1).to_numpy(zero_copy_only=False)]
        site_column = _column(batch, "site")
        try:
            sites = pc.cast(site_column, pa.int32()).fill_null(0).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            sites = np.array([_int_or_zero(v) for v in site_column.to_pylist()], np.int32)
        codes[sites <= 0] = -1
        return codes, sites

    def _strip_stems(self, files: dict[str, pa.Array], runs: list[tuple[int, int, int]]) -> np.ndarray:
        """Yokogawa names start with the plate (`<plate>_A01_T0001…`): move that into `dir`, so the remaining
        names repeat across plates and their dictionary stays small. Returns which rows were stripped (a row
        is stripped only when every channel's name starts with the plate's stem)."""
        rows = len(next(iter(files.values())))
        stripped = np.zeros(rows, bool)
        yokogawa = [(p, a, b) for p, a, b in runs if self._stem[p]]
        if not yokogawa:
            return stripped
        for p, a, b in yokogawa:
            ok = np.ones(b - a, bool)
            for column in files.values():
                ok &= pc.fill_null(pc.starts_with(column.slice(a, b - a), pattern=self._stem[p]), True) \
                    .to_numpy(zero_copy_only=False)
            stripped[a:b] = ok
        mask = pa.array(stripped)
        for stain, column in files.items():
            pieces = []
            for p, a, b in runs:
                piece = column.slice(a, b - a)
                if self._stem[p]:
                    cut = pc.utf8_slice_codeunits(piece, start=len(self._stem[p]))
                    piece = pc.if_else(mask.slice(a, b - a), cut, piece)
                pieces.append(piece)
            files[stain] = pa.concat_arrays(pieces)
        return stripped

    def _learn_tokens(self, out: dict, runs: list, stripped: np.ndarray, columns: StainColumns) -> None:
        families = {family.NAME: family for family in FAMILIES}
        for p, a, _ in runs:
            info = self.plates[p]
            family = families.get(info.layout)
            if family is None:
                continue
            stem = self._stem[p] if stripped[a] else ""
            for stain in columns.orig:
                name = out[f"file_{stain}"][a].as_py()
                parsed = family.parse_file(stem + name) if name else None
                if isinstance(parsed, tuple):
                    self.maps.learn(info.source, info.layout, parsed[2], stain)

    def _read_illum(self, batch, rows: np.ndarray, runs: list, columns: StainColumns) -> None:
        if not columns.illum:
            return
        for p, a, _ in runs:
            info = self.plates[p]
            plate_key = illum_plate_key(info.source, info.batch, info.barcode)
            if plate_key in self.illum:
                continue
            one_row = batch.slice(int(rows[a]), 1)
            found = {}
            for stain, spec in columns.illum.items():
                folder, file = _files_and_folders(one_row, spec)
                folder, file = folder[0].as_py(), file[0].as_py()
                key_folder = self._rebase(folder) if folder and file else None
                if key_folder is not None:
                    found[stain] = f"{key_folder}/{file}" if key_folder else file
            if found:
                self.illum[plate_key] = found

    # -- result --------------------------------------------------------------------------------------

    def part(self) -> CatalogPart:
        from prefetchd.catalog import empty_fields
        if not self._tables:
            return CatalogPart(empty_fields(), list(self.plates), dict(self.illum))
        dirs = self._dir_values()
        tables = []
        batches, self._tables = self._tables, []           # handed over: the reader keeps no copy
        for table in batches:  # every batch's dir dictionary is refreshed to the final stems
            indices = table["dir"].combine_chunks().indices
            tables.append(table.set_column(table.schema.get_field_index("dir"), "dir",
                                           pa.DictionaryArray.from_arrays(indices, dirs)))
        # chunks keep their batch's dictionaries: `assemble` unifies once, for every part together
        return CatalogPart(pa.concat_tables(tables, promote_options="permissive"), list(self.plates),
                           dict(self.illum))


def _stem_of(sample_file: str | None, layout: str) -> str:
    if layout != "yokogawa" or not sample_file:
        return ""
    match = _YOKOGAWA_REST.search(sample_file)
    return sample_file[: match.start()] if match else ""


def _int_or_zero(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
