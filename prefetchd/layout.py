"""Key layouts of the JUMP Cell Painting images: which field and channel an object key holds.

Phenix/Operetta image keys (cpg0000 and cpg0016 sources 1, 3, 4, 9, 11, 15):

    …/<batch>/images/<plate folder>/Images/r<RR>c<CC>f<FF>p01-ch<N>sk1fk1fl1.tiff

where the plate folder is `<barcode>__<timestamp>-Measurement1` (source 3: `-Measurement 1`, source 9:
the bare barcode). Illumination functions:

    …/<batch>/illum/<barcode>/<barcode>_Illum<Stain>.npy
"""

from __future__ import annotations

import re
from typing import NamedTuple

from prefetchd.channels import PHENIX_CHANNELS, PHENIX_NUMBER_TO_CHANNEL

MAX_ROWS = 32
MAX_COLUMNS = 48

_PHENIX_FILE = re.compile(r"r(\d\d)c(\d\d)f(\d{2,3})p01-ch(\d{1,2})sk1fk1fl1\.tiff")
_ILLUM_FILE = re.compile(r"(?P<barcode>.+)_Illum(?P<stain>[A-Za-z_]+)\.npy")


class ImageKey(NamedTuple):
    batch: str          # "" when the key starts at the `images/` folder (a local root inside a batch)
    plate: str          # plate folder, e.g. "BR00116991__2020-11-05T19_51_35-Measurement1"
    well: str           # "A01"
    site: int           # 1-based
    channel: str        # "DNA", "Mito", "Brightfield_H", …
    directory: str      # the key up to and including the last "/"
    filename: str       # the key after the last "/"


class IllumKey(NamedTuple):
    batch: str
    barcode: str
    channel: str


def row_name(row: int) -> str:
    """1 → "A", 26 → "Z", 27 → "AA", 32 → "AF"."""
    if row <= 26:
        return chr(ord("A") + row - 1)
    return "A" + chr(ord("A") + row - 27)


_ROW_NAMES = {f"{row:02d}": row_name(row) for row in range(1, MAX_ROWS + 1)}
_COLUMN_NAMES = {f"{col:02d}": f"{col:02d}" for col in range(1, MAX_COLUMNS + 1)}


def barcode_of(plate_folder: str) -> str:
    """`BR00116991__2020-11-05T19_51_35-Measurement1` → `BR00116991`; a bare barcode folder is itself."""
    return plate_folder.split("__", 1)[0]


def illum_plate_key(batch: str, barcode: str) -> str:
    """Key of a plate's illum files in `Index.illum`: `<batch>/<barcode>`."""
    return f"{batch}/{barcode}"


def parse_image_key(key: str) -> ImageKey | None:
    """The field and channel a Phenix image key holds, or None when the key is not one."""
    parts = key.rsplit("/", 4)
    if len(parts) == 4:
        parts = ["", *parts]
    elif len(parts) != 5:
        return None
    head, images, plate, images_upper, filename = parts
    batch = head.rsplit("/", 1)[-1]
    if images != "images" or images_upper != "Images" or not plate:
        return None
    match = _PHENIX_FILE.fullmatch(filename)
    if match is None:
        return None
    row, col, site, number = match.groups()
    row_letter = _ROW_NAMES.get(row)
    col_name = _COLUMN_NAMES.get(col)
    channel = PHENIX_NUMBER_TO_CHANNEL.get(int(number))
    if row_letter is None or col_name is None or channel is None or int(site) == 0:
        return None
    directory = key[: len(key) - len(filename)]
    return ImageKey(batch, plate, row_letter + col_name, int(site), channel, directory, filename)


def parse_illum_key(key: str) -> IllumKey | None:
    """The plate and channel of an illumination function key, or None when the key is not one."""
    parts = key.rsplit("/", 3)
    if len(parts) == 3:
        parts = ["", *parts]
    elif len(parts) != 4:
        return None
    head, illum, barcode, filename = parts
    batch = head.rsplit("/", 1)[-1]
    if illum != "illum" or not barcode:
        return None
    match = _ILLUM_FILE.fullmatch(filename)
    if match is None or match["barcode"] != barcode or match["stain"] not in PHENIX_CHANNELS:
        return None
    return IllumKey(batch, barcode, match["stain"])
