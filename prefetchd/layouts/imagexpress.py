"""Molecular Devices ImageXpress Micro Confocal (cpg0016 source 8):

    …/<batch>/images/<plate>/Images/HTS_<Well>_s<site>_w<wave><GUID>.tif

w1 Mito, w2 AGP, w3 RNA, w4 ER, w5 DNA. MetaXpress also stores a thumbnail of every image,
`…_w<wave>_thumb<GUID>.tif`: those are skipped (counted, never streamed).
"""

from __future__ import annotations

import re

from prefetchd.layouts.common import well_name

NAME = "imagexpress"
EXAMPLE = "…/<batch>/images/<plate>/Images/HTS_A01_s1_w1<GUID>.tif"
IN_IMAGES_FOLDER = True
_FILE = re.compile(r".+_([A-Za-z]{1,2}\d\d)_s(\d{1,3})_w(\d)(_thumb)?[0-9A-Fa-f-]*\.tif", re.IGNORECASE)
THUMBNAIL = "thumbnail"


def parse_file(filename: str) -> tuple[str, int, str] | str | None:
    """(well, site, token) of an ImageXpress image file name; THUMBNAIL for a thumbnail; else None."""
    match = _FILE.fullmatch(filename)
    if match is None:
        return None
    well, site, wave, thumb = match.groups()
    if thumb:
        return THUMBNAIL
    well = well_name(well)
    if well is None or int(site) == 0:
        return None
    return well, int(site), f"w{int(wave)}"
