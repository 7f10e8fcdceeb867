"""Who is on the other end of the control socket: SO_PEERCRED, and the policy that admits a peer.

Admitted: root, the daemon's own uid, `security.allowed_uids`, and members of the allowed group
(`security.allowed_group`, else `shm.group`): primary gid at connect time, supplementary groups read
from /proc/<pid>/status when visible, or membership listed in the group database. Everyone else gets
one `forbidden` error reply and the connection is closed. Socket and directory modes (0660 / 0750) are
the first line of defence; this is the second, for a socket that ended up reachable anyway.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from typing import Any, Iterable

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid {self.pid} uid {self.uid} gid {self.gid}"


def peer_credentials(sock: Any) -> PeerCred | None:
    """The connecting process's credentials (as of connect()); None if the socket cannot tell."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except (OSError, AttributeError):
        return None
    return PeerCred(*_UCRED.unpack(raw))


def _proc_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


class PeerPolicy:
    def __init__(self, allowed_uids: Iterable[int] = (), group: str | None = None):
        self.own_uid = os.geteuid()
        self.allowed_uids = {int(u) for u in allowed_uids or ()}
        self.group = group
        self.gid = grp.getgrnam(group).gr_gid if group else None

    @classmethod
    def from_config(cls, config) -> "PeerPolicy":
        security = config.tree.get("security") or {}
        group = security.get("allowed_group") or config.get("shm.group")
        return cls(security.get("allowed_uids") or (), group)

    def check(self, cred: PeerCred | None) -> str | None:
        """None when the peer is admitted, else the reason (sent to the peer and logged)."""
        if cred is None:
            return "the daemon could not read the peer's credentials (SO_PEERCRED)"
        if cred.uid in (0, self.own_uid) or cred.uid in self.allowed_uids:
            return None
        if self.gid is not None:
            if cred.gid == self.gid or self.gid in _proc_groups(cred.pid) or self._member(cred.uid):
                return None
            return (f"uid {cred.uid} is not allowed to use this prefetchd: add the user to group {self.group!r} "
                    "(shm.group / security.allowed_group) or list the uid in security.allowed_uids")
        return (f"uid {cred.uid} is not allowed to use this prefetchd (it runs as uid {self.own_uid}): set shm.group "
                "or security.allowed_group to a group the user is in, or list the uid in security.allowed_uids")

    def _member(self, uid: int) -> bool:
        try:
            user = pwd.getpwuid(uid)
            group = grp.getgrgid(self.gid)
        except KeyError:
            return False
        return user.pw_gid == self.gid or user.pw_name in group.gr_mem
