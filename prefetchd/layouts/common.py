"""What every key layout shares: the parsed key, where a key sits (source, batch, plate folder), well names.

Every JUMP image key sits in a plate folder under a batch's `images/` folder:

    <project>/<source>/images/<batch>/images/<plate folder>/[Images/]<file>

The file name is the microscope's own; each family module (phenix, yokogawa, imagexpress) parses it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

MAX_ROWS = 32          # 1536-well plates: rows A..AF
MAX_COLUMNS = 48

_TIMESTAMP = re.compile(r"__\d{4}-\d\d-\d\dT\d\d_\d\d_\d\d")
_SOURCE = re.compile(r"source_\w+")
_WELL = re.compile(r"([A-Za-z]{1,2})0*(\d{1,2})")


class ImageKey(NamedTuple):
    """One image object: which field (source, batch, plate folder, well, site) and which channel it holds."""

    source: str          # "source_4"; "" when the path does not say
    batch: str           # "" when the key starts at the plate folders (a local root inside a batch)
    plate: str           # plate folder, e.g. "BR00116991__2020-11-05T19_51_35-Measurement1"
    well: str            # "A01"
    site: int            # 1-based
    token: str           # the layout's channel id: "ch5" (Phenix), "A01Z01C01" (Yokogawa), "w2" (ImageXpress)
    layout: str          # "phenix" | "yokogawa" | "imagexpress"
    channel: str | None  # the stain when the layout itself names it (see channel_map), else None
    directory: str       # the key up to and including the last "/"
    filename: str        # the key after the last "/"


class Location(NamedTuple):
    source: str
    batch: str
    plate: str


def row_name(row: int) -> str:
    """1 → "A", 26 → "Z", 27 → "AA", 32 → "AF"."""
    if row <= 26:
        return chr(ord("A") + row - 1)
    return "A" + chr(ord("A") + row - 27)


ROW_NAMES = {f"{row:02d}": row_name(row) for row in range(1, MAX_ROWS + 1)}
_ROW_NUMBERS = {name: row for row, name in ((r, row_name(r)) for r in range(1, MAX_ROWS + 1))}


def well_name(text: str) -> str | None:
    """"A01", "a1", "AF48" → "A01", "A01", "AF48"; None when it is not a well of a ≤1536-well plate."""
    match = _WELL.fullmatch(text.strip())
    if match is None:
        return None
    row, column = match[1].upper(), int(match[2])
    if row not in _ROW_NUMBERS or not 1 <= column <= MAX_COLUMNS:
        return None
    return f"{row}{column:02d}"


def has_acquisition_time(plate_folder: str) -> bool:
    """Phenix folders `<barcode>__<YYYY-MM-DDTHH_MM_SS>-Measurement1` name one imaging run; others do not."""
    return _TIMESTAMP.search(plate_folder) is not None


def barcode_of(plate_folder: str) -> str:
    """`BR00116991__2020-11-05T19_51_35-Measurement1` → `BR00116991`; a bare barcode folder is itself."""
    return plate_folder.split("__", 1)[0]


def location_of(parts: list[str], context: str = "") -> Location | None:
    """Source, batch and plate folder of a key split at "/", given the parts above its plate folder's content.

    `parts` ends with the plate folder; above it must be the batch's `images/` folder (or nothing, for a
    local root that is the `images/` folder's parent or the batch). `context` is a path the key is
    relative to (a local root), used only to find source and batch.
    """
    if len(parts) < 1 or not parts[-1]:
        return None
    plate = parts[-1]
    above = parts[:-1]
    if context:
        above = [p for p in context.strip("/").split("/") if p] + above
    if not above or above[-1] != "images":
        return None
    batch = above[-2] if len(above) >= 2 else ""
    source = ""
    if len(above) >= 4 and above[-3] == "images" and _SOURCE.fullmatch(above[-4]):
        source = above[-4]
    return Location(source, batch, plate)


def project_of(key: str, context: str = "") -> str:
    """The first path component above the source (`cpg0016-jump`), or "" when the path does not say."""
    path = f"{context.strip('/')}/{key}" if context else key
    match = re.search(r"(?:^|/)([^/]+)/source_\w+/images/", path)
    return match[1] if match else ""
