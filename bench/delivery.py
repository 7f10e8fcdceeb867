"""What a consumer received, judged against the source: identity and pixels from the delivered bytes.

The daemon's replies say which field ids a batch holds; this module never believes them. A delivered
field is identified from its own pixels and compared with an independent decode of the source objects
(tifffile + numpy + OpenCV, none of the daemon's code):

- `SourceFields` decodes every source field once with the job's preprocessing and keys it by a digest of
  its pixels, so any delivered field maps back to exactly one source field, or to none (wrong pixels).
  Raw fields are also identified by the signature that `prefetchd.dev.synth` writes into row 0 of every
  channel, a second, independent reading of who they are.
- `Tally` collects what every rank received per (epoch, batch) and counts, per complete epoch, the fields
  lost, duplicated, delivered with wrong pixels, or delivered under another field's id.

    source = SourceFields(manifest, channels)                 # raw; or preprocessing={"illum": True, ...}
    tally = Tally(world_size=2, batches_per_epoch=6, fields=source.ids, bad=quarantine_expected)
    for batch in stream.epoch(e):
        tally.add(rank, e, batch.index, batch.ids, [source.identify(f) for f in batch.images])
    tally.judge()   # {"lost": 0, "duplicated": 0, "wrong_pixels": 0, "mislabelled": 0, ...}
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
import tifffile

from prefetchd.channels import PHENIX_CHANNELS
from prefetchd.dev import synth


def digest(pixels: np.ndarray) -> str:
    """A field's identity by content: blake2b of its C×H×W uint16 pixels."""
    return hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16).hexdigest()


def signatures(pixels: np.ndarray) -> list[tuple[int, ...]]:
    """The row-0 signature of every channel of one delivered field (C×H×W): (plate code, row, column, site,
    Phenix channel), as `prefetchd.dev.synth` writes it."""
    return [tuple(synth.decode_signature(channel)) for channel in pixels]


@dataclass(frozen=True)
class Identity:
    """Who a delivered field is, read from its pixels. `field` is None when the pixels match no source field."""

    field: str | None
    by_signature: str | None = None     # what the row-0 signatures say (None: no valid signature)
    signed: bool = False                # raw pixels: the signature must agree with the content

    @property
    def exact(self) -> bool:
        return self.field is not None and (not self.signed or self.by_signature == self.field)


class SourceFields:
    """Every source field decoded independently, with a job's preprocessing, keyed by pixel digest.

    `preprocessing`: None for raw, or {"illum": bool, "clahe": {"clip_limit", "tile_grid"}} where CLAHE is
    OpenCV's own uint16 CLAHE (the daemon's `bins: 65536, rescale: false` mode is that bit for bit).
    """

    def __init__(self, manifest: Any, channels: Sequence[str], preprocessing: dict | None = None):
        self.manifest = manifest
        self.root = Path(manifest.root)
        self.channels = list(channels)
        self.preprocessing = preprocessing or {}
        self.raw = not self.preprocessing.get("illum") and not self.preprocessing.get("clahe")
        self.ids = sorted(f.id for f in manifest.fields)
        self._plate_by_code = self._plate_codes(manifest.fields)
        self.by_digest: dict[str, str] = {}
        self.expected: dict[str, np.ndarray] = {}
        for f in manifest.fields:
            pixels = self._decode(f)
            self.expected[f.id] = pixels
            key = digest(pixels)
            if key in self.by_digest:
                raise ValueError(f"fields {self.by_digest[key]} and {f.id} have identical pixels: cannot tell them apart")
            self.by_digest[key] = f.id

    @staticmethod
    def _plate_codes(fields: Iterable[Any]) -> dict[int, str]:
        codes: dict[int, str] = {}
        for f in fields:
            code = synth.plate_code(f.plate)
            if codes.setdefault(code, f.plate) != f.plate:
                raise ValueError(f"plates {codes[code]} and {f.plate} share a signature code")
        return codes

    def _decode(self, f: Any) -> np.ndarray:
        planes = []
        for name in self.channels:
            image = tifffile.imread(self.root / f.keys[PHENIX_CHANNELS[name]])
            if image.dtype != np.uint16:
                raise ValueError(f"{f.id} {name}: source is {image.dtype}, not uint16")
            if self.preprocessing.get("illum"):
                image = self._illum_correct(image, f, name)
            clahe = self.preprocessing.get("clahe")
            if clahe:
                tiles = int(clahe.get("tile_grid", 8))
                image = cv2.createCLAHE(float(clahe.get("clip_limit", 3.0)), (tiles, tiles)).apply(image)
            planes.append(image)
        return np.stack(planes)

    def _illum_correct(self, image: np.ndarray, f: Any, name: str) -> np.ndarray:
        keys = self.manifest.illum_keys.get(f"{f.batch}/{f.barcode}", {})
        if name not in keys:
            return image
        illum = np.load(self.root / keys[name]).astype(np.float32)
        corrected = np.rint(image.astype(np.float32) / illum)     # float32, half to even, as documented
        return np.clip(corrected, 0, 65535).astype(np.uint16)

    def signature_id(self, signatures: Sequence[Sequence[int]]) -> str | None:
        """The field id that the row-0 signatures of a raw field's channels spell (see `signatures`), if every
        channel agrees and is the channel expected at its position; None otherwise."""
        if len(signatures) != len(self.channels):
            return None
        ids = set()
        for name, (code, row, col, site, channel) in zip(self.channels, signatures):
            plate = self._plate_by_code.get(code)
            if plate is None or channel != PHENIX_CHANNELS[name] or not (1 <= row <= 16 and 1 <= col <= 24):
                return None
            ids.add(f"{plate}/{chr(ord('A') + row - 1)}{col:02d}/{site}")
        return ids.pop() if len(ids) == 1 else None

    def identify(self, pixels: np.ndarray) -> Identity:
        """Who these delivered pixels (C×H×W) are: by content digest, and for raw fields by signature too."""
        return self.identify_received(digest(pixels), signatures(pixels) if self.raw else None)

    def identify_received(self, content_digest: str, channel_signatures: Sequence[Sequence[int]] | None) -> Identity:
        """The same from what a consumer recorded about the pixels it received (`digest`, `signatures`)."""
        found = self.by_digest.get(content_digest)
        if not self.raw:
            return Identity(found)
        sig = self.signature_id(channel_signatures) if channel_signatures is not None else None
        return Identity(found, sig, signed=True)


