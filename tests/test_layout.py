"""Key layout parsing on real JUMP key names (JUMP_DATA.md), channel maps and plate names."""

from __future__ import annotations

import pytest

from prefetchd.catalog import PlateInfo, plate_names, spread
from prefetchd.channel_map import ChannelMaps, fixed_stain
from prefetchd.layouts import (
    SKIPPED,
    IllumKey,
    barcode_of,
    has_acquisition_time,
    parse_illum_key,
    parse_image_key,
    row_name,
    well_name,
)

CPG0000 = ("cpg0000-jump-pilot/source_4/images/2020_11_04_CPJUMP1/images/"
           "BR00116991__2020-11-05T19_51_35-Measurement1/Images/r01c01f01p01-ch1sk1fk1fl1.tiff")
IMAGEXPRESS = ("cpg0016-jump/source_8/images/J3/images/A1166127/Images/"
               "HTS_A01_s1_w29D9B15E0-0F42-4A59-A2F8-619BD017D1D1.tif")
YOKOGAWA = ("cpg0016-jump/source_10/images/2021_08_17_U2OS_48_hr_run16/images/Dest210809-134534/"
            "Dest210809-134534_B03_T0001F006L01A02Z01C02.tif")


def fields_of(key: str, context: str = "") -> tuple:
    parsed = parse_image_key(key, context)
    assert parsed is not None and parsed != SKIPPED, key
    return (parsed.source, parsed.batch, parsed.plate, parsed.well, parsed.site, parsed.token, parsed.layout,
            parsed.channel)


def test_real_cpg0000_key():
    key = parse_image_key(CPG0000)
    assert fields_of(CPG0000) == ("source_4", "2020_11_04_CPJUMP1", "BR00116991__2020-11-05T19_51_35-Measurement1",
                                  "A01", 1, "ch1", "phenix", "Mito")
    assert key.directory + key.filename == CPG0000
    assert key.filename == "r01c01f01p01-ch1sk1fk1fl1.tiff"


@pytest.mark.parametrize("key, expected", [
    ("cpg0000-jump-pilot/source_4/images/2020_11_04_CPJUMP1/images/BR00116991__2020-11-05T19_51_35-Measurement1/"
     "Images/r01c01f01p01-ch5sk1fk1fl1.tiff",
     ("source_4", "2020_11_04_CPJUMP1", "BR00116991__2020-11-05T19_51_35-Measurement1", "A01", 1, "ch5", "phenix",
      "DNA")),
    ("cpg0016-jump/source_4/images/2021_04_26_Batch1/images/BR00117035__2021-05-02T16_02_51-Measurement1/"
     "Images/r16c24f09p01-ch4sk1fk1fl1.tiff",
     ("source_4", "2021_04_26_Batch1", "BR00117035__2021-05-02T16_02_51-Measurement1", "P24", 9, "ch4", "phenix",
      "ER")),
    # source 3: a space in the plate folder; its channel order is cpg0000's
    ("cpg0016-jump/source_3/images/CP59/images/JCPQC051__2022-01-10T10_40_39-Measurement 1/"
     "Images/r02c03f16p01-ch2sk1fk1fl1.tiff",
     ("source_3", "CP59", "JCPQC051__2022-01-10T10_40_39-Measurement 1", "B03", 16, "ch2", "phenix", "AGP")),
    # source 9: the bare barcode as plate folder; its channel order differs (channel_mapping.csv): no stain
    ("cpg0016-jump/source_9/images/20210918-Run11/images/GR00004367/Images/r32c48f01p01-ch8sk1fk1fl1.tiff",
     ("source_9", "20210918-Run11", "GR00004367", "AF48", 1, "ch8", "phenix", None)),
    # a local root inside the batch folder: no batch component
    ("images/BR1__2020-11-05T19_51_35-Measurement1/Images/r27c10f02p01-ch3sk1fk1fl1.tiff",
     ("", "", "BR1__2020-11-05T19_51_35-Measurement1", "AA10", 2, "ch3", "phenix", "RNA")),
    # ImageXpress: w2 is AGP by the layout's own table
    (IMAGEXPRESS, ("source_8", "J3", "A1166127", "A01", 1, "w2", "imagexpress", "AGP")),
    # Yokogawa: F is the site; the stain of A02Z01C02 is only known from load_data
    (YOKOGAWA, ("source_10", "2021_08_17_U2OS_48_hr_run16", "Dest210809-134534", "B03", 6, "A02Z01C02",
                "yokogawa", None)),
    # numeric Yokogawa barcodes (source 2)
    ("cpg0016-jump/source_2/images/20210607_Batch_2/images/1053601756/1053601756_P24_T0001F009L01A04Z01C04.tif",
     ("source_2", "20210607_Batch_2", "1053601756", "P24", 9, "A04Z01C04", "yokogawa", None)),
])
def test_layout_keys(key, expected):
    assert fields_of(key) == expected


