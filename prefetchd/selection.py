"""Selection by metadata: which plates (source, batch, plate, plate type) and wells a dataset string keeps.

Plate-level choices are decided once per plate (a few thousand), then applied to the field rows through
their plate codes; wells through the well dictionary. A value that matches nothing is an error naming what
the dataset holds, so a typo never silently selects an empty or partial dataset.
"""

from __future__ import annotations

import numpy as np

from prefetchd.catalog import PlateInfo
from prefetchd.layouts import barcode_of
from prefetchd.dataset import Selection
from prefetchd.errors import DatasetError
from prefetchd.plate_metadata import PlateTable

MAX_LISTED = 8


def _listing(values: set[str] | list[str]) -> str:
    values = sorted(values)
    shown = ", ".join(values[:MAX_LISTED])
    return shown + (f", … ({len(values)} in all)" if len(values) > MAX_LISTED else "")


class PlateFilter:
    """Which sources, batches and plates to read at all: discovery asks before any plate is read."""

    def __init__(self, selection: Selection, table: PlateTable | None):
        self.selection = selection
        self.table = table
        # plate= may name a barcode, a plate folder or a plate name ("source_2/B1/<folder>")
        self._barcodes = {barcode_of(value.rsplit("/", 1)[-1]) for value in selection.plate}

    def source(self, source: str) -> bool:
        return not self.selection.source or source in self.selection.source

    def batch(self, source: str, batch: str) -> bool:
        if not self.source(source) or (self.selection.batch and batch not in self.selection.batch):
            return False
        if self.selection.plate_type and self.table is not None and self.table.plates(source, batch):
            return any(r.plate_type in self.selection.plate_type for r in self.table.plates(source, batch))
        return True

    def plate(self, source: str, batch: str, barcode: str, folder: str = "") -> bool:
        if not self.batch(source, batch):
            return False
        if self.selection.plate and barcode not in self._barcodes and folder not in self.selection.plate:
            return False
        if self.selection.plate_type:
            record = self.table.find(source, batch, barcode) if self.table else None
            if record is None or record.plate_type not in self.selection.plate_type:
                return False
        return True


def plate_mask(plates: list[PlateInfo], selection: Selection, plate_types: list[str] | None = None,
               table_name: str = "") -> np.ndarray:
    """Which plates the selection keeps; raises DatasetError for a value that matches no plate."""
    keep = np.ones(len(plates), bool)
    if not plates:
        return keep
    checks = (("source", lambda p: {p.source}), ("batch", lambda p: {p.batch}),
              ("plate", lambda p: {p.barcode, p.folder, p.name}))
    for key, values_of in checks:
        wanted = getattr(selection, key)
        if not wanted:
            continue
        present = set().union(*(values_of(p) for p in plates)) - {""}
        unknown = [v for v in wanted if v not in present]
        if unknown:
            shown = {p.barcode for p in plates} if key == "plate" else present
            raise DatasetError(f"{key}={','.join(unknown)} matches no plate of this dataset; {key}s here: "
                               f"{_listing(shown)}")
        keep &= np.array([bool(values_of(p) & set(wanted)) for p in plates])
    if selection.plate_type:
        check_plate_types(selection, plate_types or [], table_name)
        keep &= np.array([p.plate_type in selection.plate_type for p in plates])
    return keep


def check_plate_types(selection: Selection, known: list[str], table_name: str) -> None:
    unknown = [t for t in selection.plate_type if t not in set(known)]
    if unknown:
        raise DatasetError(f"plate_type={','.join(unknown)} is not in the plate table {table_name}; "
                           f"accepted: {_listing(set(known))}")


def well_mask(well_values: list[str], selection: Selection) -> np.ndarray | None:
    """Per well dictionary entry, whether it is selected (None: no well selection)."""
    if not selection.well:
        return None
    unknown = [w for w in selection.well if w not in set(well_values)]
    if unknown:
        raise DatasetError(f"well={','.join(unknown)} matches no field of this dataset; wells here: "
                           f"{_listing(well_values)}")
    return np.array([w in selection.well for w in well_values] + [False], bool)


def explain_empty(selection: Selection, discovery: dict, where: str) -> str | None:
    """Why a selection read no plate at all, naming the sources or batches that are there; None if not it."""
    if not selection:
        return None
    sources = sorted(set(discovery.get("sources_seen", ())))
    if selection.source and sources and not set(selection.source) & set(sources):
        return (f"source={','.join(selection.source)} matches no source under {where}; sources here: "
                f"{_listing(sources)}")
    batches = sorted({b.split("/", 1)[1] for b in discovery.get("batches_seen", ())
                      if not selection.source or b.split("/", 1)[0] in selection.source})
    if selection.batch and batches and not set(selection.batch) & set(batches):
        return f"batch={','.join(selection.batch)} matches no batch under {where}; batches here: {_listing(batches)}"
    return (f"the selection {selection.scope()} keeps no plate under {where}: widen source=, batch=, plate= or "
            "plate_type=")
