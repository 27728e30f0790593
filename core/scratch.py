"""Scratch files named after the process that owns them, so that a later process can remove a dead one's.

A worker killed mid-job (SIGKILL, out of memory) leaves its job folder behind, and an API
process killed mid-upload leaves its spool file. Each such entry is named
`<prefix>_<host>_<pid>_<random>`. `remove_orphans` deletes the entries of this host whose
process no longer runs. It also deletes those with the caller's own pid, because after a
container restart the new process can get the dead one's pid, and the caller owns no entry
when it sweeps. Entries of other hosts, which may share the volume, and names in any other
form are left alone. This module must not import torch.
"""

import logging
import os
import re
import socket
import uuid
from pathlib import Path

from core.storage import remove_tree

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^(?P<prefix>[A-Za-z0-9.-]+)_(?P<host>[A-Za-z0-9.-]+)_(?P<pid>\d+)_(?P<random>[0-9a-f]{8})$")
_UNSAFE_HOST_CHARACTERS = re.compile(r"[^A-Za-z0-9.-]")


def host_tag() -> str:
    """Return this host's name reduced to letters, digits, `.` and `-`."""
    return _UNSAFE_HOST_CHARACTERS.sub("-", socket.gethostname()) or "host"


def scratch_name(prefix: str) -> str:
    """Return a new entry name `<prefix>_<host>_<pid>_<random>` owned by this process."""
    if not re.fullmatch(r"[A-Za-z0-9.-]+", prefix):
        raise ValueError(f"scratch prefix {prefix!r} may contain only letters, digits, `.` and `-`")
    return f"{prefix}_{host_tag()}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Another user's live process.
        return True
    return True


def is_orphan(name: str) -> bool:
    """True when `name` is a scratch entry of this host whose owner process is gone or is this process."""
    match = _NAME.match(name)
    if match is None or match["host"] != host_tag():
        return False
    pid = int(match["pid"])
    return pid == os.getpid() or not _process_runs(pid)


def remove_orphans(folder: Path) -> list[Path]:
    """Delete the orphaned entries directly under `folder`; return what was deleted."""
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if not is_orphan(path.name):
            continue
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        logger.warning("removed %s, left by a process that stopped before cleaning up", path)
    return removed
