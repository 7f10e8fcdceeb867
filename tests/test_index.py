"""Index building against moto's real S3 API on loopback: LIST, index files, local walk, cache, errors."""

from __future__ import annotations

import errno
import gzip
import logging
import types
from pathlib import Path

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from prefetchd.config import Config
from prefetchd.dataset import parse_dataset
from prefetchd.errors import EmptyDatasetError, StorageError
from prefetchd.index import build_index, cli_index
from prefetchd.index_cache import cache_file, cache_write_message
from prefetchd.storage_errors import classify_storage_error

from conftest import free_port

PREFIX = "cpg0000-jump-pilot/source_4/images"
B1, B2 = "2020_11_04_CPJUMP1", "2020_11_18_CPJUMP1_TimepointDay1"
P1 = "BR00116991__2020-11-05T19_51_35-Measurement1"          # barcode BR00116991 in batch 1 …
P1B = "BR00116991__2020-11-18T10_00_00-Measurement1"         # … imaged again in batch 2
P2 = "BR00117010__2020-11-19T09_00_00-Measurement 1"         # source-3 style folder with a space
DEFAULT_ORDER = (5, 4, 3, 2, 1)                              # DNA, ER, RNA, AGP, Mito


def image_key(batch: str, plate: str, row: int, col: int, site: int, ch: int) -> str:
    return f"{PREFIX}/{batch}/images/{plate}/Images/r{row:02d}c{col:02d}f{site:02d}p01-ch{ch}sk1fk1fl1.tiff"


def illum_key(batch: str, barcode: str, stain: str) -> str:
    return f"{PREFIX}/{batch}/illum/{barcode}/{barcode}_Illum{stain}.npy"


def dataset_keys() -> dict[str, list[str]]:
    """What the fake bucket holds, by role."""
    complete = [image_key(B1, P1, r, c, s, ch) for r, c in ((1, 1), (2, 2)) for s in (1, 2) for ch in range(1, 9)]
    complete += [image_key(B2, P1B, 1, 1, 1, ch) for ch in range(1, 9)]
    complete += [image_key(B2, P2, 1, 1, 1, ch) for ch in range(1, 6)]          # no brightfield imaged
    incomplete = [image_key(B2, P2, 1, 2, 1, ch) for ch in (1, 2, 4, 5)]         # RNA (ch3) missing
    illum = [illum_key(B1, "BR00116991", s) for s in ("DNA", "ER", "RNA", "AGP", "Mito", "Brightfield")]
    illum += [illum_key(B2, "BR00116991", "DNA")]
    unparsed = [f"{PREFIX}/{B1}/images/{P1}/Images/Index.idx.xml", f"{PREFIX}/{B1}/images/{P1}/notes.csv",
                f"{PREFIX}/{B2}/images/{P2}/Images/r01c01f01p01-ch1sk1fk1fl1_thumb.tiff"]
    return {"complete": complete, "incomplete": incomplete, "illum": illum, "unparsed": unparsed}


def all_keys() -> list[str]:
    return [key for keys in dataset_keys().values() for key in keys]


def body_of(key: str) -> bytes:
    return b"II*\x00" + key.encode()   # TIFF magic + something key-specific: sizes differ per key


def put_all(s3, bucket: str, keys: list[str]) -> None:
    client = s3.client()
    s3.create_public_bucket(bucket)
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=body_of(key))


@pytest.fixture(scope="module")
def bucket(s3) -> str:
    put_all(s3, "jump-index", all_keys())
    return "jump-index"


@pytest.fixture
def s3cfg(s3) -> dict:
    return {"endpoint_url": s3.endpoint_url, "unsigned": True, "retries": 0, "list_concurrency": 4,
            "connect_timeout_s": 2.0, "read_timeout_s": 5.0}


def spec_for(bucket: str, **extra: str):
    options = "".join(f":{k}={v}" for k, v in extra.items())
    return parse_dataset(f"JUMPS3MultiView:bucket={bucket}:prefix={PREFIX}{options}")


def field_id(plate: str, row: int, col: int, site: int) -> str:
    return f"{plate}/{chr(64 + row)}{col:02d}/{site}"


