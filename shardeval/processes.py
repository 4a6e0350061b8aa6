"""Whether a process of this host is alive: the one answer both lock kinds and the server use."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as gone).

    A zombie has exited but its parent has not reaped it yet: it holds nothing any more, so a
    lease or lock it held is free.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (macOS): existence is all we know
        return True