def test_a_local_root_supplies_source_and_batch():
    key = "images/BR1__2020-11-05T19_51_35-Measurement1/Images/r01c01f01p01-ch1sk1fk1fl1.tiff"
    assert fields_of(key, "/data/cpg0016-jump/source_4/images/2021_04_26_Batch1")[:3] == (
        "source_4", "2021_04_26_Batch1", "BR1__2020-11-05T19_51_35-Measurement1")
    source_1 = "/data/cpg0016-jump/source_1/images/B1"
    assert fields_of(key, source_1)[-1] is None     # source 1's ch1 is not Mito: the path says which source


def test_imagexpress_thumbnails_are_skipped_not_unparsed():
    thumb = IMAGEXPRESS.replace("_w2", "_w2_thumb")
    assert parse_image_key(thumb) == SKIPPED
    assert parse_image_key(thumb.replace(".tif", ".TIF")) == SKIPPED


@pytest.mark.parametrize("key", [
    "cpg0000-jump-pilot/source_4/images/B/images/P/Images/r33c01f01p01-ch1sk1fk1fl1.tiff",   # row 33
    "cpg0000-jump-pilot/source_4/images/B/images/P/Images/r01c49f01p01-ch1sk1fk1fl1.tiff",   # column 49
    "cpg0000-jump-pilot/source_4/images/B/images/P/Images/r01c01f01p02-ch1sk1fk1fl1.tiff",   # plane 2
    "cpg0000-jump-pilot/source_4/images/B/images/P/Images/r01c01f00p01-ch1sk1fk1fl1.tiff",   # site 0
    "cpg0000-jump-pilot/source_4/images/B/images/P/Images/r01c01f01p01-ch1sk1fk1fl1_thumb.tiff",
    "cpg0000-jump-pilot/source_4/images/B/images/P/Images/Index.idx.xml",
    "cpg0000-jump-pilot/source_4/images/B/images/P/r01c01f01p01-ch1sk1fk1fl1.tiff",          # no Images/
    "r01c01f01p01-ch1sk1fk1fl1.tiff",
    "cpg0000-jump-pilot/source_4/workspace/load_data_csv/B/P/load_data.csv",
    YOKOGAWA.replace("T0001F", "T0002F"),                                                    # time-lapse
    YOKOGAWA.replace("/images/Dest210809-134534/", "/images/Dest210809-134534/Images/"),     # not its layout
    IMAGEXPRESS.replace("/Images/", "/"),                                                    # no Images/
    "cpg0016-jump/source_2/images/B/images/P/MeasurementData.mlf",
])
def test_non_layout_keys(key):
    assert parse_image_key(key) is None


def test_phenix_channel_nine_parses_but_names_no_stain():
    key = parse_image_key(CPG0000.replace("-ch1sk", "-ch9sk"))
    assert key.token == "ch9" and key.channel is None


def test_rows_up_to_32_and_well_names():
    assert [row_name(r) for r in (1, 16, 26, 27, 32)] == ["A", "P", "Z", "AA", "AF"]
    assert [well_name(w) for w in ("A01", "a1", "P24", "AF48", "Q01", "A49", "A00", "1A")] == [
        "A01", "A01", "P24", "AF48", "Q01", None, None, None]


