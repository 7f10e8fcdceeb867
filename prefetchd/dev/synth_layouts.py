"""Synthetic cpg0016-style sources in every microscope layout, with their load_data, for tests and benchmarks.

    <project>/<source>/images/<batch>/images/<plate folder>/Images/r01c01f01p01-ch5sk1fk1fl1.tiff   Phenix
    <project>/<source>/images/<batch>/images/<plate>/<plate>_A01_T0001F001L01A01Z01C01.tif          Yokogawa
    <project>/<source>/images/<batch>/images/<plate>/Images/HTS_A01_s1_w1<GUID>.tif (+ _thumb)      ImageXpress
    <project>/<source>/images/<batch>/illum/<barcode>/<barcode>_Illum<Stain>.npy
    <project>/<source>/workspace/load_data_csv/<batch>/<barcode>/load_data_with_illum.parquet (or .csv)

Every image is uint16 with its identity in the first pixels of row 0 and again at its centre (source number,
plate code, row, column, site, stain; all above 255; the centre copy survives a centre crop or pad), so a consumer can check from the pixels alone that it got the right
field and the right stain in each channel. Each source gets its own channel tokens (which C/A numbers or
ch numbers hold which stain), given in the spec: only load_data says, as in the real release.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile

from prefetchd.channels import PHENIX_CHANNELS
from prefetchd.layouts import has_acquisition_time, row_name

STAINS = ("DNA", "ER", "RNA", "AGP", "Mito")
STAIN_CODE = {stain: i + 1 for i, stain in enumerate(PHENIX_CHANNELS)}      # Mito 1 … DNA 5 … Brightfield 8
SIGNATURE_OFFSET = 1000
SIGNATURE_LENGTH = 6
PLATE_CODE_RANGE = 60000
PHENIX_TOKENS = {stain: f"ch{number}" for stain, number in PHENIX_CHANNELS.items()}
IMAGEXPRESS_TOKENS = {"Mito": "w1", "AGP": "w2", "RNA": "w3", "ER": "w4", "DNA": "w5"}


@dataclass(frozen=True)
class SourceSpec:
    source: str                                  # "source_2"
    layout: str                                  # "phenix" | "yokogawa" | "imagexpress"
    batches: dict[str, tuple[str, ...]]          # batch → plate folders
    tokens: dict[str, str] | None = None         # stain → token ("ch4", "A02Z01C02", "w5"); None: the layout's
    wells: tuple[str, ...] = ("A01", "A02", "B01")
    sites: int = 2
    load_data: str = "parquet"                   # "parquet" | "csv" | "none"
    illum: bool = True
    height: int | None = None                    # None: the dataset's
    width: int | None = None

    def token_of(self, stain: str) -> str:
        if self.tokens is not None:
            return self.tokens[stain]
        return {"phenix": PHENIX_TOKENS, "imagexpress": IMAGEXPRESS_TOKENS}[self.layout][stain]


@dataclass(frozen=True)
class MultiSpec:
    sources: tuple[SourceSpec, ...]
    project: str = "cpg0016-jump"
    stains: tuple[str, ...] = STAINS
    height: int = 40
    width: int = 48


@dataclass(frozen=True)
class SynthSite:
    id: str                      # the field id prefetchd must give it
    source: str
    batch: str
    folder: str
    barcode: str
    well: str
    site: int
    keys: dict[str, str]         # stain → key
    shape: tuple[int, int]


@dataclass
class MultiManifest:
    spec: MultiSpec
    bucket: str
    sites: list[SynthSite]
    extra: dict[str, bytes] = field(default_factory=dict)     # load_data, illum, thumbnails, metadata files
    plate_rows: list[dict[str, str]] = field(default_factory=list)

    def by_id(self) -> dict[str, SynthSite]:
        return {s.id: s for s in self.sites}

    def image_keys(self) -> Iterator[tuple[str, SynthSite, str]]:
        for site in self.sites:
            for stain, key in site.keys.items():
                yield key, site, stain

    def object_count(self) -> int:
        return sum(len(s.keys) for s in self.sites) + len(self.extra)


def source_number(source: str) -> int:
    return int(source.rsplit("_", 1)[-1])


def plate_code(source: str, batch: str, folder: str) -> int:
    return zlib.crc32(f"{source}/{batch}/{folder}".encode()) % PLATE_CODE_RANGE


def well_row_col(well: str) -> tuple[int, int]:
    letters = "".join(c for c in well if c.isalpha())
    row = next(r for r in range(1, 33) if row_name(r) == letters)
    return row, int(well[len(letters):])


def expected_signature(site: SynthSite, stain: str) -> tuple[int, ...]:
    row, col = well_row_col(site.well)
    return (source_number(site.source), plate_code(site.source, site.batch, site.folder), row, col, site.site,
            STAIN_CODE[stain])


def decode_signature(image: np.ndarray) -> tuple[int, ...]:
    """(source number, plate code, row, column, site, stain code) from a delivered channel (before CLAHE)."""
    return tuple(int(v) - SIGNATURE_OFFSET for v in np.asarray(image)[0, :SIGNATURE_LENGTH])


def centre_slice(shape: tuple[int, int]) -> tuple[int, slice]:
    """Where the second copy of the signature sits: the middle row, ending at the middle column. A centre
    crop or reflect-pad by an even number of pixels keeps it at the middle of the new size."""
    height, width = shape
    return height // 2, slice(width // 2 - SIGNATURE_LENGTH, width // 2)


def decode_centre_signature(image: np.ndarray) -> tuple[int, ...]:
    """The signature from the middle of a delivered channel: survives a centre crop or pad."""
    image = np.asarray(image)
    row, columns = centre_slice(image.shape)
    return tuple(int(v) - SIGNATURE_OFFSET for v in image[row, columns])


def render(site: SynthSite, stain: str) -> np.ndarray:
    height, width = site.shape
    rng = np.random.default_rng(zlib.crc32(f"{site.id}/{stain}".encode()))
    image = (rng.integers(300, 4000, size=(height, width))).astype(np.uint16)
    signature = np.array(expected_signature(site, stain), np.uint16) + SIGNATURE_OFFSET
    image[0, :SIGNATURE_LENGTH] = signature
    if height >= 2 and width >= 2 * SIGNATURE_LENGTH:   # tiny test images keep the row-0 copy only
        row, columns = centre_slice((height, width))
        image[row, columns] = signature
    return image


def tiff_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image)
    return buffer.getvalue()


def _file_name(source: SourceSpec, folder: str, well: str, site: int, stain: str) -> str:
    token = source.token_of(stain)
    if source.layout == "phenix":
        row, col = well_row_col(well)
        return f"r{row:02d}c{col:02d}f{site:02d}p01-{token}sk1fk1fl1.tiff"
    if source.layout == "yokogawa":
        return f"{folder}_{well}_T0001F{site:03d}L01{token}.tif"
    guid = str(uuid.UUID(int=zlib.crc32(f"{folder}/{well}/{site}/{stain}".encode()) << 64)).upper()
    return f"HTS_{well}_s{site}_{token}{guid}.tif"


def _image_folder(spec: MultiSpec, source: SourceSpec, batch: str, folder: str) -> str:
    inner = "" if source.layout == "yokogawa" else "/Images"
    return f"{spec.project}/{source.source}/images/{batch}/images/{folder}{inner}"


def field_id(source: str, batch: str, folder: str, well: str, site: int) -> str:
    plate = folder if has_acquisition_time(folder) else f"{source}/{batch}/{folder}"
    return f"{plate}/{well}/{site}"


def build_manifest(spec: MultiSpec, bucket: str) -> MultiManifest:
    manifest = MultiManifest(spec, bucket, [])
    for source in spec.sources:
        shape = (source.height or spec.height, source.width or spec.width)
        for batch, folders in source.batches.items():
            for folder in folders:
                barcode = folder.split("__", 1)[0]
                image_folder = _image_folder(spec, source, batch, folder)
                plate_sites = []
                for well in source.wells:
                    for number in range(1, source.sites + 1):
                        keys = {stain: f"{image_folder}/{_file_name(source, folder, well, number, stain)}"
                                for stain in spec.stains}
                        plate_sites.append(SynthSite(field_id(source.source, batch, folder, well, number),
                                                     source.source, batch, folder, barcode, well, number, keys,
                                                     shape))
                manifest.sites += plate_sites
                illum_keys = _add_illum(manifest, spec, source, batch, barcode, shape)
                if source.layout == "imagexpress":
                    for site in plate_sites:               # MetaXpress stores a thumbnail beside every image
                        for stain, key in site.keys.items():
                            token = source.token_of(stain)
                            thumb = key.replace(f"_{token}", f"_{token}_thumb", 1)
                            manifest.extra[thumb] = tiff_bytes(np.zeros((8, 8), np.uint16))
                if source.load_data != "none":
                    _add_load_data(manifest, spec, source, batch, barcode, image_folder, plate_sites, illum_keys)
                manifest.plate_rows.append({"Metadata_Source": source.source, "Metadata_Batch": batch,
                                            "Metadata_Plate": barcode, "Metadata_PlateType": "COMPOUND"})
    return manifest


def _add_illum(manifest: MultiManifest, spec: MultiSpec, source: SourceSpec, batch: str, barcode: str,
               shape: tuple[int, int]) -> dict[str, str]:
    if not source.illum:
        return {}
    keys = {}
    for stain in spec.stains:
        key = f"{spec.project}/{source.source}/images/{batch}/illum/{barcode}/{barcode}_Illum{stain}.npy"
        buffer = io.BytesIO()
        np.save(buffer, np.ones(shape, np.float32))      # orig / 1: pixels stay exact with illum on
        manifest.extra[key] = buffer.getvalue()
        keys[stain] = key
    return keys


def _add_load_data(manifest: MultiManifest, spec: MultiSpec, source: SourceSpec, batch: str, barcode: str,
                   image_folder: str, sites: list[SynthSite], illum_keys: dict[str, str]) -> None:
    """The plate's `load_data_with_illum` in CellProfiler's column shape (Metadata_Site as text, like JUMP's)."""
    columns: dict[str, list[str]] = {"Metadata_Source": [], "Metadata_Batch": [], "Metadata_Plate": [],
                                     "Metadata_Well": [], "Metadata_Site": []}
    for stain in spec.stains:
        for kind in ("FileName_Orig", "PathName_Orig"):
            columns[f"{kind}{stain}"] = []
    for stain in illum_keys:
        for kind in ("FileName_Illum", "PathName_Illum"):
            columns[f"{kind}{stain}"] = []
    for site in sites:
        columns["Metadata_Source"].append(site.source)
        columns["Metadata_Batch"].append(batch)
        columns["Metadata_Plate"].append(barcode)
        columns["Metadata_Well"].append(site.well)
        columns["Metadata_Site"].append(str(site.site))
        for stain in spec.stains:
            folder, _, name = site.keys[stain].rpartition("/")
            columns[f"FileName_Orig{stain}"].append(name)
            columns[f"PathName_Orig{stain}"].append(f"s3://{manifest.bucket}/{folder}/")
        for stain, key in illum_keys.items():
            folder, _, name = key.rpartition("/")
            columns[f"FileName_Illum{stain}"].append(name)
            columns[f"PathName_Illum{stain}"].append(f"s3://{manifest.bucket}/{folder}/")
    base = f"{spec.project}/{source.source}/workspace/load_data_csv/{batch}/{barcode}"
    if source.load_data == "parquet":
        buffer = io.BytesIO()
        pq.write_table(pa.table(columns), buffer)
        manifest.extra[f"{base}/load_data_with_illum.parquet"] = buffer.getvalue()
    else:
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(columns)
        writer.writerows(zip(*columns.values()))
        manifest.extra[f"{base}/load_data_with_illum.csv"] = text.getvalue().encode()


def jump_index_table(manifest: MultiManifest) -> pa.Table:
    """The whole-release index in jump_index.parquet's shape: one row per site, URL_Orig<Stain>."""
    rows: dict[str, list] = {"Metadata_Source": [], "Metadata_Batch": [], "Metadata_Plate": [],
                             "Metadata_Well": [], "Metadata_Site": []}
    for stain in manifest.spec.stains:
        rows[f"URL_Orig{stain}"] = []
    for site in manifest.sites:
        rows["Metadata_Source"].append(site.source)
        rows["Metadata_Batch"].append(site.batch)
        rows["Metadata_Plate"].append(site.barcode)
        rows["Metadata_Well"].append(site.well)
        rows["Metadata_Site"].append(site.site)
        for stain in manifest.spec.stains:
            rows[f"URL_Orig{stain}"].append(f"s3://{manifest.bucket}/{site.keys[stain]}")
    return pa.table(rows)


def plate_table_csv(manifest: MultiManifest, types: dict[str, str] | None = None) -> bytes:
    """A plate table shaped like jump-cellpainting/datasets metadata/plate.csv.gz (types by barcode)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, ["Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_PlateType"])
    writer.writeheader()
    for row in manifest.plate_rows:
        writer.writerow({**row, "Metadata_PlateType": (types or {}).get(row["Metadata_Plate"],
                                                                         row["Metadata_PlateType"])})
    return text.getvalue().encode()


def upload(manifest: MultiManifest, client, *, workers: int = 8) -> int:
    """PUT every object (images rendered on the fly) into the manifest's bucket; returns the object count."""
    def put_image(item: tuple[str, SynthSite, str]) -> None:
        key, site, stain = item
        client.put_object(Bucket=manifest.bucket, Key=key, Body=tiff_bytes(render(site, stain)))

    def put_extra(item: tuple[str, bytes]) -> None:
        client.put_object(Bucket=manifest.bucket, Key=item[0], Body=item[1])

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(put_image, manifest.image_keys()))
        list(pool.map(put_extra, manifest.extra.items()))
    return manifest.object_count()


def write_local(manifest: MultiManifest, root) -> None:
    """The same objects as files under root (what `aws s3 sync s3://<bucket>/ <root>` leaves)."""
    from pathlib import Path

    root = Path(root)
    for key, site, stain in manifest.image_keys():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tiff_bytes(render(site, stain)))
    for key, body in manifest.extra.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
