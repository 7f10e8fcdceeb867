"""The shape of a job's fields: decided from sampled fields per source (not the first one read), mixed sizes
refused with the sizes per source, or centre-cropped / reflect-padded exactly (checked against an independent
numpy index computation on 1080² Phenix and 1024² ImageXpress fields that encode their identity)."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest
from rich.console import Console

from prefetchd.client import attach
from prefetchd.dataset import parse_dataset
from prefetchd.decode import assemble_field, field_plane_shapes, tiff_shape
from prefetchd.dev import synth_layouts as sl
from prefetchd.errors import ConfigError, CorruptObjectError, DatasetError, ErrorCode
from prefetchd.field_shape import FitMode, GroupSample, ShapeOption, decide_shape, fit_plane, parse_shape
from prefetchd.index import build_index
from prefetchd.jump_sources import CPG0016_OPTICS
from prefetchd.options import resolve_options
from prefetchd.preprocess import Preprocessing, apply_channel
from prefetchd.status_view import render_status

RAW = Preprocessing.from_options(illum=False, rescale=False, clahe=False)
PHENIX, IMAGEXPRESS = (1080, 1080), (1024, 1024)


def site(source: str, shape: tuple[int, int], well: str = "B03", number: int = 2) -> sl.SynthSite:
    return sl.SynthSite(id=f"{source}/P1/{well}/{number}", source=source, batch="B1", folder="P1", barcode="P1",
                        well=well, site=number, keys={}, shape=shape)


def reflect(i: np.ndarray, n: int) -> np.ndarray:
    """numpy's 'reflect' index rule written out: …, 2, 1, [0, 1, …, n-1], n-2, n-3, … (edge not repeated)."""
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i < n, i, period - i)


