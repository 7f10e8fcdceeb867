"""Synthetic plates: real key layout, 16-bit pixels, signatures, phenotypes, and the trip through moto."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from hypothesis import given, settings, strategies as st

from prefetchd.dev import synth
from prefetchd.dev.locals3 import anonymous_client

# Written from JUMP_DATA.md, independently of synth.KEY_PATTERN.
REAL_KEYS = [
    "cpg0000-jump-pilot/source_4/images/2020_11_04_CPJUMP1/images/BR00116991__2020-11-05T19_51_35-Measurement1/Images/r01c01f01p01-ch1sk1fk1fl1.tiff",
    "cpg0000-jump-pilot/source_4/images/2020_11_04_CPJUMP1/images/BR00116991__2020-11-05T19_51_35-Measurement1/Images/r01c01f01p01-ch5sk1fk1fl1.tiff",
    "cpg0000-jump-pilot/source_4/images/2020_11_04_CPJUMP1/images/BR00117010__2020-11-08T18_18_00-Measurement1/Images/r01c01f01p01-ch1sk1fk1fl1.tiff",
]
CPG0000_KEY = re.compile(
    r"^cpg0000-jump-pilot/source_4/images/\d{4}_\d\d_\d\d_\w+/images/"
    r"BR\d{8}__\d{4}-\d\d-\d\dT\d\d_\d\d_\d\d-Measurement1/Images/"
    r"r(0[1-9]|1[0-6])c(0[1-9]|1\d|2[0-4])f\d\dp01-ch[1-8]sk1fk1fl1\.tiff$"
)
CPG0000_ILLUM_KEY = re.compile(
    r"^cpg0000-jump-pilot/source_4/images/\d{4}_\d\d_\d\d_\w+/illum/(BR\d{8})/\1_Illum(DNA|ER|RNA|AGP|Mito)\.npy$"
)


def test_the_layout_regex_accepts_the_real_keys():
    assert all(CPG0000_KEY.match(key) for key in REAL_KEYS)
    assert all(synth.KEY_PATTERN.match(key) for key in REAL_KEYS)


def test_manifest_keys_follow_the_real_cpg0000_layout():
    manifest = synth.build_manifest(synth.test_spec())
    assert all(CPG0000_KEY.match(key) for key in manifest.image_keys)
    illum_keys = [key for stains in manifest.illum_keys.values() for key in stains.values()]
    assert len(illum_keys) == 3 * 5
    assert all(CPG0000_ILLUM_KEY.match(key) for key in illum_keys)


def test_key_parts_match_the_field():
    manifest = synth.build_manifest(synth.test_spec())
    for field in manifest.fields:
        for channel, key in field.keys.items():
            parts = synth.KEY_PATTERN.match(key)
            row, col = synth.parse_well(field.well)
            assert (parts["batch"], parts["plate"]) == (field.batch, field.plate)
            assert (int(parts["row"]), int(parts["col"]), int(parts["site"])) == (row, col, field.site)
            assert int(parts["channel"]) == channel
            assert field.id == f"{field.plate}/{field.well}/{field.site}"


def test_one_barcode_in_two_batches_is_two_plates():
    spec = synth.test_spec()
    plates = spec.plates
    assert len(spec.batches) == 2 and len(plates) == 3
    by_barcode = {}
    for plate in plates:
        by_barcode.setdefault(plate.barcode, []).append(plate)
    (repeated,) = [group for group in by_barcode.values() if len(group) == 2]
    assert repeated[0].batch != repeated[1].batch
    assert repeated[0].folder != repeated[1].folder
    assert len({synth.plate_code(plate.folder) for plate in plates}) == 3
    assert len({field.id for field in synth.build_manifest(spec).fields}) == spec.field_count


def test_every_phenotype_appears_in_the_test_plates():
    spec = synth.test_spec()
    assert sorted(synth.phenotype_of(well) for well in spec.wells) == list(range(len(synth.PHENOTYPES)))


def test_written_tiffs_are_uncompressed_uint16_with_values_above_8_bits(synthetic):
    for key in synthetic.manifest.image_keys[:10]:
        with tifffile.TiffFile(synthetic.root / key) as tiff:
            page = tiff.pages[0]
            assert page.compression == tifffile.COMPRESSION.NONE
            image = page.asarray()
        assert image.dtype == np.uint16 and image.shape == (72, 90)
        assert (image > 255).mean() > 0.5
        assert np.median(image) > 200 and np.percentile(image[1:], 99.9) < 12000


def test_every_written_image_carries_its_own_signature(synthetic):
    for field in synthetic.manifest.fields:
        row, col = synth.parse_well(field.well)
        for channel, key in field.keys.items():
            image = tifffile.imread(synthetic.root / key)
            expected = (synth.plate_code(field.plate), row, col, field.site, channel)
            assert synth.decode_signature(image) == expected, key
            signature = synth.expected_signature(field.plate, field.well, field.site, channel)
            np.testing.assert_array_equal(image[0, :synth.SIGNATURE_LENGTH], signature)


def test_an_8_bit_decode_breaks_the_signature(synthetic):
    field = synthetic.manifest.fields[0]
    path = synthetic.root / field.keys[5]
    squashed = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)  # what the default-flag decode path keeps
    assert squashed.dtype == np.uint8
    assert synth.decode_signature(squashed) != synth.decode_signature(tifffile.imread(path))


@settings(max_examples=200, deadline=None)
@given(
    plate=st.from_regex(r"BR\d{8}__20\d\d-\d\d-\d\dT\d\d_\d\d_\d\d-Measurement1", fullmatch=True),
    row=st.integers(1, 16), col=st.integers(1, 24), site=st.integers(1, 16), channel=st.integers(1, 8),
)
def test_signature_round_trip(plate, row, col, site, channel):
    well = synth.well_name(row, col)
    image = np.zeros((4, 8), np.uint16)
    image[0, :synth.SIGNATURE_LENGTH] = synth.expected_signature(plate, well, site, channel)
    assert synth.decode_signature(image) == (synth.plate_code(plate), row, col, site, channel)
    assert image[0, :synth.SIGNATURE_LENGTH].min() > 255


def test_illum_functions_are_smooth_and_correction_keeps_the_signature(synthetic):
    field = synthetic.manifest.fields[0]
    stains = synthetic.manifest.illum_keys[f"{field.batch}/{field.barcode}"]
    for channel, stain in ((5, "DNA"), (1, "Mito")):
        illum = np.load(synthetic.root / stains[stain])
        assert illum.shape == (72, 90) and illum.dtype in (np.float32, np.float64)
        assert 0.55 < illum.min() and illum.max() < 1.45
        body = illum[1:]
        assert np.abs(np.diff(body, axis=0)).max() < 0.05 and np.abs(np.diff(body, axis=1)).max() < 0.05
        orig = tifffile.imread(synthetic.root / field.keys[channel])
        corrected = np.clip(np.rint(orig / illum), 0, 65535).astype(np.uint16)
        assert synth.decode_signature(corrected) == synth.decode_signature(orig)


def test_generation_is_deterministic_and_depends_on_every_coordinate():
    spec = synth.test_spec()
    plate, other_plate = spec.plates[0], spec.plates[2]
    reference = synth.render_channel(spec, plate, "A01", 1, 5)
    np.testing.assert_array_equal(reference, synth.render_channel(spec, plate, "A01", 1, 5))
    variants = [
        synth.render_channel(spec, other_plate, "A01", 1, 5),
        synth.render_channel(spec, plate, "A02", 1, 5),
        synth.render_channel(spec, plate, "A01", 2, 5),
        synth.render_channel(synth.test_spec(seed=1), plate, "A01", 1, 5),
    ]
    for variant in variants:
        assert not np.array_equal(reference[1:], variant[1:])


def _phenotype_features(spec: synth.SynthSpec, well: str) -> dict[str, float]:
    """Median over 96×96 crops of simple per-stain measurements, pooled over the well's sites."""
    crops: dict[str, list[float]] = {"nucleus_area": [], "mito": [], "rna_over_er": []}
    plate = spec.plates[0]
    for site in range(1, spec.sites + 1):
        images = synth.render_field(spec, plate, well, site)
        for y in range(0, spec.height, 96):
            for x in range(0, spec.width, 96):
                window = (slice(y, y + 96), slice(x, x + 96))
                crops["nucleus_area"].append(_mean_blob_area(images[5][window]))
                crops["mito"].append(_signal(images[1][window]))
                crops["rna_over_er"].append(_signal(images[3][window]) / _signal(images[4][window]))
    return {name: float(np.nanmedian(values)) for name, values in crops.items()}