def snapshot(index) -> list[tuple]:
    return [(f.id, f.batch, f.plate, f.well, f.site, f.keys, f.illum_plate) for f in index.fields]


# ---- grouping ----------------------------------------------------------------------------------

async def test_list_groups_fields_per_plate_folder(bucket, s3cfg, tmp_path):
    index = await build_index(spec_for(bucket), s3cfg, tmp_path)
    expected_ids = sorted([field_id(P1, r, c, s) for r, c in ((1, 1), (2, 2)) for s in (1, 2)]
                          + [field_id(P1B, 1, 1, 1), field_id(P2, 1, 1, 1)])
    assert index.ids == expected_ids == [f.id for f in index.fields]
    assert index.plates == sorted([P1, P1B, P2]) and index.batches == [B1, B2]
    assert not index.from_cache and index.cache_path and Path(index.cache_path).exists()
    # the same barcode imaged in two batches stays two plates, never mixed
    by_id = {f.id: f for f in index.fields}
    again = by_id[field_id(P1B, 1, 1, 1)]
    assert again.batch == B2 and all(f"/{B2}/images/{P1B}/" in key for key in again.keys)


async def test_channel_order_sizes_and_etags(bucket, s3cfg, tmp_path):
    index = await build_index(spec_for(bucket), s3cfg, tmp_path)
    field = index.fields[index.ids.index(field_id(P1, 2, 2, 1))]
    assert index.channels == ("DNA", "ER", "RNA", "AGP", "Mito")
    assert field.keys == tuple(image_key(B1, P1, 2, 2, 1, ch) for ch in DEFAULT_ORDER)
    assert field.sizes == tuple(len(body_of(key)) for key in field.keys)
    assert all(etag and '"' not in etag for etag in field.etags)


async def test_incomplete_unparsed_and_illum(bucket, s3cfg, tmp_path):
    index = await build_index(spec_for(bucket), s3cfg, tmp_path)
    assert index.incomplete == 1
    assert index.unparsed == 3 and sorted(index.unparsed_examples) == sorted(dataset_keys()["unparsed"])
    assert index.illum[f"source_4/{B1}/BR00116991"] == tuple(illum_key(B1, "BR00116991", s)
                                                    for s in ("DNA", "ER", "RNA", "AGP", "Mito"))
    assert index.illum[f"source_4/{B2}/BR00116991"] == (illum_key(B2, "BR00116991", "DNA"), None, None, None, None)
    plates = {f.plate: f.illum_plate for f in index.fields}
    assert plates == {P1: f"source_4/{B1}/BR00116991", P1B: f"source_4/{B2}/BR00116991", P2: None}


@pytest.mark.parametrize("below", [f"/{B1}/images/{P1}", f"/{B1}/images/{P1}/Images"])
async def test_a_prefix_below_the_batch_still_finds_the_plates_illum(bucket, s3cfg, tmp_path, below):
    spec = parse_dataset(f"JUMPS3MultiView:bucket={bucket}:prefix={PREFIX}{below}")
    index = await build_index(spec, s3cfg, tmp_path)
    assert {f.plate for f in index.fields} == {P1}
    assert {f.illum_plate for f in index.fields} == {f"source_4/{B1}/BR00116991"}
    assert index.illum[f"source_4/{B1}/BR00116991"][0] == illum_key(B1, "BR00116991", "DNA")


async def test_brightfield_only_when_asked_and_cache_shared(bucket, s3cfg, tmp_path):
    default = await build_index(spec_for(bucket), s3cfg, tmp_path)
    assert not any("-ch6" in k or "-ch7" in k or "-ch8" in k for f in default.fields for k in f.keys)
    bright = await build_index(spec_for(bucket, channels="Brightfield,DNA"), s3cfg, tmp_path)
    assert bright.from_cache                       # same listing, other channels: the cache is shared
    assert bright.channels == ("Brightfield", "DNA") and len(bright) == 5
    assert bright.incomplete == 2                  # P2's two fields have no brightfield
    assert bright.fields[0].keys[0].endswith("-ch8sk1fk1fl1.tiff")
    assert bright.illum[f"source_4/{B1}/BR00116991"][0].endswith("_IllumBrightfield.npy")


