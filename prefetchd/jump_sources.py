"""What is known per JUMP source and microscope family: pixel size and nominal image shape.

From jump-cellpainting/datasets `metadata/microscope_config.csv` (Metadata_Pixel_Size_Microns) and the
bucket facts (JUMP_DATA.md: Phenix fields 1080², ImageXpress 1024²). The shape is nominal: the daemon
reads the real one from the TIFFs; None where no source states it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PHENIX_PIXEL_UM = 0.597976


@dataclass(frozen=True)
class Optics:
    microscope: str
    pixel_size_um: float | None
    shape: tuple[int, int] | None      # nominal (height, width)

    def to_json(self) -> dict:
        return asdict(self)


LAYOUT_OPTICS = {
    "phenix": Optics("Opera Phenix / Operetta", PHENIX_PIXEL_UM, (1080, 1080)),
    "yokogawa": Optics("CellVoyager CV7000 / CV8000", 0.65, None),
    "imagexpress": Optics("ImageXpress Micro Confocal", 0.7032, (1024, 1024)),
}

CPG0016_OPTICS = {
    "source_1": Optics("Opera Phenix", PHENIX_PIXEL_UM, (1080, 1080)),
    "source_2": Optics("CV8000", 0.65, None),
    "source_3": Optics("Opera Phenix", PHENIX_PIXEL_UM, (1080, 1080)),
    "source_4": Optics("Opera Phenix", PHENIX_PIXEL_UM, (1080, 1080)),
    "source_5": Optics("CV8000", 0.64974, None),
    "source_6": Optics("CV8000", 0.646187, None),
    "source_7": Optics("CV7000", 0.65, None),
    "source_8": Optics("ImageXpress Micro Confocal", 0.7032, (1024, 1024)),
    "source_9": Optics("Opera Phenix", PHENIX_PIXEL_UM, (1080, 1080)),
    "source_10": Optics("CV8000", 0.6516944, None),
    "source_11": Optics("Operetta", PHENIX_PIXEL_UM, (1080, 1080)),
    "source_13": Optics("CV7000", 0.65, None),
    "source_15": Optics("Opera Phenix", PHENIX_PIXEL_UM, (1080, 1080)),
}


def optics_of(source: str, layout: str) -> Optics:
    """The source's optics when it is a JUMP source imaged with this family, else the family's."""
    known = CPG0016_OPTICS.get(source)
    family = LAYOUT_OPTICS.get(layout, Optics(layout or "unknown", None, None))
    if known is not None and _same_family(known.microscope, layout):
        return known
    return family


def _same_family(microscope: str, layout: str) -> bool:
    lower = microscope.lower()
    return {"phenix": ("phenix" in lower or "operetta" in lower), "yokogawa": lower.startswith("cv"),
            "imagexpress": "imagexpress" in lower}.get(layout, False)
