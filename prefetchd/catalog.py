"""The catalog: every parsed key of a dataset location, grouped into fields, for ALL channels.

A catalog is what gets cached on disk. It does not depend on which channels or how many samples a
dataset string asks for; `Catalog.select` turns it into the `Index` of one dataset string.

Table columns (one row per field, sorted by id): id, batch, plate, well, site, dir, illum_plate, and per
Phenix channel `file_<ch>` (null when missing), `size_<ch>` (-1 when unknown), `etag_<ch>` (null when
unknown). A channel's object key is `dir + file_<ch>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from prefetchd.channels import PHENIX_CHANNELS
from prefetchd.layout import barcode_of, illum_plate_key, parse_illum_key, parse_image_key

ALL_CHANNELS: tuple[str, ...] = tuple(PHENIX_CHANNELS)
MAX_UNPARSED_EXAMPLES = 20
METADATA_KEY = b"prefetchd.catalog"


@dataclass
class Catalog:
    table: pa.Table
    illum: dict[str, dict[str, str]] = field(default_factory=dict)  # plate key → channel → key
    unparsed: int = 0
    unparsed_examples: list[str] = field(default_factory=list)
    keys_seen: int = 0

    def __len__(self) -> int:
        return self.table.num_rows

    def metadata(self) -> dict:
        return {
            "illum": self.illum,
            "unparsed": self.unparsed,
            "unparsed_examples": self.unparsed_examples,
            "keys_seen": self.keys_seen,
        }

    def with_metadata(self, extra: dict) -> pa.Table:
        meta = {**self.metadata(), **extra}
        return self.table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})

    @classmethod
    def from_table(cls, table: pa.Table) -> tuple["Catalog", dict]:
        meta = json.loads((table.schema.metadata or {})[METADATA_KEY])
        catalog = cls(table, meta["illum"], meta["unparsed"], meta["unparsed_examples"], meta["keys_seen"])
        return catalog, meta

    @property
    def plates(self) -> int:
        return len(pc.unique(self.table["plate"]))

    @property
    def batches(self) -> int:
        return len(pc.unique(self.table["batch"]))


def spread(count: int, wanted: int | None) -> list[int] | None:
    """`wanted` evenly spaced positions in range(count) (None = all): a small subset still spans plates."""
    if wanted is None or wanted >= count:
        return None
    return [(i * count) // wanted for i in range(wanted)]


class CatalogBuilder:
    """Collects keys (with sizes and ETags) and groups them by field; `finish` sorts into a Catalog."""

    def __init__(self) -> None:
        self._row_of: dict[tuple[str, str, str, int], int] = {}
        self._interned: dict[str, str] = {}
        self._batch: list[str] = []
        self._folder: list[str] = []
        self._well: list[str] = []
        self._site: list[int] = []
        self._dir: list[str] = []
        self._files = {ch: [] for ch in ALL_CHANNELS}
        self._sizes = {ch: [] for ch in ALL_CHANNELS}
        self._etags = {ch: [] for ch in ALL_CHANNELS}
        self.illum: dict[str, dict[str, str]] = {}
        self.keys_seen = 0
        self.unparsed = 0
        self.unparsed_examples: list[str] = []

    def add(self, key: str, size: int = -1, etag: str | None = None) -> None:
        self.keys_seen += 1
        image = parse_image_key(key)
        if image is not None:
            row = self._row(image.batch, image.plate, image.well, image.site, image.directory)
            self._files[image.channel][row] = image.filename
            self._sizes[image.channel][row] = size
            self._etags[image.channel][row] = etag.strip('"') if etag else None
            return
        illum = parse_illum_key(key)
        if illum is not None:
            self.illum.setdefault(illum_plate_key(illum.batch, illum.barcode), {})[illum.channel] = key
            return
        self.unparsed += 1
        if len(self.unparsed_examples) < MAX_UNPARSED_EXAMPLES:
            self.unparsed_examples.append(key)

    def _intern(self, text: str) -> str:
        return self._interned.setdefault(text, text)

    def _row(self, batch: str, folder: str, well: str, site: int, directory: str) -> int:
        ident = (batch, folder, well, site)
        row = self._row_of.get(ident)
        if row is not None:
            return row
        row = self._row_of[ident] = len(self._site)
        self._batch.append(self._intern(batch))
        self._folder.append(self._intern(folder))
        self._well.append(self._intern(well))
        self._site.append(site)
        self._dir.append(self._intern(directory))
        for ch in ALL_CHANNELS:
            self._files[ch].append(None)
            self._sizes[ch].append(-1)
            self._etags[ch].append(None)
        return row

    def _plate_names(self) -> list[str]:
        """The plate folder; `<batch>/<folder>` when one folder name occurs in several batches."""
        batches_of: dict[str, set[str]] = {}
        for batch, folder in set(zip(self._batch, self._folder)):
            batches_of.setdefault(folder, set()).add(batch)
        shared = {folder for folder, batches in batches_of.items() if len(batches) > 1}
        if not shared:
            return self._folder
        return [f"{b}/{f}" if f in shared else f for b, f in zip(self._batch, self._folder)]

    def _illum_plates(self) -> list[str | None]:
        keys = {}
        for batch, folder in set(zip(self._batch, self._folder)):
            plate_key = illum_plate_key(batch, barcode_of(folder))
            keys[batch, folder] = plate_key if plate_key in self.illum else None
        return [keys[b, f] for b, f in zip(self._batch, self._folder)]

    def finish(self) -> Catalog:
        plates = self._plate_names()
        ids = [f"{p}/{w}/{s}" for p, w, s in zip(plates, self._well, self._site)]
        columns = {
            "id": pa.array(ids, pa.string()),
            "batch": pa.array(self._batch, pa.string()).dictionary_encode(),
            "plate": pa.array(plates, pa.string()).dictionary_encode(),
            "well": pa.array(self._well, pa.string()).dictionary_encode(),
            "site": pa.array(self._site, pa.int32()),
            "dir": pa.array(self._dir, pa.string()).dictionary_encode(),
            "illum_plate": pa.array(self._illum_plates(), pa.string()).dictionary_encode(),
        }
        for ch in ALL_CHANNELS:
            columns[f"file_{ch}"] = pa.array(self._files[ch], pa.string())
            columns[f"size_{ch}"] = pa.array(self._sizes[ch], pa.int64())
            columns[f"etag_{ch}"] = pa.array(self._etags[ch], pa.string())
        table = pa.table(columns)
        table = table.take(pc.sort_indices(table["id"]))
        return Catalog(table, self.illum, self.unparsed, self.unparsed_examples, self.keys_seen)
