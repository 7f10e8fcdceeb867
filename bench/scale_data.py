"""Data for the scale rehearsal (`bench/scale.py`): synthetic plates with the real key layout at many plates and
batches, and a keys file of full cpg0000 size served by a loopback server that answers any key.

    spec = synth.many_plates_spec(plates=48, batches=2, wells=4, sites=2, height=256)
    manifest = ensure_plates(workdir, spec)          # written once, reused by later runs
    with AnyKeyServer(template_tiff, template_npy) as server: ...   # GET of any *.tiff / *.npy key
"""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import numpy as np
import tifffile

from prefetchd.dev import synth

CPG0000_PREFIX = "cpg0000-jump-pilot/source_4/images"


def ensure_plates(data_root: Path, spec: synth.SynthSpec) -> synth.SynthManifest:
    """Write the plates once per spec under `data_root`; later runs reuse them."""
    root = data_root / (f"plates-{len(spec.plates)}p{len(spec.batches)}b{len(spec.wells)}w{spec.sites}s"
                        f"{spec.height}px")
    manifest = synth.build_manifest(spec, root)
    if not (root / "manifest.json").exists():
        synth.write_plates(root, spec, workers=2)
    return manifest


# ---------------------------------------------------------------------------------------------
# A keys file of cpg0000 size and a server that answers any of its keys


def write_cpg0000_keys(path: Path, plates: int, object_size: int, channels: int = 8) -> tuple[int, int]:
    """An `aws s3 ls --recursive` keys file: `plates` Phenix plates of 384 wells × 9 sites × `channels` TIFFs
    (110 plates × 8 channels ≈ 3.04M keys, cpg0000's size), each plate with its 5 illumination files.
    Returns (image keys, illumination keys)."""
    images = illum = 0
    with open(path, "w") as out:
        for p in range(plates):
            batch = synth.BATCH_NAMES[p % len(synth.BATCH_NAMES)]
            barcode = f"BR{p:08d}"
            folder = f"{CPG0000_PREFIX}/{batch}/images/{barcode}__2020-11-05T19_51_35-Measurement1/Images"
            lines = []
            for row in range(1, 17):
                for col in range(1, 25):
                    for site in range(1, 10):
                        for ch in range(1, channels + 1):
                            lines.append(f"2020-11-10 12:00:00 {object_size:>10} {folder}/"
                                         f"r{row:02d}c{col:02d}f{site:02d}p01-ch{ch}sk1fk1fl1.tiff\n")
            for stain in ("DNA", "ER", "RNA", "AGP", "Mito"):
                lines.append(f"2020-11-10 12:00:00 {4 << 20:>10} {CPG0000_PREFIX}/{batch}/illum/{barcode}/"
                             f"{barcode}_Illum{stain}.npy\n")
            out.writelines(lines)
            images += len(lines) - 5
            illum += 5
    return images, illum


def template_objects(size: int) -> tuple[bytes, bytes]:
    """One uncompressed uint16 TIFF of size² and one float32 illumination .npy of the same shape."""
    image = (np.arange(size * size, dtype=np.uint32) % 4000 + 300).astype(np.uint16).reshape(size, size)
    tiff = io.BytesIO()
    tifffile.imwrite(tiff, image, photometric="minisblack")
    npy = io.BytesIO()
    np.save(npy, np.full((size, size), 1.0, np.float32))
    return tiff.getvalue(), npy.getvalue()


class AnyKeyServer:
    """A loopback HTTP server that answers GET of any `*.tiff` key with one template TIFF and any `*.npy` key
    with one template illumination file (what an S3 endpoint would return for a bucket of that size). Runs
    its own event loop thread; counts requests."""

    def __init__(self, tiff: bytes, npy: bytes):
        self.bodies = {".tiff": tiff, ".npy": npy}
        self.requests = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "AnyKeyServer":
        from aiohttp import web

        ready = threading.Event()

        async def handle(request: web.Request) -> web.Response:
            self.requests += 1
            for suffix, body in self.bodies.items():
                if request.path.endswith(suffix):
                    return web.Response(body=body, content_type="application/octet-stream")
            return web.Response(status=404, text="<Error><Code>NoSuchKey</Code></Error>", content_type="application/xml")

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_route("GET", "/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None)
            self._loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="any-key-server", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the any-key server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def __enter__(self) -> "AnyKeyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
