"""Yokogawa CellVoyager CV7000 / CV8000 (cpg0016 sources 2, 5, 6, 7, 10, 13):

    …/<batch>/images/<plate folder>/<plate>_<Well>_T0001F<fff>L01A<aa>Z<zz>C<cc>.tif

No `Images/` folder. F is the site, A the action (excitation), Z the plane, C the camera channel: the
token `A<aa>Z<zz>C<cc>` names a channel, and which stain it holds differs by source — only load_data says.
Time-lapse (T > 1) and other L values are not JUMP layouts and stay unparsed.
"""

from __future__ import annotations

import re

from prefetchd.layouts.common import well_name

NAME = "yokogawa"
EXAMPLE = "…/<batch>/images/<plate>/<plate>_A01_T0001F001L01A01Z01C01.tif"
IN_IMAGES_FOLDER = False
_FILE = re.compile(r".+_([A-Za-z]{1,2}\d\d)_T0001F(\d{3})L01A(\d\d)Z(\d\d)C(\d\d)\.tif", re.IGNORECASE)


def parse_file(filename: str) -> tuple[str, int, str] | None:
    """(well, site, token) of a CellVoyager image file name, or None."""
    match = _FILE.fullmatch(filename)
    if match is None:
        return None
    well, site, action, plane, channel = match.groups()
    well = well_name(well)
    if well is None or int(site) == 0:
        return None
    return well, int(site), f"A{action}Z{plane}C{channel}"