def _signal(crop: np.ndarray) -> float:
    """Mean above the background level (the dimmest pixels)."""
    return float(crop.mean() - np.percentile(crop, 5))


def _mean_blob_area(dna: np.ndarray) -> float:
    count, _, stats, _ = cv2.connectedComponentsWithStats((dna > 1500).astype(np.uint8))
    areas = stats[1:, cv2.CC_STAT_AREA]
    areas = areas[areas > 20]
    return float(areas.mean()) if len(areas) else np.nan


def test_phenotypes_are_measurably_distinct_in_96px_crops():
    spec = synth.SynthSpec(batches={"2020_11_04_CPJUMP1": (("BR00116991", "2020-11-05T19_51_35"),)},
                           wells=("A01", "B01", "A02", "B02"), sites=2, height=384, width=384)
    features = {synth.PHENOTYPES[synth.phenotype_of(well)]: _phenotype_features(spec, well) for well in spec.wells}
    control = features["control"]
    assert features["large_nuclei"]["nucleus_area"] > 1.8 * control["nucleus_area"]
    assert features["fragmented_mito"]["mito"] > 1.5 * control["mito"]
    assert features["high_rna_dim_er"]["rna_over_er"] > 2.0 * control["rna_over_er"]
    for name in ("large_nuclei", "fragmented_mito", "high_rna_dim_er"):
        others = [value for phenotype, value in features.items() if phenotype != name]
        assert sum(abs(features[name][k] - control[k]) / control[k] > 0.5 for k in control) >= 1, name
        assert features[name] not in others


