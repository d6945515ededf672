"""Durable file writes: what survives a power cut is the old content or the new, never a mix.

Used for the small files the agent replaces whole (the app password hash, the witnessed audit
head, the broken-log marker) and for the directory fsync that makes a create, rename or unlink
itself durable (the audit logs, the vault, the requester's evidence).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """fsync ``directory``, so a file created, renamed or removed in it stays so after a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may store less than it is given)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write stored no bytes")
        view = view[written:]


def replace_file(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``) atomically and durably.

    The data goes to a temporary sibling, which is fsynced, renamed over ``path`` and its
    directory fsynced; a failure removes the temporary file and leaves ``path`` as it was.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
