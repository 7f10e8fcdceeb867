"""`prefetchd check DATASET`: diagnose access step by step, one line each with the fix.

S3: endpoint resolution → DNS → TCP connect → bucket reachable → each prefix non-empty, in a JUMP layout (Phenix,
Yokogawa, ImageXpress) and, where the layout does not name its stains, with the plate's load_data → one GET of
a TIFF. Local: root exists → readable → layout matched. Checks stop at the first failure: the later ones cannot
pass without it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import urlparse

from prefetchd.catalog import KeyCollector
from prefetchd.dataset import DatasetSpec
from prefetchd.errors import PrefetchdError
from prefetchd.layouts import LAYOUT_EXAMPLES, ImageKey, barcode_of, parse_image_key, project_of
from prefetchd.listing import list_root
from prefetchd.s3 import make_s3_client, resolve_endpoint
from prefetchd.storage import LocalDirectory
from prefetchd.storage_errors import ENDPOINT_SETTINGS, classify_storage_error, endpoint_host

SAMPLE_PAGES = 5          # LIST pages (1000 keys each) sampled for the layout check
LOCAL_SAMPLE_FILES = 5000
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
LAYOUT = f"a JUMP layout ({LAYOUT_EXAMPLES})"


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{'OK  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"
        return text if self.ok or not self.fix else f"{text} — fix: {self.fix}"


def endpoint_origin(s3cfg: dict) -> tuple[str | None, str]:
    """The endpoint used and where it came from (config, environment, or the AWS default)."""
    if s3cfg.get("endpoint_url"):
        return s3cfg["endpoint_url"], "s3.endpoint_url / --endpoint-url"
    for variable in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(variable):
            return os.environ[variable], f"${variable}"
    return None, "default (no s3.endpoint_url, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL)"


def host_and_port(endpoint: str | None, region: str) -> tuple[str, int]:
    if not endpoint:
        return endpoint_host(None, region), 443
    parsed = urlparse(endpoint)
    return parsed.hostname or endpoint, parsed.port or (443 if parsed.scheme == "https" else 80)


class S3Checks:
    """The S3 checks in order; each returns a CheckResult and, on success, leaves what the next needs."""

    def __init__(self, spec: DatasetSpec, s3cfg: dict):
        self.spec = spec
        self.s3cfg = {**s3cfg, "retries": 0}  # diagnose the first failure, do not retry it
        self.region = s3cfg.get("region") or "us-east-1"
        self.endpoint = resolve_endpoint(s3cfg.get("endpoint_url"))
        self.host, self.port = host_and_port(self.endpoint, self.region)
        self.image_key: str | None = None
        self.prefix_now = spec.prefixes[0]

    @property
    def where(self) -> str:
        return f"s3://{self.spec.bucket}/{list_root(self.prefix_now)}"

    def steps(self) -> list[Callable[[], Awaitable[CheckResult]]]:
        steps: list[Callable[[], Awaitable[CheckResult]]] = [self.resolution, self.dns, self.tcp, self.bucket]
        for prefix in self.spec.prefixes:
            steps += [lambda p=prefix: self.prefix(p), self.get_tiff]
        return steps

    def failure(self, name: str, exc: BaseException) -> CheckResult:
        error = classify_storage_error(exc, self.endpoint, self.spec.bucket, region=self.region)
        return CheckResult(name, False, error.message)

    async def resolution(self) -> CheckResult:
        endpoint, origin = endpoint_origin(self.s3cfg)
        return CheckResult("endpoint", True, f"{endpoint or 'AWS S3 (' + self.host + ')'} from {origin}")

    async def dns(self) -> CheckResult:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            return CheckResult("DNS", False, f"cannot resolve {self.host!r} ({exc})",
                               f"fix {ENDPOINT_SETTINGS} or the network's DNS")
        return CheckResult("DNS", True, f"{self.host} → {infos[0][4][0]}")

    async def tcp(self) -> CheckResult:
        timeout = float(self.s3cfg.get("connect_timeout_s", 5.0))
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else (exc.strerror or str(exc))
            return CheckResult("TCP connect", False, f"{self.host}:{self.port}: {reason}",
                               f"the endpoint is down or the URL is wrong; start it or fix {ENDPOINT_SETTINGS}")
        writer.close()
        return CheckResult("TCP connect", True, f"{self.host}:{self.port}")

    async def bucket(self) -> CheckResult:
        try:
            async with make_s3_client(self.s3cfg, max_pool=1) as client:
                await client.list_objects_v2(Bucket=self.spec.bucket, MaxKeys=1)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a diagnosis line
            return self.failure("bucket", exc)
        return CheckResult("bucket", True, f"s3://{self.spec.bucket} answers anonymous LIST"
                           if self.s3cfg.get("unsigned", True) else f"s3://{self.spec.bucket} answers LIST")

    async def prefix(self, prefix: str) -> CheckResult:
        self.prefix_now = prefix
        self.image_key = None
        builder = KeyCollector()
        try:
            async with make_s3_client(self.s3cfg, max_pool=1) as client:
                image = await self._sample(client, builder)
                load_data = await self._load_data(client, image) if image is not None else None
        except Exception as exc:  # noqa: BLE001
            return self.failure("prefix", exc)
        return self._layout_result(builder, image, load_data)

    async def _sample(self, client: Any, builder: KeyCollector) -> ImageKey | None:
        params = {"Bucket": self.spec.bucket, "Prefix": list_root(self.prefix_now)}
        for _ in range(SAMPLE_PAGES):
            page = await client.list_objects_v2(**params)
            for obj in page.get("Contents", ()):
                builder.add(obj["Key"], obj.get("Size", -1), obj.get("ETag"))
                parsed = parse_image_key(obj["Key"])
                if isinstance(parsed, ImageKey):
                    self.image_key = obj["Key"]
                    return parsed
            if not page.get("IsTruncated"):
                return None
            params["ContinuationToken"] = page["NextContinuationToken"]
        return None

    async def _load_data(self, client: Any, image: ImageKey) -> str | None:
        """The load_data key of the sampled image's plate, or None (one LIST of its load_data folder)."""
        project = project_of(self.image_key or "")
        if not (project and image.source and image.batch):
            return None
        folder = (f"{project}/{image.source}/workspace/load_data_csv/{image.batch}/"
                  f"{barcode_of(image.plate)}/")
        page = await client.list_objects_v2(Bucket=self.spec.bucket, Prefix=folder, MaxKeys=20)
        names = [obj["Key"] for obj in page.get("Contents", ()) if "load_data" in obj["Key"].rsplit("/", 1)[-1]]
        return sorted(names, key=lambda k: ("with_illum" not in k, not k.endswith(".parquet")))[0] if names else None

    def _layout_result(self, builder: KeyCollector, image: ImageKey | None, load_data: str | None) -> CheckResult:
        if builder.keys_seen == 0:
            return CheckResult("prefix", False, f"no objects under {self.where}",
                               "fix prefix= in the dataset string (list it with `aws s3 ls`)")
        if image is None:
            examples = ", ".join(builder.reports[g].unparsed_examples[0] for g in builder.reports
                                 if builder.reports[g].unparsed_examples)
            return CheckResult("prefix", False, f"none of {builder.keys_seen} sampled keys under {self.where} "
                               f"match {LAYOUT}; examples: {examples}",
                               "point prefix= at a JUMP images folder, or pass index= (load_data CSV/parquet)")
        head = f"{self.where}: {image.layout} layout ({image.source or 'no source'}), e.g. {self.image_key}"
        if load_data:
            return CheckResult("prefix", True, f"{head}; channels from load_data s3://{self.spec.bucket}/{load_data}")
        if image.channel is None:
            return CheckResult("prefix", False, f"{head}; no load_data for plate {image.plate}, and {image.layout} "
                               f"file names of {image.source or 'this source'} do not say which stain a channel holds",
                               "make workspace/load_data_csv/<batch>/<plate>/ readable beside the images, or pass "
                               "index=<load_data or jump_index file>")
        return CheckResult("prefix", True, f"{head}; no load_data: plates will be LISTed key by key and channels "
                           "taken from the layout's own table")

    async def get_tiff(self) -> CheckResult:
        try:
            async with make_s3_client(self.s3cfg, max_pool=1) as client:
                response = await client.get_object(Bucket=self.spec.bucket, Key=self.image_key,
                                                   Range="bytes=0-65535")
                async with response["Body"] as body:
                    head = await body.read()
        except Exception as exc:  # noqa: BLE001
            return self.failure("GET", exc)
        if head[:4] not in TIFF_MAGIC:
            return CheckResult("GET", False, f"{self.image_key} is not a TIFF (starts with {head[:4]!r})",
                               "the object is corrupt or the endpoint serves something else")
        return CheckResult("GET", True, f"{self.image_key}: TIFF header read ({len(head)} bytes)")