@dataclass
class Delivered:
    """One field as a consumer received it."""

    rank: int
    epoch: int
    batch: int
    position: int
    claimed: str               # the id in the daemon's reply
    identity: Identity


@dataclass
class Tally:
    """What every rank of one job received; `judge()` counts per complete epoch.

    An epoch is complete when every rank recorded all `batches_per_epoch` batches. In it every source field
    must arrive exactly once over all ranks, except the `bad` fields (objects that can never be read), each
    of whose positions is taken by some healthy field (a substitute): those extra deliveries are expected,
    any others are duplicates. A batch recorded twice for the same (rank, epoch, batch) counts its fields as
    duplicated. Needs a dataset whose field count the world size divides (no DistributedSampler padding).
    """

    world_size: int
    batches_per_epoch: int
    fields: Sequence[str]
    bad: set[str] = field(default_factory=set)
    batches: dict[tuple[int, int, int], list[Delivered]] = field(default_factory=dict)
    repeated_batches: int = 0
    repeated_fields: int = 0

    def add(self, rank: int, epoch: int, batch: int, claimed: Sequence[str], identities: Sequence[Identity]) -> None:
        key = (rank, epoch, batch)
        if key in self.batches:
            self.repeated_batches += 1
            self.repeated_fields += len(identities)
            return
        self.batches[key] = [Delivered(rank, epoch, batch, i, c, ident)
                             for i, (c, ident) in enumerate(zip(claimed, identities))]

    def complete_epochs(self) -> list[int]:
        epochs = {e for (_, e, _) in self.batches}
        return sorted(e for e in epochs
                      if all((r, e, b) in self.batches for r in range(self.world_size)
                             for b in range(self.batches_per_epoch)))

    def judge(self) -> dict[str, Any]:
        every = [d for ds in self.batches.values() for d in ds]
        wrong = [d for d in every if not d.identity.exact]
        mislabelled = [d for d in every if d.identity.exact and d.identity.field != d.claimed]
        healthy = [f for f in self.fields if f not in self.bad]
        lost = duplicated = bad_delivered = 0
        examples: list[str] = []
        complete = self.complete_epochs()
        for e in complete:
            got = collections.Counter(d.identity.field for (r, ep, b), ds in self.batches.items() if ep == e
                                      for d in ds if d.identity.exact)
            missing = [f for f in healthy if got[f] == 0]
            lost += len(missing)
            bad_delivered += sum(got[f] for f in self.bad)
            extra = sum(c - 1 for f, c in got.items() if c > 1 and f not in self.bad)
            duplicated += max(0, extra - len(self.bad))
            examples += [f"epoch {e}: lost {f}" for f in missing[:3]]
        examples += [f"epoch {d.epoch} rank {d.rank} batch {d.batch}[{d.position}] claimed {d.claimed}: wrong pixels"
                     for d in wrong[:3]]
        examples += [f"epoch {d.epoch} rank {d.rank} batch {d.batch}[{d.position}] claimed {d.claimed}, pixels are "
                     f"{d.identity.field}" for d in mislabelled[:3]]
        return {
            "fields_delivered": len(every),
            "batches_delivered": len(self.batches),
            "epochs_complete": len(complete),
            "lost": lost,
            "duplicated": duplicated + self.repeated_fields,
            "wrong_pixels": len(wrong),
            "mislabelled": len(mislabelled),
            "bad_fields_delivered": bad_delivered,
            "examples": examples[:10],
        }
