"""Dataset strings in the DINOv2/v3 convention: `Name:key=value:key=value`.

    JUMPS3MultiView:bucket=cellpainting-gallery:prefix=cpg0000-jump-pilot/source_4/images
    JUMPLocal:root=/data/jump

The endpoint is deliberately not part of the string (see `prefetchd.s3.resolve_endpoint`).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

from prefetchd.channels import DEFAULT_CHANNELS, parse_channels
from prefetchd.errors import DatasetError

DEFAULT_DATASET = (
    "JUMPS3MultiView:bucket=cellpainting-gallery:prefix=cpg0000-jump-pilot/source_4/images"
)

_URL_PLACEHOLDER = "\0//"
_S3_URL = re.compile(r"s3://(?P<bucket>[^/:]+)(?P<prefix>/[^:]*)?")
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")   # what botocore accepts as a bucket name (besides ARNs)

_KEYS: dict[str, dict[str, bool]] = {
    # name -> {key: required}
    "JUMPS3MultiView": {"bucket": True, "prefix": False, "max_samples": False, "channels": False, "index": False},
    "JUMPLocal": {"root": True, "max_samples": False, "channels": False, "index": False},
}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    bucket: str | None = None
    prefix: str = ""
    root: str | None = None
    max_samples: int | None = None
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    index: str | None = None
    text: str = field(default="", compare=False)

    @property
    def is_local(self) -> bool:
        return self.name == "JUMPLocal"

    @property
    def location(self) -> str:
        return self.root if self.is_local else f"s3://{self.bucket}/{self.prefix}"

    def cache_key(self, endpoint: str | None) -> str:
        """Key of the on-disk index cache: the listing depends on where, not on which subset is used."""
        where = f"local:{os.path.abspath(self.root)}" if self.is_local else f"s3:{endpoint or 'aws'}:{self.bucket}/{self.prefix}"
        return hashlib.sha256(f"{where}|index={self.index or ''}".encode()).hexdigest()[:24]


def parse_dataset(text: str) -> DatasetSpec:
    """Parse and validate a dataset string; every mistake names what to change."""
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"empty dataset string; expected for example {DEFAULT_DATASET!r}")
    control = next((c for c in text if not c.isprintable()), None)
    if control is not None:
        raise DatasetError(f"dataset string {text!r} contains the control character {control!r}: remove it")
    url = _S3_URL.fullmatch(text.strip())
    if url:
        raise DatasetError(f"dataset strings are not URLs: for {text.strip()} write "
                           f"'JUMPS3MultiView:bucket={url['bucket']}:prefix={(url['prefix'] or '').strip('/')}'")
    # `index=s3://bucket/key` is the one place a value may hold "://"; protect it from the ':' split
    # (the placeholder cannot occur in the text: control characters were refused above).
    name, *pairs = (part.replace(_URL_PLACEHOLDER, "://") for part in
                    text.strip().replace("://", _URL_PLACEHOLDER).split(":"))
    if name not in _KEYS:
        raise DatasetError(
            f"unknown dataset name {name!r}; accepted names: {', '.join(_KEYS)} "
            f"(for example {DEFAULT_DATASET!r})"
        )
    accepted = _KEYS[name]
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or "=" in value:
            raise DatasetError(
                f"malformed part {pair!r} in dataset string {text!r}: expected key=value "
                "separated by ':' (values cannot contain ':' or '=')"
            )
        if key not in accepted:
            raise DatasetError(
                f"unknown key {key!r} for {name}; accepted keys: {', '.join(accepted)}"
            )
        if key in values:
            raise DatasetError(f"key {key!r} given twice in dataset string {text!r}")
        values[key] = value
    missing = [key for key, required in accepted.items() if required and key not in values]
    if missing:
        raise DatasetError(f"{name} needs {', '.join(k + '=…' for k in missing)} (in {text!r})")

    max_samples = None
    if "max_samples" in values:
        try:
            max_samples = int(values["max_samples"])
        except ValueError:
            max_samples = -1
        if max_samples <= 0:
            raise DatasetError(f"max_samples must be a positive integer, got {values['max_samples']!r}")
    channels = parse_channels(values.get("channels"))
    if name == "JUMPLocal":
        root = os.path.expanduser(values["root"])
        return DatasetSpec(name, root=root, max_samples=max_samples, channels=channels,
                           index=values.get("index"), text=text)
    bucket = values["bucket"]
    if "://" in bucket:
        raise DatasetError(
            f"dataset strings take a bare bucket name and a prefix, not a URL: write "
            f"'JUMPS3MultiView:bucket=<bucket>:prefix=<path>' instead of {text!r}"
        )
    if not bucket or "/" in bucket:
        raise DatasetError(f"bucket must be a bare bucket name like 'cellpainting-gallery', got {bucket!r}")
    if not _BUCKET.fullmatch(bucket):
        raise DatasetError(f"bucket names use only ASCII letters, digits, '.', '-' and '_' (S3 naming rules), "
                           f"got {bucket!r}: fix bucket= in the dataset string")
    prefix = values.get("prefix", "").strip("/")
    return DatasetSpec(name, bucket=bucket, prefix=prefix, max_samples=max_samples,
                       channels=channels, index=values.get("index"), text=text)


# ---- local roots, seen from the client ---------------------------------------------------------------
# A JUMPLocal root is a path on the trainer's machine: the client makes it absolute before the daemon (whose
# working directory is elsewhere) sees it, and explains when the daemon cannot see a directory the client can.

_SANDBOXED = {  # directory -> the unit setting that hides it from the service, and the way to grant one path
    "/home": ("ProtectHome=yes", "ProtectHome=tmpfs and BindReadOnlyPaths={root}"),
    "/root": ("ProtectHome=yes", "ProtectHome=tmpfs and BindReadOnlyPaths={root}"),
    "/run/user": ("ProtectHome=yes", "ProtectHome=tmpfs and BindReadOnlyPaths={root}"),
    "/tmp": ("PrivateTmp=yes", None),
    "/var/tmp": ("PrivateTmp=yes", None),
}


def absolute_local_root(text: str) -> str:
    """`JUMPLocal:root=data` → `JUMPLocal:root=/abs/data` (relative to this process); anything else unchanged."""
    try:
        spec = parse_dataset(text)
    except DatasetError:
        return text  # the daemon reports it, with the same message
    if not spec.is_local:
        return text
    root = text.split(":root=", 1)[1].split(":", 1)[0]
    absolute = os.path.abspath(os.path.expanduser(root))
    return text if absolute == root else text.replace(f":root={root}", f":root={absolute}", 1)


def unseen_local_root_hint(text: str) -> str | None:
    """Why the daemon cannot read a local root that exists for this process, and what to do; None otherwise."""
    try:
        spec = parse_dataset(text)
    except DatasetError:
        return None
    if not spec.is_local or not os.path.isdir(spec.root):
        return None
    root = os.path.abspath(spec.root)
    hidden = next((d for d in _SANDBOXED if root == d or root.startswith(d + "/")), None)
    if hidden is None:
        return (f"the prefetchd daemon cannot read {root}, though this process can: it runs as another user or "
                f"in another mount namespace; make {root} readable by the daemon's user (group prefetchd), or run "
                "a daemon of your own (`prefetchd serve --socket PATH`); see docs/operations.md")
    setting, grant = _SANDBOXED[hidden]
    fixes = ["copy the data to a directory outside /home and /tmp that group prefetchd can read (e.g. /srv/jump)"]
    if grant:
        fixes.append(f"grant this one with `systemctl edit prefetchd`: {grant.format(root=root)}")
    fixes.append("run a daemon of your own (`prefetchd serve --socket PATH`)")
    return (f"the prefetchd daemon cannot read {root}, though this process can: a daemon run by systemd does not "
            f"see {hidden} ({setting} in prefetchd.service). Either " + ", or ".join(fixes) +
            "; see docs/operations.md")
