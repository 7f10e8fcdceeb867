"""One daemon per socket path: a removed socket file does not let a second daemon in, and a daemon never
deletes a socket file that is not its own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from prefetchd.control import request

from conftest import REPO_ROOT, _daemon_env, wait_until


def serve_again(d, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """A second `prefetchd serve` on the first daemon's socket path."""
    return subprocess.run([sys.executable, "-m", "prefetchd", "serve", "--socket", str(d.socket),
                           "--set", f"cache_dir={d.workdir / 'cache2'}"],
                          cwd=REPO_ROOT, env=_daemon_env(None), capture_output=True, text=True, timeout=timeout_s)


def pid_on(path) -> int | None:
    try:
        return request("ping", path, timeout=5)["pid"]
    except Exception:
        return None


def test_a_removed_socket_does_not_let_a_second_daemon_start_and_the_first_binds_it_again(daemon):
    d = daemon()
    os.unlink(d.socket)
    second = serve_again(d)
    assert second.returncode != 0
    errors = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and f"another prefetchd (pid {d.proc.pid}) already serves {d.socket}" in errors[0], \
        second.stderr
    wait_until(lambda: pid_on(d.socket) == d.proc.pid, 30, "the first daemon to bind its socket again")
    assert "was removed; binding it again" in d.log
    d.stop()
    assert not d.socket.exists()


def test_stopping_a_daemon_leaves_a_socket_file_that_is_not_its_own(daemon):
    d = daemon()
    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        staged = d.socket.with_name("stranger.sock")
        stranger.bind(str(staged))
        stranger.listen(1)
        os.rename(staged, d.socket)  # atomically replaces the daemon's socket file: there is no moment without one
        inode = os.stat(d.socket).st_ino
        wait_until(lambda: "was replaced by another file" in d.log, 30, "the daemon to notice the stranger")
        d.stop()
        assert d.socket.exists() and os.stat(d.socket).st_ino == inode  # not deleted by the daemon's shutdown
    finally:
        stranger.close()


def test_the_path_is_free_again_once_the_daemon_stopped(daemon):
    first = daemon()
    first.stop()
    second = subprocess.Popen([sys.executable, "-m", "prefetchd", "serve", "--socket", str(first.socket),
                               "--set", f"cache_dir={first.workdir / 'cache2'}"],
                              cwd=REPO_ROOT, env=_daemon_env(None), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: second.poll() is not None or pid_on(first.socket) == second.pid, 60,
                   "a new daemon on the freed path")
        assert second.poll() is None, second.stderr.read()
    finally:
        second.terminate()
        assert second.wait(30) == 0
    assert not first.socket.exists()
