"""Every cpg0016 microscope layout on moto's real S3 API: grouping, channels from load_data, request counts,
several prefixes, metadata selection, jump_index, a local copy, `prefetchd index --json`, and the daemon
streaming a mixed Phenix + Yokogawa + ImageXpress selection checked from the pixels."""

from __future__ import annotations

import json
import types
from collections import Counter
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest

from prefetchd.client import attach
from prefetchd.config import Config
from prefetchd.dataset import parse_dataset
from prefetchd.dev import synth_layouts as sl
from prefetchd.errors import DatasetError
from prefetchd.index import build_index, cli_index

from faultproxy import FaultProxy

BUCKET = "jump-layouts"
PROJECT = "cpg0016-jump"
S2 = {"DNA": "A01Z01C01", "ER": "A02Z01C02", "RNA": "A03Z01C03", "AGP": "A04Z01C04", "Mito": "A05Z01C05"}
# source 7 images the stains in another order (channel_mapping.csv: DNA 1, ER 4, RNA 3, AGP 5, Mito 2): a table
# guessed from source 2 would serve its Mito as ER
S7 = {"DNA": "A01Z01C01", "ER": "A04Z01C04", "RNA": "A03Z01C03", "AGP": "A05Z01C05", "Mito": "A02Z01C02"}
S9 = {"DNA": "ch4", "ER": "ch1", "RNA": "ch5", "AGP": "ch3", "Mito": "ch2"}
SOURCE_3_FOLDER = "JCPQC051__2022-01-10T10_40_39-Measurement 1"
SPEC = sl.MultiSpec(sources=(
    sl.SourceSpec("source_2", "yokogawa", {"20210607_Batch_2": ("1053601756", "1053601763")}, S2),
    sl.SourceSpec("source_3", "phenix", {"CP59": (SOURCE_3_FOLDER,)}),
    sl.SourceSpec("source_4", "phenix", {"2021_04_26_Batch1": ("BR00117035__2021-05-02T16_02_51-Measurement1",)},
                  load_data="none"),
    sl.SourceSpec("source_5", "yokogawa", {"B5": ("APTJ-1",)}, S2, load_data="none"),
    sl.SourceSpec("source_7", "yokogawa", {"2021_B1": ("CP1-SC1-01",)}, S7),
    sl.SourceSpec("source_8", "imagexpress", {"J3": ("A1166127",)}),
    sl.SourceSpec("source_8", "imagexpress", {"J4": ("A1170383",)}, load_data="none"),
    sl.SourceSpec("source_9", "phenix", {"20210918-Run11": ("GR00004367",)}, S9, load_data="csv"),
))
ORDER = ("DNA", "ER", "RNA", "AGP", "Mito")


@pytest.fixture(scope="module")
def jump(s3):
    manifest = sl.build_manifest(SPEC, BUCKET)
    s3.create_public_bucket(BUCKET)
    sl.upload(manifest, s3.client())
    return manifest


@pytest.fixture
def s3cfg(s3) -> dict:
    return {"endpoint_url": s3.endpoint_url, "unsigned": True, "retries": 0, "list_concurrency": 4,
            "connect_timeout_s": 2.0, "read_timeout_s": 10.0}


def dataset(prefix: str = PROJECT, **options: str) -> str:
    return f"JUMPS3MultiView:bucket={BUCKET}:prefix={prefix}" + "".join(f":{k}={v}" for k, v in options.items())


def expected(manifest, keep=lambda site: True) -> dict[str, tuple[str, ...]]:
    return {s.id: tuple(s.keys[c] for c in ORDER) for s in manifest.sites if keep(s)}


def got(index) -> dict[str, tuple[str, ...]]:
    return {f.id: f.keys for f in index.fields}


def group(index, source: str, batch: str):
    return next(g for g in index.groups if (g.source, g.batch) == (source, batch))


# ---- grouping and channels ---------------------------------------------------------------------

