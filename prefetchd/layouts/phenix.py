"""Opera Phenix / Operetta (cpg0000; cpg0016 sources 1, 3, 4, 9, 11, 15):

    …/<batch>/images/<plate folder>/Images/r<RR>c<CC>f<FF>p01-ch<N>sk1fk1fl1.tiff

The plate folder is `<barcode>__<YYYY-MM-DDTHH_MM_SS>-Measurement1` (source 3: `-Measurement 1`, with a
space; source 9: the bare barcode). The channel token is `ch<N>`; which stain it holds depends on the source.
"""

from __future__ import annotations

import re

from prefetchd.layouts.common import MAX_COLUMNS, ROW_NAMES

NAME = "phenix"
EXAMPLE = "…/<batch>/images/<plate folder>/Images/r01c01f01p01-ch1sk1fk1fl1.tiff"
IN_IMAGES_FOLDER = True
_FILE = re.compile(r"r(\d\d)c(\d\d)f(\d{2,3})p01-ch(\d{1,2})sk1fk1fl1\.tiff")
_COLUMNS = {f"{col:02d}" for col in range(1, MAX_COLUMNS + 1)}


def parse_file(filename: str) -> tuple[str, int, str] | None:
    """(well, site, token) of a Phenix image file name, or None."""
    match = _FILE.fullmatch(filename)
    if match is None:
        return None
    row, col, site, number = match.groups()
    row_letter = ROW_NAMES.get(row)
    if row_letter is None or col not in _COLUMNS or int(site) == 0 or int(number) == 0:
        return None
    return row_letter + col, int(site), f"ch{int(number)}"