async def test_max_samples_is_an_even_spread(bucket, s3cfg, tmp_path):
    full = await build_index(spec_for(bucket), s3cfg, tmp_path)
    subset = await build_index(spec_for(bucket, max_samples="3"), s3cfg, tmp_path)
    assert subset.from_cache and subset.total_fields == len(full) == 6
    assert subset.ids == [full.ids[0], full.ids[2], full.ids[4]]
    assert len(subset.plates) >= 2


# ---- cache -------------------------------------------------------------------------------------

async def test_warm_start_does_not_list_again(s3, s3cfg, tmp_path):
    keys = dataset_keys()["complete"]
    put_all(s3, "jump-warm", keys)
    cold = await build_index(spec_for("jump-warm"), s3cfg, tmp_path)
    client = s3.client()
    for key in keys:                               # the bucket is emptied: only the cache knows the fields
        client.delete_object(Bucket="jump-warm", Key=key)
    warm = await build_index(spec_for("jump-warm"), s3cfg, tmp_path)
    assert warm.from_cache and snapshot(warm) == snapshot(cold)
    with pytest.raises(EmptyDatasetError):         # refresh really lists again
        await build_index(spec_for("jump-warm"), s3cfg, tmp_path, refresh=True)


async def test_cache_is_keyed_by_endpoint(bucket, s3cfg, tmp_path):
    first = await build_index(spec_for(bucket), s3cfg, tmp_path)
    other = {**s3cfg, "endpoint_url": s3cfg["endpoint_url"].replace("127.0.0.1", "localhost")}
    second = await build_index(spec_for(bucket), other, tmp_path)
    assert not second.from_cache and second.cache_path != first.cache_path


async def test_corrupt_cache_is_rebuilt_with_a_warning(bucket, s3cfg, tmp_path, caplog):
    first = await build_index(spec_for(bucket), s3cfg, tmp_path)
    Path(first.cache_path).write_bytes(b"not an arrow file")
    with caplog.at_level(logging.WARNING, logger="prefetchd.index"):
        second = await build_index(spec_for(bucket), s3cfg, tmp_path)
    assert not second.from_cache and snapshot(second) == snapshot(first)
    assert any("unusable" in record.message for record in caplog.records)
    third = await build_index(spec_for(bucket), s3cfg, tmp_path)
    assert third.from_cache


def test_disk_full_is_one_clear_line(tmp_path):
    message = cache_write_message(tmp_path / "index.arrow", OSError(errno.ENOSPC, "No space left on device"))
    assert "no space left" in message and "cache_dir" in message and "\n" not in message


# ---- other sources give the same index --------------------------------------------------------

def aws_ls_lines(keys: list[str]) -> str:
    return "".join(f"2020-11-10 12:00:00 {len(body_of(k)):>10} {k}\n" for k in keys)


def load_data_csv(bucket: str) -> str:
    stains = {"DNA": 5, "ER": 4, "RNA": 3, "AGP": 2, "Mito": 1}
    header = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    header += [f"{kind}_Orig{s}" for s in stains for kind in ("FileName", "PathName")]
    header += [f"{kind}_Illum{s}" for s in stains for kind in ("FileName", "PathName")]
    rows = [",".join(header)]
    fields = [(B1, P1, r, c, s) for r, c in ((1, 1), (2, 2)) for s in (1, 2)] + [(B2, P1B, 1, 1, 1), (B2, P2, 1, 1, 1)]
    for batch, plate, r, c, s in fields:
        row = [plate.split("__")[0], f"{chr(64 + r)}{c:02d}", str(s)]
        for ch in stains.values():
            key = image_key(batch, plate, r, c, s, ch)
            folder, _, name = key.rpartition("/")
            row += [name, f"s3://{bucket}/{folder}"]
        for stain in stains:
            barcode = plate.split("__")[0]
            have = batch == B1 or stain == "DNA"
            name = f"{barcode}_Illum{stain}.npy" if have and plate != P2 else ""
            row += [name, f"s3://{bucket}/{PREFIX}/{batch}/illum/{barcode}" if name else ""]
        rows.append(",".join(f'"{v}"' if " " in v else v for v in row))
    return "\n".join(rows) + "\n"


