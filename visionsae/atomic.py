"""The one way visionsae replaces a file: temporary name, fsync, rename, fsync of the folder.

A crash at any point leaves either the old file or the whole new one, never a part: the bytes are durable
before the rename makes them visible, and the rename is durable before the caller goes on (the folder's
fsync). The fsync and the rename go through ``visionsae.faults``, so the crash-point tests can stop a
process at each. Callers turn the OSError into their own one-line error (what failed, what to do).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable

from visionsae import faults


def atomic_write(path: str | os.PathLike, data: bytes | memoryview | Callable[[BinaryIO], None], *,
                 hidden: bool = False) -> None:
    """Replace ``path`` by ``data`` (bytes, or a function that writes to the open file) atomically.

    The temporary file is ``<name>.tmp-<pid>`` beside ``path`` (``.<name>.tmp-<pid>`` with ``hidden``), and
    is removed when anything fails; the exception (OSError, or whatever ``data`` raises) propagates."""
    path = Path(path)
    tmp = path.with_name(f"{'.' if hidden else ''}{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            faults.fsync(f.fileno(), tmp)
        faults.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
