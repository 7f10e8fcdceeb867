"""Shared fixtures: an isolated environment, moto's S3 on loopback, synthetic plates, the real daemon."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from prefetchd.dev import synth
from prefetchd.dev.locals3 import LocalS3
from prefetchd.shm.arena import read_owner_pid

REPO_ROOT = Path(__file__).resolve().parent.parent
DAEMON_START_TIMEOUT_S = 60.0
DAEMON_STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory) -> Iterator[None]:
    """No real credentials, caches or sockets leak in or out; boto never probes instance metadata."""
    base = tmp_path_factory.mktemp("env")
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("AWS_")] + ["PREFETCHD_SOCKET", "RUNTIME_DIRECTORY",
                                                                       "CACHE_DIRECTORY"]:
            patch.delenv(name, raising=False)
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("AWS_CONFIG_FILE", str(base / "aws-config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(base / "aws-credentials"))
        patch.setenv("XDG_CACHE_HOME", str(_mkdir(base / "cache")))
        patch.setenv("XDG_RUNTIME_DIR", str(_mkdir(base / "runtime", mode=0o700)))
        yield


def _mkdir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    return path


@pytest.fixture(scope="session")
def s3(isolated_env) -> Iterator[LocalS3]:
    with LocalS3() as server:
        yield server


@dataclass(frozen=True)
class Synthetic:
    endpoint_url: str
    bucket: str
    prefix: str
    root: Path                   # local copy: what `aws s3 sync s3://<bucket>/ <root>` leaves
    manifest: synth.SynthManifest

    @property
    def spec(self) -> synth.SynthSpec:
        return self.manifest.spec

    @property
    def dataset(self) -> str:
        return f"JUMPS3MultiView:bucket={self.bucket}:prefix={self.prefix}"

    @property
    def local_dataset(self) -> str:
        return f"JUMPLocal:root={self.root / self.prefix}"


@pytest.fixture(scope="session")
def synthetic(s3, tmp_path_factory) -> Synthetic:
    """test_spec() written to disk and uploaded to a public-read bucket."""
    root = tmp_path_factory.mktemp("synthetic")
    manifest = synth.write_plates(root, synth.test_spec())
    bucket = "synthetic-jump"
    synth.upload(manifest, s3.endpoint_url, bucket)
    return Synthetic(s3.endpoint_url, bucket, manifest.spec.prefix, root, manifest)


@pytest.fixture(scope="session")
def many_plates(s3, tmp_path_factory) -> Synthetic:
    """The counts that matter: 48 plates over 2 batches (96 fields, 5 × 48² each), each plate with its 5
    illumination files, in a public-read bucket."""
    root = tmp_path_factory.mktemp("many-plates")
    manifest = synth.write_plates(root, synth.many_plates_spec(48))
    bucket = "many-plates"
    synth.upload(manifest, s3.endpoint_url, bucket)
    return Synthetic(s3.endpoint_url, bucket, manifest.spec.prefix, root, manifest)


# ---------------------------------------------------------------------------------------------
# The daemon, as users run it: `python -m prefetchd serve ...` in its own process.


def free_port() -> int:
    """A loopback TCP port that nothing listens on (at the moment of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("prefetchd-*")}


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, *,
               interval_wait: Callable[[float], None] = time.sleep) -> None:
    """Poll `condition` until true or fail after `timeout_s`; `interval_wait` paces the polling."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        interval_wait(POLL_INTERVAL_S)


def socket_accepts(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


@dataclass
class Daemon:
    socket: Path
    proc: subprocess.Popen
    log_path: Path
    workdir: Path
    stopped: bool = field(default=False)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = DAEMON_STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait for the drain, assert a clean exit 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"daemon did not exit within {timeout_s:.0f} s of SIGTERM; log:\n{self.log[-4000:]}")
        self.stopped = True
        assert code == 0, f"daemon exited with {code}; log:\n{self.log[-4000:]}"
        return code

    def wait_ready(self, timeout_s: float = DAEMON_START_TIMEOUT_S) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited with {self.proc.returncode} before binding; log:\n{self.log[-4000:]}")
            return socket_accepts(self.socket)

        wait_until(ready, timeout_s, f"the daemon socket {self.socket}", interval_wait=self._wait_for_exit)

    def _wait_for_exit(self, seconds: float) -> None:
        # Pacing the poll with wait() returns at once if the daemon dies.
        try:
            self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pass


def serve_available() -> bool:
    return importlib.util.find_spec("prefetchd.cli") is not None


@pytest.fixture
def daemon(s3) -> Iterator[Callable[..., Daemon]]:
    """Factory: `d = daemon("defaults.cache_size=16", ...)` starts `prefetchd serve` and waits for its socket.

    Teardown stops any daemon still running (asserting exit 0) and asserts that no
    /dev/shm/prefetchd-* segment created during the test remains.
    """
    if not serve_available():
        pytest.skip("prefetchd serve is not implemented yet (no prefetchd.cli)")
    segments_before = shm_segments()
    started: list[Daemon] = []

    def start(*overrides: str, endpoint_url: str | None = None, env: dict[str, str] | None = None) -> Daemon:
        # A short directory: unix socket paths are limited to 107 bytes and pytest's tmp paths are long.
        workdir = Path(tempfile.mkdtemp(prefix="pfd-", dir="/tmp"))
        sock = workdir / "p.sock"
        command = [
            sys.executable, "-m", "prefetchd", "serve", "--socket", str(sock),
            "--set", f"cache_dir={workdir / 'cache'}",
            "--set", f"s3.endpoint_url={endpoint_url or s3.endpoint_url}",
        ]
        for item in overrides:
            command += ["--set", item]
        log_path = workdir / "daemon.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env=_daemon_env(env), start_new_session=True)
        handle = Daemon(socket=sock, proc=proc, log_path=log_path, workdir=workdir)
        started.append(handle)
        handle.wait_ready()
        return handle

    yield start

    problems = [problem for handle in started if (problem := _shut_down(handle))]
    # Only this fixture's daemons count: other test sessions may run daemons on the same machine.
    ours = {handle.proc.pid for handle in started}
    leaked = {name for name in shm_segments() - segments_before if read_owner_pid(name) in ours}
    if leaked:
        problems.append(f"shared memory segments left behind: {sorted(leaked)}")
    assert not problems, "\n".join(problems)


def _shut_down(handle: Daemon) -> str | None:
    """Stop a daemon the test left running; never raises, so every daemon gets shut down."""
    try:
        if not handle.stopped:
            handle.stop()
    except (Exception, pytest.fail.Exception) as exc:  # pytest.fail's exception is not an Exception
        return f"daemon {handle.socket}: {exc}"
    finally:
        if handle.proc.poll() is None:
            handle.proc.kill()
            handle.proc.wait()
    shutil.rmtree(handle.workdir, ignore_errors=True)
    return None


def _daemon_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env