async def test_every_layout_grouped_with_channels_in_order(jump, s3cfg, tmp_path):
    index = await build_index(parse_dataset(dataset()), s3cfg, tmp_path)
    want = expected(jump, lambda s: s.source != "source_5")     # source 5 has no load_data: stains unknown
    assert got(index) == want and len(set(index.ids)) == len(index.ids) == len(want)
    plates = [i.rsplit("/", 2)[0] for i in index.ids]        # sorted by plate, well, site: a plate is one run
    assert plates == sorted(plates) and [i.split("/")[-2:] for i in index.ids[:6]] == [
        ["A01", "1"], ["A01", "2"], ["A02", "1"], ["A02", "2"], ["B01", "1"], ["B01", "2"]]
    by_id = {f.id: f for f in index.fields}
    space = by_id[f"{SOURCE_3_FOLDER}/A01/1"]                   # source 3: the folder's space kept, id unchanged
    assert space.source == "source_3" and space.layout == "phenix" and space.pixel_size_um == pytest.approx(0.598, abs=1e-3)
    bare = by_id["source_9/20210918-Run11/GR00004367/B01/2"]    # no acquisition time: source and batch in the id
    assert bare.keys[0].endswith("r02c01f02p01-ch4sk1fk1fl1.tiff")      # source 9's DNA is ch4 (its load_data)
    yokogawa = by_id["source_7/2021_B1/CP1-SC1-01/A02/1"]
    assert yokogawa.layout == "yokogawa" and yokogawa.shape is None
    assert [k.rsplit("L01", 1)[1] for k in yokogawa.keys] == [f"{S7[c]}.tif" for c in ORDER]
    imagexpress = by_id["source_8/J3/A1166127/A01/1"]
    assert imagexpress.pixel_size_um == pytest.approx(0.7032) and imagexpress.shape == (1024, 1024)
    # the same barcode folder name never mixes plates: every field's keys sit in its own plate folder
    for f in index.fields:
        folder = f.id.rsplit("/", 2)[0].rsplit("/", 1)[-1]
        assert all(f"/{folder}/" in key for key in f.keys)


async def test_yokogawa_channels_come_from_each_sources_load_data(jump, s3cfg, tmp_path):
    index = await build_index(parse_dataset(dataset()), s3cfg, tmp_path)
    assert index.channel_maps["source_2|yokogawa"] == {S2[c]: c for c in ORDER}
    assert index.channel_maps["source_7|yokogawa"] == {S7[c]: c for c in ORDER}
    assert index.channel_maps["source_2|yokogawa"] != index.channel_maps["source_7|yokogawa"]
    no_load_data = group(index, "source_5", "B5")           # never guessed: counted, with an example
    assert (no_load_data.fields, no_load_data.incomplete, no_load_data.unmapped) == (0, 6, 30)
    assert no_load_data.unmapped_examples[0].startswith(f"{PROJECT}/source_5/images/B5/images/APTJ-1/")
    assert index.unmapped == 30


async def test_thumbnails_are_skipped_and_phenix_lists_fall_back_to_the_table(jump, s3cfg, tmp_path):
    index = await build_index(parse_dataset(dataset()), s3cfg, tmp_path)
    listed = group(index, "source_8", "J4")                 # no load_data: LISTed, w-numbers name the stains
    assert listed.origins == ["LIST"] and listed.skipped == 30 and listed.fields == 6
    assert listed.channels_found == list(ORDER)
    assert group(index, "source_8", "J3").origins == ["load_data"] and group(index, "source_8", "J3").skipped == 0
    assert group(index, "source_4", "2021_04_26_Batch1").origins == ["LIST"]
    assert not any(g.unparsed for g in index.groups)
    assert index.illum["source_8/J4/A1170383"][0].endswith("A1170383_IllumDNA.npy")   # illum found by the LIST
    assert index.illum["source_7/2021_B1/CP1-SC1-01"] == tuple(
        f"{PROJECT}/source_7/images/2021_B1/illum/CP1-SC1-01/CP1-SC1-01_Illum{c}.npy" for c in ORDER)


# ---- requests: load_data instead of LIST ---------------------------------------------------------

