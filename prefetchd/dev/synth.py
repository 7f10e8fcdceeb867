"""Synthetic Cell Painting plates with the real cpg0000 (Opera Phenix, source_4) key layout.

Keys, relative to the root of a bucket or of an `aws s3 sync` copy:

    <prefix>/<batch>/images/<barcode>__<YYYY-MM-DDTHH_MM_SS>-Measurement1/Images/r<RR>c<CC>f<FF>p01-ch<N>sk1fk1fl1.tiff
    <prefix>/<batch>/illum/<barcode>/<barcode>_Illum<Stain>.npy

Images are uint16 (~13-bit like the real data), cell-like per stain, and deterministic from
(seed, plate, well, site, channel). Each well carries one of a few phenotypes a trainer can learn.
The first SIGNATURE_LENGTH pixels of row 0 encode plate, well, site and channel with values > 255,
so a field assembled from the wrong objects, or squashed to 8 bits, is caught by `decode_signature`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import cv2
import numpy as np
import tifffile

from prefetchd.channels import PHENIX_NUMBER_TO_CHANNEL

DEFAULT_PREFIX = "cpg0000-jump-pilot/source_4/images"
PHENOTYPES: tuple[str, ...] = ("control", "large_nuclei", "fragmented_mito", "high_rna_dim_er")
SIGNATURE_LENGTH = 5            # plate code, row, column, site, channel number
SIGNATURE_OFFSET = 1000         # keeps every signature pixel far above 8 bits and above the background
PLATE_CODE_RANGE = 64000        # plate code + offset must fit in uint16

KEY_PATTERN = re.compile(
    r"^(?P<prefix>.+)/(?P<batch>[^/]+)/images/"
    r"(?P<plate>(?P<barcode>[^/_]+)__(?P<timestamp>\d{4}-\d\d-\d\dT\d\d_\d\d_\d\d)-Measurement1)/Images/"
    r"r(?P<row>\d\d)c(?P<col>\d\d)f(?P<site>\d\d)p01-ch(?P<channel>\d)sk1fk1fl1\.tiff$"
)
ILLUM_KEY_PATTERN = re.compile(
    r"^(?P<prefix>.+)/(?P<batch>[^/]+)/illum/(?P<barcode>[^/]+)/(?P=barcode)_Illum(?P<stain>[A-Za-z_]+)\.npy$"
)


# ---------------------------------------------------------------------------------------------
# Spec and manifest


@dataclass(frozen=True)
class Plate:
    batch: str
    barcode: str
    timestamp: str              # "2020-11-05T19_51_35"

    @property
    def folder(self) -> str:
        return f"{self.barcode}__{self.timestamp}-Measurement1"


@dataclass(frozen=True)
class SynthSpec:
    # batch -> ((barcode, timestamp), ...)
    batches: dict[str, tuple[tuple[str, str], ...]]
    wells: tuple[str, ...] = ("A01", "A02", "B01", "B02")
    sites: int = 2
    height: int = 1080
    width: int = 1080
    channels: tuple[int, ...] = (1, 2, 3, 4, 5)
    with_illum: bool = True
    seed: int = 0
    prefix: str = DEFAULT_PREFIX

    @property
    def plates(self) -> list[Plate]:
        return [Plate(batch, barcode, timestamp)
                for batch, plates in self.batches.items() for barcode, timestamp in plates]

    @property
    def stains(self) -> list[str]:
        return [PHENIX_NUMBER_TO_CHANNEL[number] for number in self.channels]

    @property
    def field_count(self) -> int:
        return len(self.plates) * len(self.wells) * self.sites


@dataclass(frozen=True)
class SynthField:
    id: str                     # "<plate folder>/<well>/<site>"
    batch: str
    plate: str                  # plate folder
    barcode: str
    well: str
    site: int
    phenotype: int
    keys: dict[int, str]        # channel number -> key relative to the root


@dataclass
class SynthManifest:
    spec: SynthSpec
    root: Path | None
    fields: list[SynthField]
    illum_keys: dict[str, dict[str, str]] = field(default_factory=dict)  # "batch/barcode" -> stain -> key

    @property
    def image_keys(self) -> list[str]:
        return [key for f in self.fields for key in f.keys.values()]

    @property
    def all_keys(self) -> list[str]:
        return self.image_keys + [key for stains in self.illum_keys.values() for key in stains.values()]

    def field_by_id(self, field_id: str) -> SynthField:
        return self._by_id[field_id]

    @functools.cached_property
    def _by_id(self) -> dict[str, SynthField]:
        return {f.id: f for f in self.fields}


DEMO_PLATES = {
    "2020_11_04_CPJUMP1": (("BR00116991", "2020-11-05T19_51_35"), ("BR00117010", "2020-11-08T18_18_00")),
    "2020_11_18_CPJUMP1_TimepointDay1": (("BR00117054", "2020-11-19T20_41_52"), ("BR00116991", "2020-11-20T02_13_09")),
}
DEMO_SITES = 2


def demo_spec(fields: int = 64, size: int = 1080, seed: int = 0) -> SynthSpec:
    """Full-size fields for a ~1 minute streaming demo on 2 cores: 4 plates in 2 batches × 2 sites × wells.

    Gives at least `fields` fields (rounded up to whole wells of 8 fields; multiples of 32 balance phenotypes).
    64 full-size fields are ~750 MB of TIFFs.
    """
    per_well = sum(len(plates) for plates in DEMO_PLATES.values()) * DEMO_SITES
    well_count = -(-max(1, fields) // per_well)
    return SynthSpec(batches=DEMO_PLATES, wells=balanced_wells(well_count), sites=DEMO_SITES,
                     height=size, width=size, seed=seed)


def balanced_wells(count: int) -> tuple[str, ...]:
    """The first `count` wells taken in 2×2 blocks (A01 A02 B01 B02 A03 ...): phenotypes stay balanced."""
    if not 1 <= count <= 384:
        raise ValueError(f"a 384-well plate has 1..384 wells, asked for {count}")
    wells = [well_name(block_row * 2 + dr + 1, block_col * 2 + dc + 1)
             for block_row in range(8) for block_col in range(12) for dr in (0, 1) for dc in (0, 1)]
    return tuple(wells[:count])


def test_spec(seed: int = 0) -> SynthSpec:
    """Tiny: 2 batches, 3 plates (barcode BR00116991 in both batches), 4 wells, 2 sites, 72×90 pixels."""
    return SynthSpec(
        batches={
            "2020_11_04_CPJUMP1": (("BR00116991", "2020-11-05T19_51_35"), ("BR00117010", "2020-11-08T18_18_00")),
            "2020_11_18_CPJUMP1_TimepointDay1": (("BR00116991", "2020-11-20T02_13_09"),),
        },
        wells=("A01", "A02", "B01", "B02"),
        sites=2,
        height=72,
        width=90,
        seed=seed,
    )


test_spec.__test__ = False  # not a pytest test, despite the name

BATCH_NAMES = ("2020_11_04_CPJUMP1", "2020_11_18_CPJUMP1_TimepointDay1", "2020_12_08_CPJUMP1_Bleaching")


def many_plates_spec(plates: int, batches: int = 2, wells: int = 1, sites: int = 2, height: int = 48,
                     width: int | None = None, seed: int = 0) -> SynthSpec:
    """Dozens of plates at the real counts that matter: `plates` plates spread round-robin over `batches` batch
    folders, each plate with its 5 illumination files; small images by default. Plate codes (the signature)
    are distinct for up to a few hundred plates (checked: a collision raises)."""
    if not 1 <= batches <= len(BATCH_NAMES):
        raise ValueError(f"batches must be 1..{len(BATCH_NAMES)}")
    by_batch: dict[str, list[tuple[str, str]]] = {name: [] for name in BATCH_NAMES[:batches]}
    for p in range(plates):
        by_batch[BATCH_NAMES[p % batches]].append((f"BR{p + 1:08d}", f"2020-11-{5 + p % 20:02d}T19_{p % 60:02d}_35"))
    spec = SynthSpec(batches={b: tuple(v) for b, v in by_batch.items()}, wells=balanced_wells(wells), sites=sites,
                     height=height, width=width or height, seed=seed)
    codes = {plate_code(plate.folder) for plate in spec.plates}
    if len(codes) != len(spec.plates):
        raise ValueError("two plates share a signature code: choose another plate count")
    return spec


# ---------------------------------------------------------------------------------------------
# Keys and wells


def parse_well(well: str) -> tuple[int, int]:
    """"B03" -> (2, 3): 1-based row and column, as in the r<RR>c<CC> key part."""
    match = re.fullmatch(r"([A-P])(\d{1,2})", well)
    if not match or not 1 <= int(match.group(2)) <= 24:
        raise ValueError(f"well must look like A01..P24, got {well!r}")
    return ord(match.group(1)) - ord("A") + 1, int(match.group(2))


def well_name(row: int, col: int) -> str:
    return f"{chr(ord('A') + row - 1)}{col:02d}"


def image_key(spec: SynthSpec, plate: Plate, well: str, site: int, channel: int) -> str:
    row, col = parse_well(well)
    return (f"{spec.prefix}/{plate.batch}/images/{plate.folder}/Images/"
            f"r{row:02d}c{col:02d}f{site:02d}p01-ch{channel}sk1fk1fl1.tiff")


def illum_key(spec: SynthSpec, plate: Plate, stain: str) -> str:
    return f"{spec.prefix}/{plate.batch}/illum/{plate.barcode}/{plate.barcode}_Illum{stain}.npy"


def field_id(plate: Plate, well: str, site: int) -> str:
    return f"{plate.folder}/{well}/{site}"


def build_manifest(spec: SynthSpec, root: Path | None = None) -> SynthManifest:
    fields = [
        SynthField(
            id=field_id(plate, well, site), batch=plate.batch, plate=plate.folder, barcode=plate.barcode,
            well=well, site=site, phenotype=phenotype_of(well, plate.folder),
            keys={channel: image_key(spec, plate, well, site, channel) for channel in spec.channels},
        )
        for plate in spec.plates for well in spec.wells for site in range(1, spec.sites + 1)
    ]
    illum = {}
    if spec.with_illum:
        illum = {f"{plate.batch}/{plate.barcode}": {stain: illum_key(spec, plate, stain) for stain in spec.stains}
                 for plate in spec.plates}
    return SynthManifest(spec=spec, root=root, fields=fields, illum_keys=illum)


# ---------------------------------------------------------------------------------------------
# Phenotypes and signature


def phenotype_of(well: str, plate: str | None = None) -> int:
    """Index into PHENOTYPES. One plate map for every plate (like the CPJUMP1 compound plates), so `plate`
    does not change the answer; any 2×2 block of wells holds all four phenotypes."""
    row, col = parse_well(well)
    return ((row - 1) + 2 * (col - 1)) % len(PHENOTYPES)


def plate_code(plate_folder: str) -> int:
    """A stable number for a plate folder; the same barcode imaged twice gets two codes."""
    return zlib.crc32(plate_folder.encode()) % PLATE_CODE_RANGE


class Signature(NamedTuple):
    plate_code: int             # plate_code(plate folder), not a position in the spec
    row: int                    # 1-based
    col: int                    # 1-based
    site: int                   # 1-based
    channel: int                # Phenix channel number


def expected_signature(plate_folder: str, well: str, site: int, channel_number: int) -> np.ndarray:
    row, col = parse_well(well)
    codes = (plate_code(plate_folder), row, col, site, channel_number)
    return np.array(codes, dtype=np.uint16) + np.uint16(SIGNATURE_OFFSET)


def decode_signature(image: np.ndarray) -> Signature:
    """Read the signature from a delivered channel (uint16 H×W, before CLAHE/rescale)."""
    corner = np.asarray(image)[0, :SIGNATURE_LENGTH].astype(np.int64) - SIGNATURE_OFFSET
    return Signature(*(int(value) for value in corner))


# ---------------------------------------------------------------------------------------------
# Image generation


@dataclass(frozen=True)
class Cells:
    """Geometry shared by every channel of one field."""

    y: np.ndarray               # centres, float
    x: np.ndarray
    nucleus_radius: np.ndarray  # semi-major axis
    aspect: np.ndarray          # minor / major
    angle: np.ndarray           # degrees
    cell_radius: np.ndarray
    brightness: np.ndarray      # per-cell stain intensity factor around 1


@dataclass(frozen=True)
class Phenotype:
    nucleus_scale: float = 1.0
    mito_puncta: int = 24
    mito_gain: float = 1.0
    rna_gain: float = 1.0
    er_gain: float = 1.0


PHENOTYPE_TRAITS: tuple[Phenotype, ...] = (
    Phenotype(),
    Phenotype(nucleus_scale=1.6),
    Phenotype(mito_puncta=70, mito_gain=1.8),
    Phenotype(rna_gain=2.6, er_gain=0.35),
)
Shape = tuple[int, int]
Renderer = Callable[[np.random.Generator, Cells, Shape, Phenotype], np.ndarray]
PIXELS_PER_CELL = 5200          # ~220 cells in a 1080² field
BACKGROUND = 340.0
NOISE_SIGMA = 22.0


def _rng(spec_seed: int, plate: Plate, well: str, site: int, channel: int = 0) -> np.random.Generator:
    plate_hash = zlib.crc32(f"{plate.batch}/{plate.folder}".encode())
    row, col = parse_well(well)
    return np.random.default_rng([spec_seed, plate_hash, row, col, site, channel])


def layout_cells(rng: np.random.Generator, height: int, width: int, traits: Phenotype) -> Cells:
    count = max(2, int(rng.poisson(height * width / PIXELS_PER_CELL)))
    nucleus = rng.normal(11.0, 1.8, count).clip(6.0, 18.0) * traits.nucleus_scale
    return Cells(
        y=rng.uniform(0, height, count),
        x=rng.uniform(0, width, count),
        nucleus_radius=nucleus,
        aspect=rng.uniform(0.65, 1.0, count),
        angle=rng.uniform(0, 180, count),
        cell_radius=nucleus / traits.nucleus_scale * rng.uniform(2.0, 2.6, count),
        brightness=rng.lognormal(0.0, 0.2, count),
    )


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def _nuclei_mask(cells: Cells, shape: tuple[int, int], values: np.ndarray, scale: float = 1.0) -> np.ndarray:
    canvas = np.zeros(shape, np.float32)
    for y, x, r, aspect, angle, value in zip(cells.y, cells.x, cells.nucleus_radius * scale, cells.aspect,
                                             cells.angle, values):
        axes = (max(1, round(r)), max(1, round(r * aspect)))
        cv2.ellipse(canvas, (round(x), round(y)), axes, angle, 0, 360, float(value), -1)
    return canvas


def _cell_disks(cells: Cells, shape: tuple[int, int], values: np.ndarray, thickness: int = -1) -> np.ndarray:
    canvas = np.zeros(shape, np.float32)
    for y, x, r, value in zip(cells.y, cells.x, cells.cell_radius, values):
        cv2.circle(canvas, (round(x), round(y)), max(1, round(r)), float(value), thickness)
    return canvas


def _scatter_points(rng: np.random.Generator, cells: Cells, shape: tuple[int, int], per_cell: int,
                    inner: np.ndarray, outer: np.ndarray, amplitude: float) -> np.ndarray:
    """Point sources uniformly spread over the annulus inner..outer of every cell (blur them afterwards)."""
    count = len(cells.y)
    angle = rng.uniform(0, 2 * np.pi, (count, per_cell))
    radius = np.sqrt(rng.uniform(inner[:, None] ** 2, outer[:, None] ** 2, (count, per_cell)))
    ys = np.rint(cells.y[:, None] + radius * np.sin(angle)).astype(np.intp).ravel()
    xs = np.rint(cells.x[:, None] + radius * np.cos(angle)).astype(np.intp).ravel()
    inside = (ys >= 0) & (ys < shape[0]) & (xs >= 0) & (xs < shape[1])
    canvas = np.zeros(shape, np.float32)
    weights = np.repeat(cells.brightness, per_cell)[inside] * amplitude
    np.add.at(canvas, (ys[inside], xs[inside]), weights.astype(np.float32))
    return canvas


def _texture(rng: np.random.Generator, shape: tuple[int, int], grain: int) -> np.ndarray:
    """Smooth random texture in [0, 1], made at 1/grain resolution then upsampled (cheap)."""
    small = rng.random((shape[0] // grain + 2, shape[1] // grain + 2), dtype=np.float32)
    return cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def render_dna(rng: np.random.Generator, cells: Cells, shape: Shape, traits: Phenotype) -> np.ndarray:
    # DNA content is conserved, so larger nuclei are a little dimmer per pixel.
    values = 4200.0 * cells.brightness / traits.nucleus_scale ** 0.5
    nuclei = _blur(_nuclei_mask(cells, shape, values), 1.5)
    return nuclei * (0.85 + 0.3 * _texture(rng, shape, 3))


def render_er(rng: np.random.Generator, cells: Cells, shape: Shape, traits: Phenotype) -> np.ndarray:
    cytoplasm = _cell_disks(cells, shape, 1500.0 * cells.brightness * traits.er_gain)
    perinuclear = _nuclei_mask(cells, shape, 900.0 * cells.brightness * traits.er_gain, scale=1.35)
    reticulum = _texture(rng, shape, 4) ** 2
    return _blur((cytoplasm + perinuclear) * (0.3 + 1.4 * reticulum), 2.0)


def render_rna(rng: np.random.Generator, cells: Cells, shape: Shape, traits: Phenotype) -> np.ndarray:
    cytoplasm = _cell_disks(cells, shape, 500.0 * cells.brightness * traits.rna_gain)
    nucleoli = _scatter_points(rng, cells, shape, 3, np.zeros_like(cells.y), cells.nucleus_radius * 0.6,
                               60000.0 * traits.rna_gain ** 0.5)
    return _blur(cytoplasm, 3.0) + _blur(nucleoli, 2.2)


def render_agp(rng: np.random.Generator, cells: Cells, shape: Shape, traits: Phenotype) -> np.ndarray:
    membranes = _cell_disks(cells, shape, 2600.0 * cells.brightness, thickness=2)
    actin = _cell_disks(cells, shape, 350.0 * cells.brightness) * _texture(rng, shape, 2)
    return _blur(membranes + actin, 1.3)


def render_mito(rng: np.random.Generator, cells: Cells, shape: Shape, traits: Phenotype) -> np.ndarray:
    puncta = _scatter_points(rng, cells, shape, traits.mito_puncta, cells.nucleus_radius * 1.05,
                             cells.cell_radius * 0.95, 22000.0 * traits.mito_gain)
    return _blur(puncta, 1.2)


def render_brightfield(focus_sigma: float) -> Renderer:
    def render(rng: np.random.Generator, cells: Cells, shape: Shape, traits: Phenotype) -> np.ndarray:
        edges = _cell_disks(cells, shape, np.full_like(cells.y, 500.0), thickness=2)
        nuclei = _nuclei_mask(cells, shape, np.full_like(cells.y, 250.0))
        return 1800.0 + _blur(edges - nuclei, focus_sigma)
    return render


RENDERERS: dict[str, Renderer] = {
    "DNA": render_dna,
    "ER": render_er,
    "RNA": render_rna,
    "AGP": render_agp,
    "Mito": render_mito,
    "Brightfield_H": render_brightfield(3.0),
    "Brightfield_L": render_brightfield(4.5),
    "Brightfield": render_brightfield(1.0),
}


@functools.lru_cache(maxsize=4)
def _noise_bank(height: int, width: int) -> np.ndarray:
    """Gaussian noise twice the image size; fields take shifted windows of it (fresh noise costs ~15 ms)."""
    return np.random.default_rng(12345).standard_normal((2 * height, 2 * width), dtype=np.float32) * NOISE_SIGMA


def _noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    dy, dx = rng.integers(0, height), rng.integers(0, width)
    return _noise_bank(height, width)[dy:dy + height, dx:dx + width]


@functools.lru_cache(maxsize=64)
def illumination(seed: int, batch: str, barcode: str, stain: str, height: int, width: int) -> np.ndarray:
    """Smooth float32 illumination function, ~0.6 at the corners to ~1.4 near an off-centre peak."""
    rng = np.random.default_rng([seed, zlib.crc32(f"{batch}/{barcode}/{stain}".encode())])
    cy, cx = rng.uniform(0.35, 0.65, 2)
    yy, xx = np.meshgrid(np.linspace(0, 1, height, dtype=np.float32), np.linspace(0, 1, width, dtype=np.float32),
                         indexing="ij")
    falloff = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(0.3, 0.45) ** 2))
    illum = 0.6 + 0.8 * falloff / falloff.max()
    # Signature pixels are left exactly uncorrected so they survive `orig / illum`.
    illum[0, :SIGNATURE_LENGTH] = 1.0
    return illum.astype(np.float32)


def field_cells(spec: SynthSpec, plate: Plate, well: str, site: int) -> Cells:
    traits = PHENOTYPE_TRAITS[phenotype_of(well, plate.folder)]
    return layout_cells(_rng(spec.seed, plate, well, site), spec.height, spec.width, traits)


def render_channel(spec: SynthSpec, plate: Plate, well: str, site: int, channel: int,
                   cells: Cells | None = None) -> np.ndarray:
    """One uint16 H×W image; pass `cells` (from `field_cells`) to share the layout between channels."""
    stain = PHENIX_NUMBER_TO_CHANNEL[channel]
    shape = (spec.height, spec.width)
    cells = cells if cells is not None else field_cells(spec, plate, well, site)
    traits = PHENOTYPE_TRAITS[phenotype_of(well, plate.folder)]
    rng = _rng(spec.seed, plate, well, site, channel)
    signal = RENDERERS[stain](rng, cells, shape, traits) + BACKGROUND
    signal *= illumination(spec.seed, plate.batch, plate.barcode, stain, *shape)
    signal += _noise(rng, *shape)
    image = np.clip(signal, 0, 65535).astype(np.uint16)
    image[0, :SIGNATURE_LENGTH] = expected_signature(plate.folder, well, site, channel)
    return image


def render_field(spec: SynthSpec, plate: Plate, well: str, site: int) -> dict[int, np.ndarray]:
    cells = field_cells(spec, plate, well, site)
    return {channel: render_channel(spec, plate, well, site, channel, cells) for channel in spec.channels}


# ---------------------------------------------------------------------------------------------
# Disk and S3


def write_plates(root: Path, spec: SynthSpec, workers: int = 2) -> SynthManifest:
    """Write every TIFF and illum file under `root` (keys are paths relative to it) and a manifest.json."""
    root = Path(root)
    manifest = build_manifest(spec, root)
    plates = {plate.folder: plate for plate in spec.plates}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda f: _write_field(root, spec, plates[f.plate], f), manifest.fields))
    for plate in spec.plates if spec.with_illum else ():
        for stain in spec.stains:
            path = root / illum_key(spec, plate, stain)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, illumination(spec.seed, plate.batch, plate.barcode, stain, spec.height, spec.width))
    (root / "manifest.json").write_text(json.dumps(_manifest_summary(manifest), indent=1))
    return manifest


def _write_field(root: Path, spec: SynthSpec, plate: Plate, synth_field: SynthField) -> None:
    images = render_field(spec, plate, synth_field.well, synth_field.site)
    for channel, key in synth_field.keys.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, images[channel], photometric="minisblack")


def _manifest_summary(manifest: SynthManifest) -> dict:
    return {
        "fields": [{"id": f.id, "phenotype": PHENOTYPES[f.phenotype], "keys": list(f.keys.values())}
                   for f in manifest.fields],
        "illum": manifest.illum_keys,
    }


def upload(manifest_or_root: SynthManifest | Path, endpoint_url: str, bucket: str, workers: int = 16) -> int:
    """Create a public-read bucket and upload every synthetic object under the same key; returns bytes sent."""
    from prefetchd.dev.locals3 import admin_client, create_public_bucket

    root, keys = _keys_to_upload(manifest_or_root)
    client = admin_client(endpoint_url, max_pool=workers)
    create_public_bucket(client, bucket)

    def put(key: str) -> int:
        body = (root / key).read_bytes()
        client.put_object(Bucket=bucket, Key=key, Body=body)
        return len(body)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(put, keys))


def _keys_to_upload(manifest_or_root: SynthManifest | Path) -> tuple[Path, list[str]]:
    if isinstance(manifest_or_root, SynthManifest):
        if manifest_or_root.root is None:
            raise ValueError("manifest has no root: write it with write_plates() first")
        return manifest_or_root.root, manifest_or_root.all_keys
    root = Path(manifest_or_root)
    keys = [path.relative_to(root).as_posix() for path in _data_files(root.rglob("*"))]
    return root, sorted(keys)


def _data_files(paths: Iterable[Path]) -> Iterable[Path]:
    return (path for path in paths if path.is_file() and path.suffix in (".tiff", ".npy"))
