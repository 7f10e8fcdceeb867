"""Crashes: a trainer killed with SIGKILL, and the daemon killed with SIGKILL then restarted."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

from prefetchd.client import attach
from prefetchd.control import request

from conftest import REPO_ROOT, Daemon, _daemon_env, _shut_down, shm_segments, wait_until

TRAINER = textwrap.dedent("""
    import sys
    from prefetchd.client import attach
    s = attach(sys.argv[2], batch_size=2, socket=sys.argv[1], job=sys.argv[3], cache_size=8,
               illum=False, clahe=False, rescale=False)
    batch = next(iter(s.epoch(0)))
    print("LEASED", len(batch.ids), flush=True)
    sys.stdin.read()  # hold the lease until killed
""")


# Job ids, and so /dev/shm names, unique to this test run: other runs may share the machine.
KILLED, ORPHAN = (f"{name}-{uuid.uuid4().hex[:8]}" for name in ("killed", "orphan"))


def job_status(d, job: str) -> dict | None:
    return next((j for j in request("status", d.socket)["jobs"] if j["job"] == job), None)


def test_sigkilled_trainer_loses_its_leases_and_its_arena_is_reaped(daemon, synthetic):
    d = daemon("job.idle_timeout_s=1")
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, str(d.socket), synthetic.dataset, KILLED],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                               env=_daemon_env(None))
    try:
        assert trainer.stdout.readline().split() == ["LEASED", "2"]
        assert job_status(d, KILLED)["slots"]["LEASED"] == 2
        assert f"prefetchd-{KILLED}" in shm_segments()
        trainer.kill()
        trainer.wait(timeout=30)
        # leases come back as soon as the connection drops ...
        wait_until(lambda: (j := job_status(d, KILLED)) is None or
                   (j["slots"]["LEASED"] == 0 and not j["ranks"]["0"]["connected"]), 30, "the leases to return")
        # ... and after job.idle_timeout_s with no client the arena is unlinked
        wait_until(lambda: job_status(d, KILLED) is None, 30, "the idle job to be reaped")
        wait_until(lambda: f"prefetchd-{KILLED}" not in shm_segments(), 10, "the arena to be unlinked")
        assert set(request("status", d.socket)["slots"].values()) == {0}
        assert "has had no client for" in d.log
    finally:
        if trainer.poll() is None:
            trainer.kill()
        trainer.stdin.close()
        trainer.stdout.close()


def _serve(sock: Path, workdir: Path, s3) -> Daemon:
    log_path = workdir / f"daemon-{len(list(workdir.glob('daemon-*')))}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefetchd", "serve", "--socket", str(sock),
                                 "--set", f"cache_dir={workdir / 'cache'}", "--set", f"s3.endpoint_url={s3.endpoint_url}"],
                                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=_daemon_env(None),
                                start_new_session=True)
    handle = Daemon(socket=sock, proc=proc, log_path=log_path, workdir=workdir)
    handle.wait_ready()
    return handle


def test_sigkilled_daemon_leaves_a_segment_that_the_restarted_daemon_reaps(daemon, s3, synthetic, tmp_path):
    first = daemon()
    workdir, sock = first.workdir, first.socket
    stream = attach(synthetic.dataset, batch_size=2, socket=sock, job=ORPHAN, cache_size=8,
                    illum=False, clahe=False, rescale=False)
    try:
        next(iter(stream.epoch(0)))
        first.proc.kill()
        first.proc.wait(timeout=30)
        first.stopped = True
        assert f"prefetchd-{ORPHAN}" in shm_segments() and sock.exists()  # what a crash leaves behind
        second = _serve(sock, workdir, s3)  # same socket path: the stale socket file is replaced
        try:
            # Reaped at startup. Every daemon reaps the arenas of dead daemons when it starts, so on a shared
            # machine another test run's daemon may have been first (then ours has nothing left to log).
            assert f"prefetchd-{ORPHAN}" not in shm_segments()
            assert request("status", sock)["pid"] == second.proc.pid
            with attach(synthetic.dataset, batch_size=2, socket=sock, job=ORPHAN, cache_size=8,
                        illum=False, clahe=False, rescale=False) as again:
                assert len(next(iter(again.epoch(0))).ids) == 2
        finally:
            problem = _shut_down(second)
        assert problem is None, problem
    finally:
        stream.close()  # the old connection is dead: close must not raise
    assert f"prefetchd-{ORPHAN}" not in shm_segments()