def centred(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The centred window of `size` over `image`, reflected where it reaches past an edge."""
    (h, w), (H, W) = image.shape, size
    rows = reflect(np.arange(H) + (h - H) // 2 if h >= H else np.arange(H) - (H - h) // 2, h)
    cols = reflect(np.arange(W) + (w - W) // 2 if w >= W else np.arange(W) - (W - w) // 2, w)
    return image[np.ix_(rows, cols)]


# ---- the option ----------------------------------------------------------------------------------

def test_shape_option_accepts_the_documented_forms_and_names_what_is_wrong():
    assert parse_shape(None) is None and parse_shape(False) is None
    assert parse_shape({"size": [1024, 1024], "mode": "crop"}) == ShapeOption(FitMode.CROP, (1024, 1024))
    assert parse_shape({"size": 1024, "mode": "pad"}) == ShapeOption(FitMode.PAD, (1024, 1024))
    assert parse_shape({"mode": "crop"}) == ShapeOption(FitMode.CROP, None)
    for bad, message in [({"size": [1024, 1024], "mode": "squash"}, "shape.mode must be one of crop, pad, crop_or_pad"),
                         ({"mode": "crop_or_pad"}, "crop_or_pad needs shape.size"),
                         ({"size": [0, 10]}, r"shape.size must be \[height, width\]"),
                         ({"size": [10 ** 9, 10]}, r"shape.size must be \[height, width\]"),
                         ({"size": [10, 10], "fill": 0}, "unknown shape option"),
                         ("1024", "shape must be null or a mapping")]:
        with pytest.raises(ConfigError, match=message):
            parse_shape(bad)
    options = resolve_options({"shape": {"size": [64, 64], "mode": "crop"}},
                              {"cache_size": 8, "prefetch_factor": 1, "policy": "lru", "drop_last": False,
                               "illum": True})
    assert options.shape == ShapeOption(FitMode.CROP, (64, 64))


# ---- exact pixels --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, size", [("crop", IMAGEXPRESS), ("pad", PHENIX), ("crop_or_pad", (1040, 1060))])
def test_phenix_and_imagexpress_fields_made_one_size_exactly(mode, size):
    option = parse_shape({"size": list(size), "mode": mode})
    for source, shape in (("source_3", PHENIX), ("source_8", IMAGEXPRESS)):
        s = site(source, shape)
        names = [f"{source}/{stain}.tif" for stain in sl.STAINS]
        blobs = [sl.tiff_bytes(sl.render(s, stain)) for stain in sl.STAINS]
        assert field_plane_shapes(blobs, names) == [shape] * 5
        out = np.zeros((5, *size), np.uint16)
        assemble_field(blobs, [None] * 5, RAW, out, names, option)
        for c, stain in enumerate(sl.STAINS):
            image = sl.render(s, stain)
            np.testing.assert_array_equal(out[c], centred(image, size))
            np.testing.assert_array_equal(out[c], _numpy_fit(image, size))
            assert sl.decode_centre_signature(out[c]) == sl.expected_signature(s, stain)


def _numpy_fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The same with numpy's own slicing and np.pad: centre crop where larger, reflect pad where smaller."""
    (h, w), (H, W) = image.shape, size
    top, left = max(0, (h - H) // 2), max(0, (w - W) // 2)
    part = image[top:top + min(h, H), left:left + min(w, W)]
    ph, pw = H - part.shape[0], W - part.shape[1]
    return np.pad(part, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode="reflect")


def test_preprocessing_runs_at_the_fields_own_size_before_the_crop():
    """Percentiles and CLAHE tiles see the field as imaged; the crop takes the centre of that result."""
    opts = Preprocessing.from_options(illum=True, rescale={"low": 1, "high": 99}, clahe={"tile_grid": 4})
    s = site("source_3", (200, 216))
    illum = np.random.default_rng(0).uniform(0.5, 2.0, (200, 216)).astype(np.float32)
    blobs = [sl.tiff_bytes(sl.render(s, stain)) for stain in sl.STAINS]
    out = np.zeros((5, 160, 160), np.uint16)
    assemble_field(blobs, [illum] * 5, opts, out, ["x"] * 5, parse_shape({"size": [160, 160], "mode": "crop"}))
    for c, stain in enumerate(sl.STAINS):
        native = np.empty((200, 216), np.uint16)
        apply_channel(sl.render(s, stain), illum, opts, native)
        np.testing.assert_array_equal(out[c], native[20:180, 28:188])


def test_a_field_that_cannot_be_made_the_size_is_refused_with_both_sizes():
    small = sl.tiff_bytes(sl.render(site("source_8", (64, 64)), "DNA"))
    assert tiff_shape(small) == (64, 64)
    out = np.zeros((1, 72, 72), np.uint16)
    with pytest.raises(CorruptObjectError, match="DNA.tif: image is 64×64, smaller than shape.size 72×72 in crop mode"):
        assemble_field([small], [None], RAW, out, ["DNA.tif"], parse_shape({"size": [72, 72], "mode": "crop"}))
    with pytest.raises(CorruptObjectError, match="image is 64×64, the dataset's fields are 72×72"):
        assemble_field([small], [None], RAW, out, ["DNA.tif"], None)
    with pytest.raises(CorruptObjectError, match="larger than shape.size 32×32 in pad mode"):
        fit_plane(np.zeros((64, 64), np.uint16), np.zeros((32, 32), np.uint16), parse_shape({"mode": "pad", "size": 32}))


# ---- the decision --------------------------------------------------------------------------------

def group(name, *shapes, nominal=None) -> GroupSample:
    g = GroupSample(name, nominal)
    for shape in shapes:
        g.add([shape] * 5)
    return g


def test_one_odd_sampled_field_does_not_decide_the_shape():
    odd_first = group("source_4", (32, 32), (64, 64), (64, 64), nominal=(1080, 1080))
    assert decide_shape([odd_first], None).size == (64, 64)
    one_odd_plane = GroupSample("source_4")
    one_odd_plane.add([(32, 32), (64, 64), (64, 64), (64, 64), (64, 64)])   # its DNA TIFF is small
    assert one_odd_plane.shape == (64, 64)
    assert decide_shape([group("source_3", (40, 40), (48, 48), nominal=(48, 48))], None).size == (48, 48)  # tie


def test_mixed_sources_are_refused_in_one_line_naming_the_sizes_per_source():
    groups = [group("source_3", PHENIX, PHENIX, PHENIX), group("source_8", IMAGEXPRESS, IMAGEXPRESS),
              group("source_9", PHENIX)]
    with pytest.raises(DatasetError) as caught:
        decide_shape(groups, None)
    message = caught.value.message
    assert caught.value.code == ErrorCode.MIXED_SHAPES and "\n" not in message
    assert "source_8 1024×1024" in message and "source_3, source_9 1080×1080" in message
    assert "shape={'size': [1024, 1024], 'mode': 'crop'}" in message
    assert decide_shape(groups, parse_shape({"mode": "crop"})).size == IMAGEXPRESS
    assert decide_shape(groups, parse_shape({"mode": "pad"})).size == PHENIX
    assert decide_shape(groups, parse_shape({"mode": "crop_or_pad", "size": [512, 2048]})).size == (512, 2048)
    with pytest.raises(DatasetError, match="shape.mode crop cannot make 1080×1080 fields of source_8 1024×1024"):
        decide_shape(groups, parse_shape({"mode": "crop", "size": 1080}))
    with pytest.raises(DatasetError, match="shape.mode pad cannot make 1024×1024 fields of source_3, source_9 1080×1080"):
        decide_shape(groups, parse_shape({"mode": "pad", "size": 1024}))


def test_a_source_with_no_readable_sample_counts_with_its_nominal_shape():
    groups = [group("source_3", (64, 64)), GroupSample("source_8", nominal=IMAGEXPRESS)]
    with pytest.raises(DatasetError, match="source_8 1024×1024"):
        decide_shape(groups, None)
    assert decide_shape([group("source_3", (64, 64)), GroupSample("")], None).size == (64, 64)


# ---- through the daemon: real S3 API, real shared memory --------------------------------------------



BUCKET = "jump-shapes"
PROJECT = "cpg0016-jump"
ORDER = ("DNA", "ER", "RNA", "AGP", "Mito")
STREAM = {"illum": False, "clahe": False, "rescale": False}
MIXED = sl.MultiSpec(sources=(
    sl.SourceSpec("source_3", "phenix", {"CP59": ("JCPQC051__2022-01-10T10_40_39-Measurement1",)},
                  wells=("A01", "A02", "B01"), sites=2, height=72, width=72),
    sl.SourceSpec("source_8", "imagexpress", {"J3": ("A1166127",)}, wells=("A01", "C03", "D04"), sites=2),
), height=64, width=64)
ODD = sl.MultiSpec(sources=(
    sl.SourceSpec("source_4", "phenix", {"B1": ("BR00117035__2021-05-02T16_02_51-Measurement1",
                                                "BR00117036__2021-05-02T18_02_51-Measurement1")},
                  wells=("A01", "A02", "B01", "B02"), sites=3, illum=False),
), project="odd-project", height=64, width=64)


@pytest.fixture(scope="module")
def shapes_bucket(s3):
    s3.create_public_bucket(BUCKET)
    mixed = sl.build_manifest(MIXED, BUCKET)
    sl.upload(mixed, s3.client())
    odd = sl.build_manifest(ODD, BUCKET)
    sl.upload(odd, s3.client())
    return mixed, odd


def dataset(prefix: str) -> str:
    return f"JUMPS3MultiView:bucket={BUCKET}:prefix={prefix}"


def test_one_small_dna_tiff_in_the_first_field_quarantines_that_field_alone(s3, shapes_bucket, daemon, tmp_path):
    """Issue #16 defect 1: the field read first used to fix the shape, so every other field was quarantined."""
    _, odd = shapes_bucket
    s3cfg = {"endpoint_url": s3.endpoint_url, "unsigned": True, "retries": 0}
    index = await_index(dataset("odd-project/source_4"), s3cfg, tmp_path)
    first = index.fields[0]
    by_id = odd.by_id()
    assert first.id in by_id and len(index.fields) == 24
    small = by_id[first.id]
    s3.client().put_object(Bucket=BUCKET, Key=small.keys["DNA"],
                           Body=sl.tiff_bytes(sl.render(sl.SynthSite(**{**small.__dict__, "shape": (32, 32)}), "DNA")))
    d = daemon()
    with attach(dataset("odd-project/source_4"), batch_size=4, socket=d.socket, cache_size=24, job="odd",
                **STREAM) as stream:
        assert stream.shape == (5, 64, 64)
        delivered = Counter()
        for batch in stream.epoch(0):
            for i in range(len(batch.ids)):
                site = _site_of(batch.images[i], odd.sites)
                for c, stain in enumerate(ORDER):
                    np.testing.assert_array_equal(batch.images[i, c], sl.render(site, stain))
                delivered[site.id] += 1
        status = stream.status()
    quarantined = status["jobs"][0]["quarantined"]
    assert [q["field"] for q in quarantined] == [first.id]
    assert "32×32" in quarantined[0]["reason"] and "64×64" in quarantined[0]["reason"]
    assert set(delivered) == {s.id for s in odd.sites} - {first.id}
    assert sum(delivered.values()) == 24   # the quarantined field's uses went to substitutes


def await_index(text, s3cfg, tmp_path):
    return asyncio.run(build_index(parse_dataset(text), s3cfg, tmp_path))


def _site_of(image: np.ndarray, sites) -> sl.SynthSite:
    """Who a delivered field is, from its DNA channel's centre signature alone."""
    signature = sl.decode_centre_signature(image[0])
    found = [s for s in sites if sl.expected_signature(s, "DNA") == signature]
    assert len(found) == 1, f"no synthetic field has the signature {signature}"
    return found[0]


def test_mixed_phenix_and_imagexpress_refused_then_cropped_and_padded_exactly(shapes_bucket, daemon):
    mixed, _ = shapes_bucket
    prefixes = f"{PROJECT}/source_3,{PROJECT}/source_8"
    d = daemon()
    with pytest.raises(DatasetError) as caught:
        attach(dataset(prefixes), batch_size=4, socket=d.socket, cache_size=12, **STREAM)
    assert caught.value.code == ErrorCode.MIXED_SHAPES and "\n" not in caught.value.message
    assert "source_8 64×64" in caught.value.message and "source_3 72×72" in caught.value.message

    for job, shape, size in [("crop", {"mode": "crop"}, (64, 64)), ("pad", {"mode": "pad"}, (72, 72)),
                             ("both", {"mode": "crop_or_pad", "size": [68, 76]}, (68, 76))]:
        with attach(dataset(prefixes), batch_size=4, socket=d.socket, cache_size=12, job=job, shape=shape,
                    **STREAM) as stream:
            assert stream.shape == (5, *size)
            assert stream.field_shape["size"] == list(size)
            assert any(s.startswith("source_3 72×72") for s in stream.field_shape["sources"])
            delivered = Counter()
            for batch in stream.epoch(0):
                assert batch.images.shape[1:] == (5, *size)
                for i in range(len(batch.ids)):
                    site = _site_of(batch.images[i], mixed.sites)
                    assert batch.ids[i] == site.id
                    for c, stain in enumerate(ORDER):
                        assert sl.decode_centre_signature(batch.images[i, c]) == sl.expected_signature(site, stain)
                        np.testing.assert_array_equal(batch.images[i, c], centred(sl.render(site, stain), size))
                    assert batch.pixel_size_um[i] == pytest.approx(CPG0016_OPTICS[site.source].pixel_size_um)
                    delivered[site.id] += 1
            assert delivered == Counter({s.id: 1 for s in mixed.sites}), job
            status = stream.status()
            assert next(j for j in status["jobs"] if j["job"] == job)["quarantined"] == []
            console = Console(record=True, width=240)
            console.print(render_status(status))
            assert f"{job}: fields {size[0]}×{size[1]} ({shape['mode']}); source_3 72×72" in console.export_text()


def test_the_trainer_config_attaches_a_mixed_selection_and_crops_at_one_micron_scale(shapes_bucket, daemon):
    """`s3.shape` reaches the daemon; `batch.pixel_size_um` reaches the scale-aware crops."""
    import torch

    from trainer.config import load_config
    from trainer.data.augmentations import make_augmentation
    from trainer.data.source import make_source
    from trainer.data.to_device import images_to_device, normalize_per_channel

    d = daemon()
    cfg = load_config(None, [f"train.dataset_path={dataset(f'{PROJECT}/source_3,{PROJECT}/source_8')}",
                             f"s3.socket={d.socket}", "s3.shape={mode: pad}", "s3.illum=false", "s3.rescale=false",
                             "s3.clahe=false", "s3.cache_size=12", "train.batch_size_per_gpu=4",
                             "crops.pixel_size_um=0.65", "crops.global_crops_size=16", "crops.local_crops_size=8"])
    assert cfg["s3"]["shape"] == {"mode": "pad"}
    source = make_source(cfg, 0, 1)
    try:
        assert source.shape == (5, 72, 72)
        batch = next(iter(source.epoch(0)))
        assert np.isfinite(batch.pixel_size_um).all()
        assert {round(float(p), 4) for p in batch.pixel_size_um} <= {0.598, 0.7032}
        augment = make_augmentation(cfg)
        images = normalize_per_channel(images_to_device(batch.images, torch.device("cpu")))
        crops = augment(images, torch.Generator().manual_seed(0), pixel_size_um=batch.pixel_size_um)
        expected_zoom = 0.65 / torch.as_tensor(batch.pixel_size_um)
        assert torch.allclose(augment.zoom(batch.pixel_size_um, 4), expected_zoom)
        assert crops["global_crops"].shape == (2 * 4, 1, 16, 16)
    finally:
        source.close()


def test_samples_spread_over_a_source_with_spares_from_its_start():
    from prefetchd.filler import _candidates

    positions = np.arange(100, 200)
    primary, spare = _candidates(positions, 3, 4)
    assert primary == [100, 150, 199] and spare == [101, 102, 103, 104]
    assert _candidates(np.array([7]), 3, 4) == ([7], [])
    assert _candidates(np.array([], np.int64), 3, 4) == ([], [])
