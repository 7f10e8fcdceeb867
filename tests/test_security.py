"""Control-socket access: file modes, and SO_PEERCRED checks against real processes of other users.

The daemon runs as root here (as the test does); clients drop to `nobody` before exec. The socket is
made world-reachable on purpose so the peer-credential check, not the file mode, is what is tested.
"""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
import sys

import pytest

from prefetchd.control import request

NOBODY = 65534
USERS_GID = grp.getgrnam("users").gr_gid if "users" in {g.gr_name for g in grp.getgrall()} else None

# stdlib only: the client may run under a system interpreter when the venv's is not reachable by nobody
CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
s.sendall(b'{"op":"ping"}\n')
f = s.makefile("rb")
reply = json.loads(f.readline())
closed = None
if not reply["ok"]:
    closed = f.read() == b""  # refused peers are disconnected: EOF, nothing more
print(json.dumps({"reply": reply, "closed_after": closed}))
"""


def _dropper(uid: int, gid: int, groups: list[int]):
    def drop() -> None:
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    return drop


def _interpreter_for(uid: int, gid: int) -> str:
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            subprocess.run([candidate, "-c", "pass"], preexec_fn=_dropper(uid, gid, []), check=True, timeout=30,
                           capture_output=True)
            return candidate
        except (OSError, subprocess.CalledProcessError):
            continue
    pytest.skip(f"no Python interpreter executable by uid {uid}")


def connect_as(sock, uid: int, gid: int, groups: list[int] = ()) -> dict:
    result = subprocess.run([_interpreter_for(uid, gid), "-c", CLIENT, str(sock)], capture_output=True, text=True,
                            preexec_fn=_dropper(uid, gid, list(groups)), timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def expose(d) -> None:
    """Make the socket reachable by anyone at the file-system level (a misconfiguration to survive)."""
    os.chmod(d.socket.parent, 0o711)
    os.chmod(d.socket, 0o666)


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")


def test_socket_is_0600_without_a_group_and_refuses_other_uids(daemon):
    d = daemon()
    assert stat.S_IMODE(d.socket.stat().st_mode) == 0o600
    expose(d)
    out = connect_as(d.socket, NOBODY, NOBODY)
    assert out["reply"]["ok"] is False and out["reply"]["code"] == "forbidden", out
    assert f"uid {NOBODY} is not allowed" in out["reply"]["error"] and "allowed_uids" in out["reply"]["error"]
    assert out["closed_after"]
    assert "refused control connection" in d.log
    assert request("ping", d.socket)["ok"]  # same uid (root): allowed, daemon unaffected


@pytest.mark.skipif(USERS_GID is None, reason="no 'users' group on this machine")
def test_group_members_are_admitted_and_others_refused(daemon):
    d = daemon("shm.group=users")
    st = d.socket.stat()
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == USERS_GID
    expose(d)
    assert connect_as(d.socket, NOBODY, USERS_GID)["reply"]["ok"] is True                      # primary group
    assert connect_as(d.socket, NOBODY, NOBODY, groups=[USERS_GID])["reply"]["ok"] is True     # supplementary
    refused = connect_as(d.socket, NOBODY, NOBODY)
    assert refused["reply"]["code"] == "forbidden" and "group 'users'" in refused["reply"]["error"]


def test_allowed_uids_admits_a_listed_uid(daemon):
    d = daemon(f"security.allowed_uids=[{NOBODY}]")
    expose(d)
    assert connect_as(d.socket, NOBODY, NOBODY)["reply"]["ok"] is True
    assert connect_as(d.socket, NOBODY - 1, NOBODY)["reply"]["code"] == "forbidden"