def test_barcode_and_acquisition_time_of_plate_folders():
    assert barcode_of("BR00116991__2020-11-05T19_51_35-Measurement1") == "BR00116991"
    assert barcode_of("JCPQC051__2022-01-10T10_40_39-Measurement 1") == "JCPQC051"
    assert barcode_of("GR00004367") == "GR00004367"
    assert has_acquisition_time("JCPQC051__2022-01-10T10_40_39-Measurement 1")
    assert not has_acquisition_time("GR00004367") and not has_acquisition_time("Dest210809-134534")


def test_illum_keys():
    base = "cpg0000-jump-pilot/source_4/images/2020_11_04_CPJUMP1/illum/BR00116991/BR00116991_Illum"
    assert parse_illum_key(base + "DNA.npy") == IllumKey("source_4", "2020_11_04_CPJUMP1", "BR00116991", "DNA")
    assert parse_illum_key(base + "Brightfield_H.npy").channel == "Brightfield_H"
    assert parse_illum_key(base + "HighZBF.npy").channel == "Brightfield_H"       # load_data's name for ch6
    assert parse_illum_key(base + "Actin.npy") is None
    assert parse_illum_key(base.replace("/BR00116991_", "/BR00000000_") + "DNA.npy") is None
    assert parse_image_key(base + "DNA.npy") is None


def test_fixed_tables_hold_only_where_known():
    assert fixed_stain("phenix", "ch5", "cpg0000-jump-pilot", "source_4") == "DNA"
    assert fixed_stain("phenix", "ch5", "cpg0016-jump", "source_3") == "DNA"
    assert fixed_stain("phenix", "ch5", "cpg0016-jump", "source_1") is None
    assert fixed_stain("imagexpress", "w5", "cpg0016-jump", "source_8") == "DNA"
    assert fixed_stain("yokogawa", "A01Z01C01", "cpg0016-jump", "source_2") is None


def test_channel_maps_learned_win_and_conflicts_drop():
    maps = ChannelMaps()
    maps.learn("source_1", "phenix", "ch4", "DNA")
    assert maps.stain("source_1", "phenix", "ch4", fixed="ER") == "DNA"
    assert maps.stain("source_1", "phenix", "ch6", fixed="Brightfield_H") is None   # learned table is the truth
    assert maps.stain("source_4", "phenix", "ch5", fixed="DNA") == "DNA"            # nothing learned: the table
    maps.learn("source_1", "phenix", "ch4", "ER")
    assert maps.stain("source_1", "phenix", "ch4", fixed=None) is None
    assert maps.conflicts["source_1", "phenix"] == {"ch4"}


def plate(folder: str, source: str = "source_4", batch: str = "B1", project: str = "cpg0016-jump") -> PlateInfo:
    return PlateInfo(f"{project}/{source}/images/{batch}/images/{folder}/", source, batch, folder,
                     barcode_of(folder), "phenix")


def test_plate_names_keep_cpg0000_ids_and_qualify_reused_folders():
    timed = "BR00116991__2020-11-05T19_51_35-Measurement1"
    plates = [plate(timed), plate("A1166127", "source_8", "J3"), plate("A1166127", "source_8", "J4"),
              plate("X__2021-01-01T00_00_00-Measurement1", batch="B1"),
              plate("X__2021-01-01T00_00_00-Measurement1", batch="B2"),
              plate("A1166127", "source_8", "J3", project="mirror")]
    assert plate_names(plates) == [    # the same source/batch/folder under two projects: named by path
        timed, "cpg0016-jump/source_8/images/J3/images/A1166127", "source_8/J4/A1166127",
        "B1/X__2021-01-01T00_00_00-Measurement1", "B2/X__2021-01-01T00_00_00-Measurement1",
        "mirror/source_8/images/J3/images/A1166127"]
    assert plate_names(plates[:2] + plates[3:5])[1] == "source_8/J3/A1166127"


def test_spread_is_even_and_deterministic():
    assert spread(10, None) is None and spread(10, 10) is None
    assert spread(100, 4) == [0, 25, 50, 75]
    assert spread(7, 3) == spread(7, 3) == [0, 2, 4]