def local_checks(spec: DatasetSpec) -> list[CheckResult]:
    root = spec.root
    if not os.path.isdir(root):
        return [CheckResult("root", False, f"{root} does not exist or is not a directory",
                            "fix root= in the dataset string (or copy the data there with `aws s3 sync`)")]
    results = [CheckResult("root", True, root)]
    if not os.access(root, os.R_OK | os.X_OK):
        return results + [CheckResult("readable", False, f"{root} is not readable by this user",
                                      "fix the directory permissions or run as a user that can read it")]
    results.append(CheckResult("readable", True, root))
    builder = KeyCollector()
    image = _sample_local(root, builder)
    if image is None:
        examples = ", ".join([e for r in builder.reports.values() for e in r.unparsed_examples][:3]) or "no files"
        results.append(CheckResult("layout", False, f"no file under {root} matches {LAYOUT}; examples: "
                                   f"{examples}", "point root= at the folder that holds the batch folders"))
    else:
        results.append(CheckResult("layout", True, f"files match a JUMP layout, e.g. {image}"))
    return results


def _sample_local(root: str, builder: KeyCollector) -> str | None:
    """Walk until the first image file in the layout (or LOCAL_SAMPLE_FILES files); return its path."""
    for directory, folders, files in os.walk(root):
        folders.sort()
        relative = os.path.relpath(directory, root)
        for name in sorted(files):
            key = name if relative == "." else f"{relative.replace(os.sep, '/')}/{name}"
            builder.add(key)
            if isinstance(parse_image_key(key, root), ImageKey):
                return key
            if builder.keys_seen >= LOCAL_SAMPLE_FILES:
                return None
    return None


async def run_checks(spec: DatasetSpec, s3cfg: dict) -> list[CheckResult]:
    """All checks up to and including the first failure."""
    if isinstance(spec.storage, LocalDirectory):
        return await asyncio.to_thread(local_checks, spec)
    results: list[CheckResult] = []
    for step in S3Checks(spec, s3cfg).steps():
        results.append(await step())
        if not results[-1].ok:
            break
    return results


def cli_check(args: Any, config: Any) -> int:
    """`prefetchd check DATASET [--endpoint-url URL]`: exit code 0 only when every check passes."""
    from prefetchd.dataset import parse_dataset
    from prefetchd.index import run_async

    s3cfg = dict(config.get("s3"))
    if getattr(args, "endpoint_url", None):
        s3cfg["endpoint_url"] = args.endpoint_url
    try:
        spec = parse_dataset(args.dataset)
    except PrefetchdError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    results = run_async(run_checks(spec, s3cfg))
    for result in results:
        print(result.line())
    return 0 if results and all(r.ok for r in results) else 1