def requests_of(proxy: FaultProxy) -> tuple[list[dict], list[str]]:
    lists, gets = [], []
    for record in proxy.log:
        url = urlsplit(record.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if record.method == "GET" and "list-type" in query:
            lists.append(query)
        elif record.method == "GET":
            gets.append(url.path)
    return lists, gets


async def test_no_key_listing_when_load_data_exists(jump, s3, s3cfg, tmp_path):
    with FaultProxy(upstream=s3.endpoint_url) as proxy:
        cfg = {**s3cfg, "endpoint_url": proxy.url}
        index = await build_index(parse_dataset(dataset(f"{PROJECT}/source_2,{PROJECT}/source_7")), cfg, tmp_path)
        lists, gets = requests_of(proxy)
    assert got(index) == expected(jump, lambda s: s.source in ("source_2", "source_7"))
    # folder listings only (sources' batches, load_data plates, plate folders): one per level, never a plate's keys
    assert lists and all(q.get("delimiter") == "/" for q in lists), lists
    assert sorted(q["prefix"] for q in lists) == sorted([
        f"{PROJECT}/source_2/images/", f"{PROJECT}/source_2/workspace/load_data_csv/20210607_Batch_2/",
        f"{PROJECT}/source_2/images/20210607_Batch_2/images/",
        f"{PROJECT}/source_7/images/", f"{PROJECT}/source_7/workspace/load_data_csv/2021_B1/",
        f"{PROJECT}/source_7/images/2021_B1/images/"])
    assert sorted(p.rsplit("/", 2)[-2] for p in gets) == ["1053601756", "1053601763", "CP1-SC1-01"]
    assert all(p.endswith("/load_data_with_illum.parquet") for p in gets)
    assert index.discovery["load_data_plates"] == 3 and index.discovery["listed_prefixes"] == []


async def test_with_a_plate_table_nothing_is_listed_at_all(jump, s3, s3cfg, tmp_path):
    table = tmp_path / "plate.csv.gz"
    import gzip
    table.write_bytes(gzip.compress(sl.plate_table_csv(jump)))
    with FaultProxy(upstream=s3.endpoint_url) as proxy:
        cfg = {**s3cfg, "endpoint_url": proxy.url}
        index = await build_index(parse_dataset(dataset(f"{PROJECT}/source_2,{PROJECT}/source_7",
                                                        plate_table=str(table))), cfg, tmp_path)
        lists, gets = requests_of(proxy)
    assert lists == [] and len(gets) == 3
    assert got(index) == expected(jump, lambda s: s.source in ("source_2", "source_7"))


# ---- several prefixes and metadata selection ----------------------------------------------------

async def test_several_prefixes_in_one_dataset_string_or_list(jump, s3cfg, tmp_path):
    prefixes = [f"{PROJECT}/source_2/images/20210607_Batch_2", f"{PROJECT}/source_8/images/J3/images/A1166127",
                f"{PROJECT}/source_3"]
    want = expected(jump, lambda s: (s.source, s.batch) in {("source_2", "20210607_Batch_2"), ("source_8", "J3"),
                                                            ("source_3", "CP59")})
    joined = await build_index(parse_dataset(dataset(",".join(prefixes))), s3cfg, tmp_path)
    assert got(joined) == want
    as_list = parse_dataset([dataset(p) for p in prefixes])
    assert as_list.prefixes == tuple(prefixes)
    assert got(await build_index(as_list, s3cfg, tmp_path)) == want


async def test_selection_by_source_batch_plate_well_and_plate_type(jump, s3cfg, tmp_path):
    table = tmp_path / "plate.csv"
    table.write_bytes(sl.plate_table_csv(jump, {"1053601763": "ORF", "A1166127": "ORF", "GR00004367": "CRISPR"}))
    cases = {
        "source=2,source_8": lambda s: s.source in ("source_2", "source_8"),
        "source=8:batch=J3": lambda s: s.batch == "J3",
        "plate=1053601756,GR00004367": lambda s: s.barcode in ("1053601756", "GR00004367"),
        "well=a1,B01:source=source_7": lambda s: s.well in ("A01", "B01") and s.source == "source_7",
        f"plate_type=ORF:plate_table={table}": lambda s: s.barcode in ("1053601763", "A1166127"),
    }
    for options, keep in cases.items():
        pairs = dict(pair.split("=", 1) for pair in options.split(":"))
        index = await build_index(parse_dataset(dataset(**pairs)), s3cfg, tmp_path)
        assert got(index) == expected(jump, lambda s: keep(s) and s.source != "source_5"), options


@pytest.mark.parametrize("options, message", [
    ({"source": "source_99"}, "source=source_99 matches no source under s3://jump-layouts/cpg0016-jump/; sources here: source_2, source_3"),
    ({"well": "P24"}, "well=P24 matches no field of this dataset; wells here: A01, A02, B01"),
    ({"plate_type": "TARGET9"}, "plate_type=TARGET9 is not in the plate table"),
])
async def test_a_selection_that_matches_nothing_names_what_is_there(jump, s3cfg, tmp_path, options, message):
    if "plate_type" in options:
        table = tmp_path / "plate.csv"
        table.write_bytes(sl.plate_table_csv(jump))
        options = {**options, "plate_table": str(table)}
    with pytest.raises(DatasetError) as caught:
        await build_index(parse_dataset(dataset(**options)), s3cfg, tmp_path)
    assert message in caught.value.message and "\n" not in caught.value.message
    if "plate_type" in options:
        assert "accepted: COMPOUND" in caught.value.message


# ---- other index sources ------------------------------------------------------------------------

async def test_jump_index_parquet_gives_every_site_without_touching_s3(jump, tmp_path):
    path = tmp_path / "jump_index.parquet"
    pq.write_table(sl.jump_index_table(jump), path, row_group_size=7)    # several record batches
    spec = parse_dataset(dataset(index=str(path)))
    index = await build_index(spec, {"endpoint_url": "http://127.0.0.1:9", "retries": 0}, tmp_path)
    assert got(index) == expected(jump)         # source 5 too: the index names each stain's URL
    assert group(index, "source_5", "B5").origins == ["index file"]
    warm = await build_index(spec, {"endpoint_url": "http://127.0.0.1:9"}, tmp_path)
    assert warm.from_cache and got(warm) == got(index)
    one = await build_index(parse_dataset(dataset(f"{PROJECT}/source_9", index=str(path))),
                            {"endpoint_url": "http://127.0.0.1:9"}, tmp_path)
    assert got(one) == expected(jump, lambda s: s.source == "source_9")


async def test_local_copy_reads_the_load_data_beside_it(jump, tmp_path):
    sl.write_local(jump, tmp_path / "sync")
    root = tmp_path / "sync" / PROJECT / "source_7" / "images"
    index = await build_index(parse_dataset(f"JUMPLocal:root={root}"), {}, tmp_path / "cache")
    prefix = f"{PROJECT}/source_7/images/"
    assert got(index) == {i: tuple(k[len(prefix):] for k in keys)
                          for i, keys in expected(jump, lambda s: s.source == "source_7").items()}
    assert index.illum["source_7/2021_B1/CP1-SC1-01"][0] == "2021_B1/illum/CP1-SC1-01/CP1-SC1-01_IllumDNA.npy"


# ---- seen by a user ----------------------------------------------------------------------------

def test_cli_index_json_per_source_and_batch(jump, s3, tmp_path, capsys):
    config = Config.load(overrides=[f"cache_dir={tmp_path}", "s3.retries=0"])
    args = types.SimpleNamespace(dataset=dataset(), endpoint_url=s3.endpoint_url, keys_file=None, json=True)
    assert cli_index(args, config) == 0
    summary = json.loads(capsys.readouterr().out)
    groups = {(g["source"], g["batch"]): g for g in summary["groups"]}
    assert summary["fields"] == len(expected(jump)) - 6 and summary["unmapped"] == 30
    yokogawa = groups["source_2", "20210607_Batch_2"]
    assert {k: yokogawa[k] for k in ("layouts", "plates", "fields", "incomplete", "origins", "channels_found")} == {
        "layouts": ["yokogawa"], "plates": 2, "fields": 12, "incomplete": 0, "origins": ["load_data"],
        "channels_found": list(ORDER)}
    assert groups["source_8", "J4"]["skipped"] == 30 and groups["source_8", "J4"]["pixel_size_um"] == 0.7032
    assert groups["source_5", "B5"]["unmapped"] == 30 and groups["source_5", "B5"]["fields"] == 0
    assert summary["optics"]["source_3"]["pixel_size_um"] == pytest.approx(0.597976)


def test_cli_index_table_names_each_source(jump, s3, tmp_path, capsys):
    config = Config.load(overrides=[f"cache_dir={tmp_path}", "s3.retries=0"])
    args = types.SimpleNamespace(dataset=dataset(), endpoint_url=s3.endpoint_url, keys_file=None, json=False)
    assert cli_index(args, config) == 0
    out = capsys.readouterr().out
    for source in ("source_2", "source_3", "source_4", "source_5", "source_7", "source_8", "source_9"):
        assert source in out
    assert "unmapped channels: 30" in out and "source_5/B5 unmapped:" in out
    assert "imagexpress" in out and "yokogawa" in out and "phenix" in out


# ---- the whole path: daemon → shared memory → consumer -----------------------------------------

RAW = {"illum": True, "clahe": False, "rescale": False}    # illum files are all ones: pixels stay exact


def test_daemon_streams_a_mixed_selection_with_the_right_stain_in_every_channel(jump, daemon):
    # a config list of dataset strings: one dataset, their prefixes joined
    mixed = [dataset(f"{PROJECT}/source_3"), dataset(f"{PROJECT}/source_7"), dataset(f"{PROJECT}/source_8/images/J3")]
    sites = [s for s in jump.sites if s.source in ("source_3", "source_7") or s.batch == "J3"]
    by_signature = {sl.expected_signature(s, "DNA"): s for s in sites}
    d = daemon()
    with attach(mixed, batch_size=4, socket=d.socket, cache_size=len(sites), **RAW) as stream:
        assert stream.channels == list(ORDER) and stream.shape == (5, SPEC.height, SPEC.width)
        for epoch in range(2):
            received: Counter = Counter()
            for batch in stream.epoch(epoch):
                for i, field_id in enumerate(batch.ids):
                    site = by_signature[sl.decode_signature(batch.images[i, 0])]   # who it is, from the pixels
                    for c, stain in enumerate(ORDER):
                        assert sl.decode_signature(batch.images[i, c]) == sl.expected_signature(site, stain), \
                            (field_id, stain)
                    np.testing.assert_array_equal(batch.images[i, 1], sl.render(site, "ER"))
                    assert field_id == site.id
                    received[site.id] += 1
            assert received == Counter({s.id: 1 for s in sites}), f"epoch {epoch}"
    assert {s.source for s in sites} == {"source_3", "source_7", "source_8"}


# ---- prefetchd check on any cpg0016 prefix -------------------------------------------------------

async def test_check_passes_on_every_layout_and_names_what_load_data_gives(jump, s3cfg):
    from prefetchd.check import run_checks

    prefixes = [f"{PROJECT}/source_7/images/2021_B1", f"{PROJECT}/source_8/images/J4", f"{PROJECT}/source_9"]
    results = await run_checks(parse_dataset(dataset(",".join(prefixes))), s3cfg)
    assert [(r.name, r.ok) for r in results] == [(n, True) for n in ("endpoint", "DNS", "TCP connect", "bucket")] \
        + [("prefix", True), ("GET", True)] * 3, [r.line() for r in results]
    prefix_lines = [r.line() for r in results if r.name == "prefix"]
    assert "yokogawa layout (source_7)" in prefix_lines[0] and "channels from load_data" in prefix_lines[0]
    assert "imagexpress layout (source_8)" in prefix_lines[1] and "LISTed key by key" in prefix_lines[1]
    assert "phenix layout (source_9)" in prefix_lines[2] and "load_data_with_illum.csv" in prefix_lines[2]
    assert "_thumb" not in " ".join(r.line() for r in results if r.name == "GET")
    whole = await run_checks(parse_dataset(dataset(PROJECT)), s3cfg)      # the project itself
    assert all(r.ok for r in whole) and len(whole) == 6 and "yokogawa layout (source_2)" in whole[4].line()


async def test_check_fails_a_yokogawa_prefix_without_load_data_with_the_fix(jump, s3cfg):
    from prefetchd.check import run_checks

    results = await run_checks(parse_dataset(dataset(f"{PROJECT}/source_5")), s3cfg)
    assert results[-1].name == "prefix" and not results[-1].ok
    line = results[-1].line()
    assert "no load_data for plate APTJ-1" in line and "index=" in line and "\n" not in line


async def test_load_data_with_mount_paths_is_placed_under_its_batch(s3, s3cfg, tmp_path):
    """cpg0000-era load_data names folders on the machine that ran CellProfiler, not s3:// URLs."""
    spec = sl.MultiSpec(project="cpg0000-jump-pilot", sources=(
        sl.SourceSpec("source_4", "phenix", {"2020_11_04_CPJUMP1": ("BR00116991__2020-11-05T19_51_35-Measurement1",)},
                      load_data="csv"),))
    manifest = sl.build_manifest(spec, "jump-mount")
    for key, body in manifest.extra.items():
        if key.endswith(".csv"):
            manifest.extra[key] = body.replace(b"s3://jump-mount/cpg0000-jump-pilot/source_4/images/",
                                               b"/home/ubuntu/bucket/projects/2019_07_11_JUMP-CP/")
    s3.create_public_bucket("jump-mount")
    sl.upload(manifest, s3.client())
    index = await build_index(parse_dataset("JUMPS3MultiView:bucket=jump-mount:prefix=cpg0000-jump-pilot/source_4/"
                                            "images"), s3cfg, tmp_path)
    assert got(index) == expected(manifest)
    assert index.discovery["load_data_plates"] == 1 and index.discovery["listed_prefixes"] == []
    assert index.illum["source_4/2020_11_04_CPJUMP1/BR00116991"][0].startswith("cpg0000-jump-pilot/source_4/images/")


async def test_dozens_of_plates_one_get_each(s3, s3cfg, tmp_path):
    """36 plates in 4 batches of 2 sources: one GET per plate (a batch's first CSV plate probes the names),
    plates read concurrently into one reader, every field exact."""
    batches = {f"B{b}": tuple(f"P{b}{p:02d}" for p in range(9)) for b in range(2)}
    spec = sl.MultiSpec(sources=(
        sl.SourceSpec("source_2", "yokogawa", batches, S2, wells=("A01", "P24"), sites=1, illum=False),
        sl.SourceSpec("source_7", "yokogawa", {f"C{b}": plates for b, plates in enumerate(batches.values())}, S7,
                      wells=("A01", "P24"), sites=1, illum=False, load_data="csv")), height=8, width=8)
    manifest = sl.build_manifest(spec, "jump-dozens")
    s3.create_public_bucket("jump-dozens")
    sl.upload(manifest, s3.client(max_pool=32), workers=16)
    with FaultProxy(upstream=s3.endpoint_url) as proxy:
        cfg = {**s3cfg, "endpoint_url": proxy.url, "list_concurrency": 8}
        index = await build_index(parse_dataset(f"JUMPS3MultiView:bucket=jump-dozens:prefix={PROJECT}"), cfg,
                                  tmp_path)
        lists, gets = requests_of(proxy)
    assert got(index) == expected(manifest) and len(index) == 72
    assert index.discovery["load_data_plates"] == 36 and index.discovery["listed_prefixes"] == []
    assert len(gets) == 36 + 2 * 2          # per CSV batch, its first plate tried .parquet and .csv.gz first
    assert all("delimiter" in q for q in lists) and len(lists) == 1 + 2 + 4 * 2
