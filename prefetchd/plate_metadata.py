"""Plate tables in the shape of jump-cellpainting/datasets `metadata/plate.csv.gz`:

    Metadata_Source,Metadata_Batch,Metadata_Plate,Metadata_PlateType
    source_4,2021_04_26_Batch1,BR00117035,COMPOUND

They say which plates exist per source and batch (so no LIST is needed to find them) and which kind of
perturbation each holds (COMPOUND, ORF, CRISPR, TARGET2, …), for selection by `plate_type=`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from prefetchd.errors import DatasetError

COLUMNS = ("Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_PlateType")


@dataclass(frozen=True)
class PlateRecord:
    source: str
    batch: str
    plate: str            # barcode
    plate_type: str


class PlateTable:
    """The rows of a plate table, with the lookups selection and discovery need."""

    def __init__(self, records: list[PlateRecord], where: str = ""):
        self.records = records
        self.where = where
        self._exact = {(r.source, r.batch, r.plate): r for r in records}
        self._by_batch = {(r.batch, r.plate): r for r in records}
        counts: dict[str, int] = {}
        for r in records:
            counts[r.plate] = counts.get(r.plate, 0) + 1
        self._by_barcode = {r.plate: r for r in records if counts[r.plate] == 1}
        self._in_batch: dict[tuple[str, str], list[PlateRecord]] = {}
        for r in records:
            self._in_batch.setdefault((r.source, r.batch), []).append(r)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def plate_types(self) -> list[str]:
        return sorted({r.plate_type for r in self.records})

    def find(self, source: str, batch: str, barcode: str) -> PlateRecord | None:
        """The record of a plate: by source+batch+barcode, else batch+barcode, else a barcode seen once."""
        return (self._exact.get((source, batch, barcode)) or self._by_batch.get((batch, barcode))
                or self._by_barcode.get(barcode))

    def batches(self, source: str) -> list[str]:
        return sorted({batch for s, batch in self._in_batch if s == source})

    def plates(self, source: str, batch: str) -> list[PlateRecord]:
        return self._in_batch.get((source, batch), [])


def parse_plate_table(data: bytes, where: str) -> PlateTable:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if data[:2] == b"\x1f\x8b":
        import gzip

        data = gzip.decompress(data)
    header = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip().split(",")
    names = [h.strip().strip('"') for h in header]
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise DatasetError(f"plate table {where} has no {', '.join(missing)} column: plate_table= needs a table "
                           f"shaped like jump-cellpainting/datasets metadata/plate.csv.gz ({', '.join(COLUMNS)})")
    table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
        column_types={name: pa.string() for name in names}, include_columns=list(COLUMNS)))
    columns = [table[c].to_pylist() for c in COLUMNS]
    records = [PlateRecord(*(v or "" for v in row)) for row in zip(*columns)]
    return PlateTable(records, where)


async def load_plate_table(where: str, s3cfg: dict) -> PlateTable:
    """A plate table from a local path, `s3://bucket/key` or `https://…` (gzipped or not)."""
    from prefetchd.listing import read_bytes

    return parse_plate_table(await read_bytes(where, s3cfg, what="plate_table="), where)