def test_phenotypes_survive_downsampling_to_224px_crops():
    spec = synth.SynthSpec(batches={"2020_11_04_CPJUMP1": (("BR00116991", "2020-11-05T19_51_35"),)},
                           wells=("A01", "A02"), sites=1, height=540, width=540)
    plate = spec.plates[0]

    def mito_over_dna(well: str) -> float:
        images = synth.render_field(spec, plate, well, 1)
        small = {ch: cv2.resize(images[ch], (270, 270), interpolation=cv2.INTER_AREA)[:224, :224] for ch in (1, 5)}
        return float(small[1].mean() / small[5].mean())

    assert mito_over_dna("A02") > 1.5 * mito_over_dna("A01")  # fragmented_mito vs control


def test_upload_round_trip_through_moto_is_byte_exact_with_unsigned_requests(synthetic):
    client = anonymous_client(synthetic.endpoint_url)
    listed = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=synthetic.bucket, Prefix=synthetic.prefix):
        listed.update({obj["Key"]: obj["Size"] for obj in page.get("Contents", [])})
    assert sorted(listed) == sorted(synthetic.manifest.all_keys)
    for key in synthetic.manifest.all_keys:
        local = (synthetic.root / key).read_bytes()
        body = client.get_object(Bucket=synthetic.bucket, Key=key)["Body"].read()
        assert body == local, key
        assert listed[key] == len(local)


def test_local_copy_has_the_bucket_layout(synthetic):
    local_root = Path(synthetic.local_dataset.split("root=", 1)[1])
    assert local_root == synthetic.root / synthetic.prefix
    assert (local_root / synthetic.manifest.fields[0].keys[1].removeprefix(synthetic.prefix + "/")).is_file()


def test_uploading_a_synced_directory_gives_the_same_objects(s3, synthetic):
    synth.upload(synthetic.root, s3.endpoint_url, "synthetic-from-directory")
    client = anonymous_client(s3.endpoint_url)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="synthetic-from-directory")
    assert sorted(obj["Key"] for page in pages for obj in page["Contents"]) == sorted(synthetic.manifest.all_keys)


def test_demo_spec_is_full_size_with_balanced_phenotypes():
    spec = synth.demo_spec()
    assert (spec.height, spec.width) == (1080, 1080) and 48 <= spec.field_count <= 96
    assert len(spec.batches) == 2 and len({plate.barcode for plate in spec.plates}) < len(spec.plates)
    counts = np.bincount([synth.phenotype_of(well) for well in spec.wells])
    assert len(counts) == len(synth.PHENOTYPES) and counts.min() == counts.max()
    assert all(CPG0000_KEY.match(key) for key in synth.build_manifest(spec).image_keys)
    assert synth.demo_spec(fields=100).field_count >= 100


def test_a_bucket_without_policy_refuses_anonymous_get(s3):
    bucket = s3.create_private_bucket("not-public")
    s3.client().put_object(Bucket=bucket, Key="x.tiff", Body=b"secret")
    with pytest.raises(Exception) as refused:
        anonymous_client(s3.endpoint_url).get_object(Bucket=bucket, Key="x.tiff")
    assert refused.value.response["Error"]["Code"] in ("403", "AccessDenied", "Forbidden")
    assert s3.client().get_object(Bucket=bucket, Key="x.tiff")["Body"].read() == b"secret"
