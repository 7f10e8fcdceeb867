"""Key layout parsing on real JUMP key names (JUMP_DATA.md)."""

from __future__ import annotations

import pytest

from prefetchd.catalog import spread
from prefetchd.layout import IllumKey, barcode_of, parse_illum_key, parse_image_key, row_name

CPG0000 = ("cpg0000-jump-pilot/source_4/images/2020_11_04_CPJUMP1/images/"
           "BR00116991__2020-11-05T19_51_35-Measurement1/Images/r01c01f01p01-ch1sk1fk1fl1.tiff")


def test_real_cpg0000_key():
    key = parse_image_key(CPG0000)
    assert (key.batch, key.plate, key.well, key.site, key.channel) == (
        "2020_11_04_CPJUMP1", "BR00116991__2020-11-05T19_51_35-Measurement1", "A01", 1, "Mito")
    assert key.directory + key.filename == CPG0000
    assert key.filename == "r01c01f01p01-ch1sk1fk1fl1.tiff"


@pytest.mark.parametrize("key, expected", [
    ("cpg0000-jump-pilot/source_4/images/2020_11_04_CPJUMP1/images/BR00116991__2020-11-05T19_51_35-Measurement1/"
     "Images/r01c01f01p01-ch5sk1fk1fl1.tiff",
     ("2020_11_04_CPJUMP1", "BR00116991__2020-11-05T19_51_35-Measurement1", "A01", 1, "DNA")),
    ("cpg0000-jump-pilot/source_4/images/2020_11_04_CPJUMP1/images/BR00117010__2020-11-08T18_18_00-Measurement1/"
     "Images/r01c01f01p01-ch1sk1fk1fl1.tiff",
     ("2020_11_04_CPJUMP1", "BR00117010__2020-11-08T18_18_00-Measurement1", "A01", 1, "Mito")),
    ("cpg0016-jump/source_4/images/2021_04_26_Batch1/images/BR00117035__2021-05-02T16_02_51-Measurement1/"
     "Images/r16c24f09p01-ch4sk1fk1fl1.tiff",
     ("2021_04_26_Batch1", "BR00117035__2021-05-02T16_02_51-Measurement1", "P24", 9, "ER")),
    # source 3: a space in the plate folder
    ("cpg0016-jump/source_3/images/CP59/images/JCPQC051__2022-01-10T10_40_39-Measurement 1/"
     "Images/r02c03f16p01-ch2sk1fk1fl1.tiff",
     ("CP59", "JCPQC051__2022-01-10T10_40_39-Measurement 1", "B03", 16, "AGP")),
    # source 9: the bare barcode as plate folder
    ("cpg0016-jump/source_9/images/20210918-Run11/images/GR00004367/Images/r32c48f01p01-ch8sk1fk1fl1.tiff",
     ("20210918-Run11", "GR00004367", "AF48", 1, "Brightfield")),
    # a local root inside the batch folder: no batch component
    ("images/BR1__2020-11-05T19_51_35-Measurement1/Images/r27c10f02p01-ch3sk1fk1fl1.tiff",
     ("", "BR1__2020-11-05T19_51_35-Measurement1", "AA10", 2, "RNA")),
])
def test_phenix_keys(key, expected):
    parsed = parse_image_key(key)
    assert parsed is not None
    assert (parsed.batch, parsed.plate, parsed.well, parsed.site, parsed.channel) == expected


@pytest.mark.parametrize("key", [
    "cpg0016-jump/source_8/images/J3/images/A1166127/Images/HTS_A01_s1_w29D9B15E0-0F42-4A59-A2F8-619BD017D1D1.tif",
    "cpg0000-jump-pilot/source_4/images/B/images/P/Images/r33c01f01p01-ch1sk1fk1fl1.tiff",   # row 33
    "cpg0000-jump-pilot/source_4/images/B/images/P/Images/r01c49f01p01-ch1sk1fk1fl1.tiff",   # column 49
    "cpg0000-jump-pilot/source_4/images/B/images/P/Images/r01c01f01p01-ch9sk1fk1fl1.tiff",   # channel 9
    "cpg0000-jump-pilot/source_4/images/B/images/P/Images/r01c01f01p02-ch1sk1fk1fl1.tiff",   # plane 2
    "cpg0000-jump-pilot/source_4/images/B/images/P/Images/r01c01f00p01-ch1sk1fk1fl1.tiff",   # site 0
    "cpg0000-jump-pilot/source_4/images/B/images/P/Images/Index.idx.xml",
    "cpg0000-jump-pilot/source_4/images/B/images/P/r01c01f01p01-ch1sk1fk1fl1.tiff",          # no Images/
    "r01c01f01p01-ch1sk1fk1fl1.tiff",
    "cpg0000-jump-pilot/source_4/workspace/load_data_csv/B/P/load_data.csv",
])
def test_non_layout_keys(key):
    assert parse_image_key(key) is None


def test_rows_up_to_32():
    assert [row_name(r) for r in (1, 16, 26, 27, 32)] == ["A", "P", "Z", "AA", "AF"]


def test_barcode_of_plate_folders():
    assert barcode_of("BR00116991__2020-11-05T19_51_35-Measurement1") == "BR00116991"
    assert barcode_of("JCPQC051__2022-01-10T10_40_39-Measurement 1") == "JCPQC051"
    assert barcode_of("GR00004367") == "GR00004367"


def test_illum_keys():
    base = "cpg0000-jump-pilot/source_4/images/2020_11_04_CPJUMP1/illum/BR00116991/BR00116991_Illum"
    assert parse_illum_key(base + "DNA.npy") == IllumKey("2020_11_04_CPJUMP1", "BR00116991", "DNA")
    assert parse_illum_key(base + "Brightfield_H.npy").channel == "Brightfield_H"
    assert parse_illum_key(base + "Actin.npy") is None
    assert parse_illum_key(base.replace("/BR00116991_", "/BR00000000_") + "DNA.npy") is None
    assert parse_image_key(base + "DNA.npy") is None


def test_spread_is_even_and_deterministic():
    assert spread(10, None) is None and spread(10, 10) is None
    assert spread(100, 4) == [0, 25, 50, 75]
    assert spread(7, 3) == spread(7, 3) == [0, 2, 4]