def inventory_csv(bucket: str, keys: list[str]) -> str:
    from urllib.parse import quote_plus
    return "".join(f'"{bucket}","{quote_plus(k, safe="/")}","{len(body_of(k))}","2020-11-10T12:00:00.000Z"\n'
                   for k in keys)


@pytest.mark.parametrize("kind", ["keys", "keys.gz", "bare", "inventory", "load_data", "load_data.parquet"])
async def test_index_files_match_list(bucket, s3cfg, tmp_path, kind):
    listed = await build_index(spec_for(bucket), s3cfg, tmp_path / "a")
    keys = all_keys()
    path = tmp_path / f"index.{kind}"
    if kind == "keys":
        path.write_text(aws_ls_lines(keys))
    elif kind == "keys.gz":
        path.write_bytes(gzip.compress(aws_ls_lines(keys).encode()))
    elif kind == "bare":
        path.write_text("\n".join(keys) + "\n")
    elif kind == "inventory":
        path.write_text(inventory_csv(bucket, keys))
    else:
        path = tmp_path / "load_data.csv"
        path.write_text(load_data_csv(bucket))
        if kind == "load_data.parquet":
            import pyarrow.csv
            import pyarrow.parquet
            pyarrow.parquet.write_table(pyarrow.csv.read_csv(path), tmp_path / "load_data.parquet")
            path = tmp_path / "load_data.parquet"
    from_file = await build_index(spec_for(bucket, index=str(path)), {"endpoint_url": "http://127.0.0.1:9"},
                                  tmp_path / "b")
    assert snapshot(from_file) == snapshot(listed)
    assert from_file.illum == listed.illum
    if kind.startswith("load_data"):
        return                                     # load_data lists only complete fields, no sizes
    assert (from_file.incomplete, from_file.unparsed) == (listed.incomplete, listed.unparsed)
    sizes = [f.sizes for f in listed.fields] if kind != "bare" else [(-1,) * 5] * len(listed)
    assert [f.sizes for f in from_file.fields] == sizes


async def test_index_file_on_s3(s3, bucket, s3cfg, tmp_path):
    s3.client().put_object(Bucket=bucket, Key="indexes/keys.txt", Body=aws_ls_lines(all_keys()).encode())
    listed = await build_index(spec_for(bucket), s3cfg, tmp_path / "a")
    # a dataset string cannot hold "s3://" (values cannot contain ':'), so this goes through --keys-file
    from_s3 = await build_index(spec_for(bucket), s3cfg, tmp_path / "b", keys_file=f"s3://{bucket}/indexes/keys.txt")
    assert snapshot(from_s3) == snapshot(listed)


async def test_local_walk_matches_list(bucket, s3cfg, tmp_path):
    root = tmp_path / "sync"
    for key in all_keys():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body_of(key))
    listed = await build_index(spec_for(bucket), s3cfg, tmp_path / "a")
    local = await build_index(parse_dataset(f"JUMPLocal:root={root / PREFIX}"), {}, tmp_path / "b")
    assert [f.id for f in local.fields] == listed.ids
    assert [tuple(f"{PREFIX}/{k}" for k in f.keys) for f in local.fields] == [f.keys for f in listed.fields]
    assert (local.incomplete, local.unparsed, local.illum.keys()) == (1, 3, {f"source_4/{B1}/BR00116991",
                                                                             f"source_4/{B2}/BR00116991"})


# ---- errors: one line that says what to change ---------------------------------------------------


async def test_dns_failure_names_the_host(tmp_path, s3cfg):
    cfg = {**s3cfg, "endpoint_url": "http://nonexistent.invalid:9000"}
    with pytest.raises(StorageError) as caught:
        await build_index(spec_for("jump-index"), cfg, tmp_path)
    assert caught.value.code == "dns" and "nonexistent.invalid" in caught.value.message
    assert "AWS_ENDPOINT_URL_S3" in caught.value.message and "\n" not in caught.value.message


async def test_connection_refused_names_the_endpoint(tmp_path, s3cfg):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError) as caught:
        await build_index(spec_for("jump-index"), {**s3cfg, "endpoint_url": url}, tmp_path)
    assert caught.value.code == "connection_refused"
    assert url in caught.value.message and "s3.endpoint_url" in caught.value.message


