"""`Index.fields` over a catalog: the selected rows as numpy codes; a `Field` is made when one is accessed.

8M `Field` objects (40M key strings) would take minutes and gigabytes; the daemon needs one at a time. The
catalog's columns stay in Arrow (memory-mapped from the cache file); what is kept per row is a handful of
int32 codes, and a file name is read from the Arrow dictionary's bytes on access, never turned into 700k
Python strings up front.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from prefetchd.arrow_columns import dictionary_codes
from prefetchd.catalog import PlateInfo
from prefetchd.jump_sources import optics_of


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


class Strings:
    """code → str over an Arrow string array's buffers (no Python object per entry until asked)."""

    def __init__(self, array: pa.Array):
        if pa.types.is_large_string(array.type):
            width = np.int64
        else:
            array = array.cast(pa.string())
            width = np.int32
        buffers = array.buffers()
        self._offsets = np.frombuffer(buffers[1], width, count=len(array) + 1, offset=array.offset * width().itemsize)
        self._data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
        self._length = len(array)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, code: int) -> str:
        return self._data[self._offsets[code]:self._offsets[code + 1]].tobytes().decode()


def plain_codes(column: pa.ChunkedArray) -> np.ndarray:
    return column.to_numpy() if column.num_chunks != 1 else column.chunk(0).to_numpy(zero_copy_only=False)


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
        if isinstance(other, SequenceABC) and not isinstance(other, str):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        shown = ", ".join(repr(self[i]) for i in range(min(3, len(self))))
        return f"FieldIds([{shown}{', …' if len(self) > 3 else ''}] of {len(self)})"


class FieldTable(Sequence[Field]):
    """The rows `rows` (None: all) of a catalog's fields table, for the given channels."""

    def __init__(self, table: pa.Table, rows: np.ndarray | None, channels: tuple[str, ...],
                 plates: list[PlateInfo], illum: dict[str, Any]):
        def take(codes: np.ndarray) -> np.ndarray:
            return codes if rows is None else codes[rows]

        self._channels = channels
        self.plates = plates
        self.plate_names = [p.name for p in plates]
        self.plate = take(plain_codes(table["plate"]).astype(np.int32, copy=False))
        self.site = take(plain_codes(table["site"]).astype(np.int32, copy=False))
        wells, well = dictionary_codes(table["well"])
        self.well_values, self.well = wells.to_pylist(), take(well)
        dirs, directory = dictionary_codes(table["dir"])
        self._dirs, self._dir = dirs.to_pylist(), take(directory)
        self._files = []
        for ch in channels:
            names, codes = dictionary_codes(table[f"file_{ch}"])
            self._files.append((Strings(names), take(codes)))
        sizes = [take(plain_codes(table[f"size_{ch}"])) for ch in channels if f"size_{ch}" in table.column_names]
        self._sizes = np.stack(sizes, axis=1) if sizes and len(sizes) == len(channels) else None
        self._etags = []
        for ch in channels:
            name = f"etag_{ch}"
            if name in table.column_names and table.num_rows:
                column = table[name].combine_chunks()
                self._etags.append((column, rows))
            else:
                self._etags.append(None)
        self._illum_of = [p.illum if p.illum in illum else None for p in plates]
        optics = {}
        self._optics = [optics.setdefault((p.source, p.layout), optics_of(p.source, p.layout)) for p in plates]
        self._pixel_um = np.array([o.pixel_size_um if o.pixel_size_um is not None else np.nan for o in self._optics],
                                  np.float64)
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

    def _etag(self, which: int, i: int) -> str | None:
        found = self._etags[which]
        if found is None:
            return None
        column, rows = found
        return column[int(rows[i]) if rows is not None else i].as_py()

    def _field(self, i: int) -> Field:
        plate_index = int(self.plate[i])
        plate = self.plates[plate_index]
        directory = self._dirs[self._dir[i]]
        keys = tuple(directory + names[codes[i]] for names, codes in self._files)
        sizes = tuple(int(s) for s in self._sizes[i]) if self._sizes is not None else (-1,) * len(keys)
        etags = tuple(self._etag(c, i) for c in range(len(self._channels)))
        optics = self._optics[plate_index]
        well = self.well_values[self.well[i]]
        return Field(id=f"{plate.name}/{well}/{self.site[i]}", batch=plate.batch, plate=plate.name, well=well,
                     site=int(self.site[i]), keys=keys, sizes=sizes, illum_plate=self._illum_of[plate_index],
                     etags=etags, source=plate.source, layout=plate.layout, barcode=plate.barcode,
                     pixel_size_um=optics.pixel_size_um, shape=optics.shape)

    def source_groups(self) -> tuple[list[str], np.ndarray]:
        """(names, per field the code of its name): the source ("source_4"), or the layout where the keys
        name no source; what pixel size and nominal shape are known per."""
        per_plate = [p.source or p.layout for p in self.plates]
        names = sorted(set(per_plate))
        code_of = {name: i for i, name in enumerate(names)}
        plate_codes = np.array([code_of[n] for n in per_plate], np.int32)
        return names, plate_codes[self.plate] if len(plate_codes) else np.zeros(0, np.int32)

    def pixel_size_um(self, positions: Sequence[int]) -> np.ndarray:
        """µm per pixel of the fields at `positions` (NaN where the source's microscope is unknown)."""
        return self._pixel_um[self.plate[np.asarray(positions, np.int64)]]

    def distinct(self, name: str) -> list[str]:
        """Sorted distinct values of a plate attribute present in the selection ("plate", "batch", …)."""
        attribute = "name" if name == "plate" else name
        return sorted({getattr(self.plates[p], attribute) for p in np.unique(self.plate)})
