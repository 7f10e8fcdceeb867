"""Cell Painting channel names and their Opera Phenix channel numbers (cpg0000 / source_4 layout)."""

from __future__ import annotations

import reprlib

from prefetchd.errors import DatasetError

# Phenix ch1..ch8. Brightfield planes are high, low and in-focus; names follow the illum file stains.
PHENIX_CHANNELS: dict[str, int] = {
    "Mito": 1,
    "AGP": 2,
    "RNA": 3,
    "ER": 4,
    "DNA": 5,
    "Brightfield_H": 6,
    "Brightfield_L": 7,
    "Brightfield": 8,
}
PHENIX_NUMBER_TO_CHANNEL = {number: name for name, number in PHENIX_CHANNELS.items()}
DEFAULT_CHANNELS: tuple[str, ...] = ("DNA", "ER", "RNA", "AGP", "Mito")
BRIGHTFIELD_CHANNELS: tuple[str, ...] = ("Brightfield_H", "Brightfield_L", "Brightfield")
# Stain names in load_data columns (`FileName_Orig<Stain>`, `_Illum<Stain>`) that differ from ours: JUMP's
# pipelines call the Phenix ch6/ch7 brightfield planes HighZBF/LowZBF, and some write BrightField.
STAIN_ALIASES: dict[str, str] = {"highzbf": "Brightfield_H", "lowzbf": "Brightfield_L", "brightfield": "Brightfield"}


def canonical_stain(name: str) -> str | None:
    """A load_data / illum stain name as one of PHENIX_CHANNELS ("HighZBF" → "Brightfield_H"), else None."""
    lower = name.lower()
    for stain in PHENIX_CHANNELS:
        if stain.lower() == lower:
            return stain
    return STAIN_ALIASES.get(lower)


def parse_channels(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """`"DNA,ER"` or `["DNA", "ER"]` → ("DNA", "ER"), case-insensitive, order kept, validated."""
    if value is None or value == "" or value == []:
        return DEFAULT_CHANNELS
    names = value.split(",") if isinstance(value, str) else list(value)
    by_lower = {name.lower(): name for name in PHENIX_CHANNELS}
    out: list[str] = []
    for raw in names:
        name = by_lower.get(str(raw).strip().lower())
        if name is None:
            raise DatasetError(
                f"unknown channel {reprlib.repr(raw)}; accepted channels: {', '.join(PHENIX_CHANNELS)}"
            )
        if name in out:
            raise DatasetError(f"channel {name!r} is listed twice in channels={reprlib.repr(value)}")
        out.append(name)
    return tuple(out)
