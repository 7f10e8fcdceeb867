"""A JUMPLocal root as the client sees it.

The root is a path on the trainer's machine: the client makes it absolute before the daemon (whose working
directory is elsewhere) sees it, and explains when the daemon cannot see a directory the client can. Only the
`root=` part of the dataset string is read here, so the client does not import the daemon's storage stack;
the daemon parses and validates the whole string (`prefetchd.dataset.parse_dataset`).
"""

from __future__ import annotations

import os

LOCAL_NAME = "JUMPLocal"

_SANDBOXED = {  # directory -> the unit setting that hides it from the service, and the way to grant one path
    "/home": ("ProtectHome=yes", "ProtectHome=tmpfs and BindReadOnlyPaths={root}"),
    "/root": ("ProtectHome=yes", "ProtectHome=tmpfs and BindReadOnlyPaths={root}"),
    "/run/user": ("ProtectHome=yes", "ProtectHome=tmpfs and BindReadOnlyPaths={root}"),
    "/tmp": ("PrivateTmp=yes", None),
    "/var/tmp": ("PrivateTmp=yes", None),
}


def local_root(text: str) -> str | None:
    """The `root=` value of a JUMPLocal dataset string, None for anything else (or a string without one)."""
    if not isinstance(text, str):
        return None
    name, *pairs = text.strip().split(":")
    if name != LOCAL_NAME:
        return None
    roots = [value for key, sep, value in (p.partition("=") for p in pairs) if sep and key == "root"]
    return roots[0] if len(roots) == 1 and roots[0] else None


def absolute_local_root(text: str) -> str:
    """`JUMPLocal:root=data` → `JUMPLocal:root=/abs/data` (relative to this process); anything else unchanged."""
    root = local_root(text)
    if root is None:
        return text  # the daemon reports what is wrong with it
    absolute = os.path.abspath(os.path.expanduser(root))
    return text if absolute == root else text.replace(f":root={root}", f":root={absolute}", 1)


def unseen_local_root_hint(text: str) -> str | None:
    """Why the daemon cannot read a local root that exists for this process, and what to do; None otherwise."""
    root = local_root(text)
    if root is None or not os.path.isdir(root):
        return None
    root = os.path.abspath(root)
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