async def test_no_such_bucket(s3cfg, tmp_path):
    with pytest.raises(StorageError) as caught:
        await build_index(spec_for("no-such-bucket-here"), s3cfg, tmp_path)
    assert caught.value.code == "no_such_bucket" and "'no-such-bucket-here'" in caught.value.message


async def test_empty_prefix(bucket, s3cfg, tmp_path):
    spec = parse_dataset(f"JUMPS3MultiView:bucket={bucket}:prefix=cpg0000-jump-pilot/nothing-here")
    with pytest.raises(EmptyDatasetError, match="no objects under s3://jump-index/cpg0000-jump-pilot/nothing-here/"):
        await build_index(spec, s3cfg, tmp_path)
    assert not list(tmp_path.iterdir())            # nothing cached: fixing the data is picked up at once


async def test_nothing_matches_the_layout(s3, s3cfg, tmp_path):
    junk = [f"junk/{i}/file{i}.txt" for i in range(5)]
    put_all(s3, "jump-junk", junk)
    spec = parse_dataset("JUMPS3MultiView:bucket=jump-junk:prefix=junk")
    with pytest.raises(EmptyDatasetError) as caught:
        await build_index(spec, s3cfg, tmp_path)
    assert "match a JUMP image layout" in caught.value.message
    assert sum(key in caught.value.message for key in junk) == 3


async def test_local_root_missing(tmp_path):
    with pytest.raises(StorageError, match="does not exist.*fix root="):
        await build_index(parse_dataset(f"JUMPLocal:root={tmp_path / 'nope'}"), {}, tmp_path)


def test_access_denied_from_a_real_403(s3):
    """moto answers anonymous GETs on a private bucket with a real 403 AccessDenied."""
    s3.create_private_bucket("jump-private")
    s3.client().put_object(Bucket="jump-private", Key="a.tiff", Body=b"II*\x00")
    anonymous = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name="us-east-1",
                             config=BotoConfig(signature_version=UNSIGNED))
    with pytest.raises(ClientError) as caught:
        anonymous.get_object(Bucket="jump-private", Key="a.tiff")
    error = classify_storage_error(caught.value, s3.endpoint_url, "jump-private")
    assert error.code == "access_denied" and "403" in error.message
    assert "not public" in error.message and "s3.unsigned=false" in error.message


# ---- CLI ---------------------------------------------------------------------------------------

def test_cli_index_refreshes_and_reports(bucket, s3, tmp_path, capsys):
    config = Config.load(overrides=[f"cache_dir={tmp_path}", "s3.retries=0"])
    args = types.SimpleNamespace(dataset=spec_for(bucket).text, endpoint_url=s3.endpoint_url, keys_file=None,
                                 refresh=False)
    assert cli_index(args, config) == 0
    out = capsys.readouterr().out
    assert "fields:            6" in out and "plates:            3" in out and "batches:           2" in out
    assert "incomplete fields: 1" in out and "unparsed keys:     3" in out and "Index.idx.xml" in out
    endpoint = s3.endpoint_url
    assert str(cache_file(tmp_path, spec_for(bucket).cache_key(endpoint))) in out.replace("\n", "")


def test_cli_index_keys_file_fills_the_datasets_cache(bucket, s3, tmp_path, capsys):
    keys = tmp_path / "keys.txt"
    keys.write_text(aws_ls_lines(all_keys()))
    config = Config.load(overrides=[f"cache_dir={tmp_path / 'cache'}"])
    args = types.SimpleNamespace(dataset=spec_for(bucket).text, endpoint_url=s3.endpoint_url,
                                 keys_file=str(keys), refresh=True)
    assert cli_index(args, config) == 0
    assert cache_file(tmp_path / "cache", spec_for(bucket).cache_key(s3.endpoint_url)).exists()


def test_cli_index_error_is_one_line(tmp_path, capsys):
    config = Config.load(overrides=[f"cache_dir={tmp_path}", "s3.retries=0"])
    args = types.SimpleNamespace(dataset=spec_for("jump-index").text,
                                 endpoint_url=f"http://127.0.0.1:{free_port()}", keys_file=None, refresh=True)
    assert cli_index(args, config) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: connection refused") and err.count("\n") == 1
