"""Key layouts of the JUMP Cell Painting images: which field and channel an object key holds.

One module per microscope family (phenix, yokogawa, imagexpress) parses its file names; this module finds
the plate folder, batch and source around them and the illumination functions:

    …/<batch>/illum/<barcode>/<barcode>_Illum<Stain>.npy
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from prefetchd.channel_map import fixed_stain
from prefetchd.channels import canonical_stain
from prefetchd.layouts import imagexpress, phenix, yokogawa
from prefetchd.layouts.common import (
    ImageKey,
    Location,
    barcode_of,
    has_acquisition_time,
    location_of,
    project_of,
    row_name,
    well_name,
)

FAMILIES = (phenix, yokogawa, imagexpress)
LAYOUT_NAMES = tuple(family.NAME for family in FAMILIES)
LAYOUT_EXAMPLES = "; ".join(f"{family.NAME}: {family.EXAMPLE}" for family in FAMILIES)
SKIPPED = "skipped"      # parse_image_key's answer for objects stored beside the images on purpose (thumbnails)
_ILLUM_FILE = re.compile(r"(?P<barcode>.+)_Illum(?P<stain>[A-Za-z_]+)\.npy")

__all__ = ["FAMILIES", "LAYOUT_EXAMPLES", "LAYOUT_NAMES", "SKIPPED", "IllumKey", "ImageKey", "Location",
           "barcode_of", "family_of", "folder_location", "has_acquisition_time", "illum_plate_key", "layout_of_file", "location_of", "parse_illum_key",
           "parse_image_key", "plate_location", "project_of", "row_name", "well_name"]


class IllumKey(NamedTuple):
    source: str
    batch: str
    barcode: str
    channel: str


def illum_plate_key(source: str, batch: str, barcode: str) -> str:
    """Key of a plate's illum files in `Index.illum`: `[<source>/]<batch>/<barcode>`."""
    return "/".join(part for part in (source, batch, barcode) if part)


def family_of(filename: str):
    if filename.endswith(".tiff"):
        return phenix
    lower = filename.lower()
    if lower.endswith(".tif"):
        return yokogawa if "_t0001f" in lower else imagexpress
    return None


def parse_image_key(key: str, context: str = "") -> ImageKey | str | None:
    """The field and channel an image key holds; SKIPPED for a thumbnail; None when no layout matches.

    `context` is the path the key is relative to (a local root); it only helps find source and batch.
    """
    directory, _, filename = key.rpartition("/")
    family = family_of(filename)
    if family is None:
        return None
    parsed = family.parse_file(filename)
    if parsed is None or isinstance(parsed, str):
        return SKIPPED if parsed is not None else None
    where = folder_location(directory, context, family.IN_IMAGES_FOLDER)
    if where is None:
        return None
    location, project = where
    well, site, token = parsed
    stain = fixed_stain(family.NAME, token, project, location.source)
    return ImageKey(location.source, location.batch, location.plate, well, site, token, family.NAME, stain,
                    key[: len(key) - len(filename)], filename)


@functools.lru_cache(maxsize=8192)
def folder_location(directory: str, context: str, in_images_folder: bool) -> tuple[Location, str] | None:
    """(location, project) of an image folder: the same for every key of a plate, so parsed once."""
    parts = directory.split("/") if directory else []
    if in_images_folder:
        if len(parts) < 2 or parts[-1] != "Images":
            return None
        parts = parts[:-1]
    where = location_of(parts, context)
    if where is None:
        return None
    return where, project_of(directory + "/", context)


def layout_of_file(filename: str) -> str | None:
    """The family whose file names look like this one ("phenix", "yokogawa", "imagexpress"), or None."""
    family = family_of(filename)
    if family is None:
        return None
    parsed = family.parse_file(filename)
    return family.NAME if parsed is not None else None


def plate_location(directory: str, context: str = "") -> Location | None:
    """Source, batch and plate folder of an image folder in key form (`…/images/<plate>[/Images]`)."""
    parts = directory.rstrip("/").split("/")
    if parts and parts[-1] == "Images":
        parts = parts[:-1]
    return location_of(parts, context)


def parse_illum_key(key: str, context: str = "") -> IllumKey | None:
    """The plate and channel of an illumination function key, or None when the key is not one."""
    parts = key.split("/")
    if len(parts) < 3 or parts[-3] != "illum" or not parts[-2]:
        return None
    match = _ILLUM_FILE.fullmatch(parts[-1])
    barcode = parts[-2]
    stain = canonical_stain(match["stain"]) if match else None
    if match is None or match["barcode"] != barcode or stain is None:
        return None
    above = parts[:-3]
    if context:
        above = [p for p in context.strip("/").split("/") if p] + above
    batch = above[-1] if above else ""
    source = above[-3] if len(above) >= 3 and above[-2] == "images" and above[-3].startswith("source_") else ""
    return IllumKey(source, batch, barcode, stain)
