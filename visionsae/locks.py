"""One writer per output: an exclusive lock beside each store, run directory and report directory.

The lock is ``.<name>.lock`` in the output's parent folder, held with ``flock`` for as long as the
writer runs, and holding the writer's pid, host and command line so that a refusal can name it. The
kernel drops an ``flock`` when its process dies, so the file a crashed (``kill -9``) writer leaves
behind is recognisably stale: the next writer takes it over. Where ``flock`` is not supported (some
network file systems), the lock falls back to the recorded pid: a lock of this host whose process is
gone is taken over; one of another host is honoured.

Locks are per process and re-entrant: the same process may take the same output twice (the Python
API opens a writer, a test reopens it), and the lock goes when the last holder releases it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from visionsae.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the pid fallback only
    fcntl = None  # type: ignore[assignment]

_held: dict[str, list] = {}  # lock path -> [fd, holders]


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock"


class OutputLock:
    """``OutputLock(path, "sae-train").acquire()``; ``release()`` (or process exit) lets go."""

    def __init__(self, target: str | os.PathLike, what: str):
        self.target, self.what = Path(target), what
        self.path = lock_path(target)
        self._key = str(self.path)
        self._mine = False

    def acquire(self) -> "OutputLock":
        if self._mine:
            return self
        if self._key in _held:
            _held[self._key][1] += 1
            self._mine = True
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = self._take()
        except OSError as err:
            raise UserError(f"cannot write to {self.target}: {err.strerror or err} at {self.path.parent}; "
                            "choose another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300], "what": self.what}
        try:  # who holds it, for the refusal message; best effort (a full disk must not stop the lock)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            pass
        _held[self._key] = [fd, 1]
        self._mine = True
        return self

    def _take(self) -> int:
        for _ in range(20):  # retried only when the file was replaced under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._lock(fd):
                    raise UserError(self._refusal(fd))
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False  # the holder released (and removed) it between our open and lock
                if same:
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise UserError(f"cannot take the lock {self.path}: it keeps changing; is another writer starting?")

    def _lock(self, fd: int) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        holder = _read_info(fd)  # no flock here: trust the pid where we can check it
        if not holder or holder.get("host") != socket.gethostname():
            return not holder
        return not _alive(int(holder.get("pid", 0)))

    def _refusal(self, fd: int) -> str:
        h = _read_info(fd)
        for _ in range(50):  # a holder that has just taken the lock writes who it is right after: wait for it
            if h:
                break
            time.sleep(0.02)
            h = _read_info(fd)
        h = h or {}
        who = f"pid {h.get('pid', '?')} on {h.get('host', '?')}, since {h.get('since', '?')}"
        cmd = f": {h['command']}" if h.get("command") else ""
        return (f"{self.target} is being written by another {h.get('what', 'process')} ({who}{cmd}); wait for it "
                f"to finish, stop it, or choose another --out (lock file {self.path})")

    def release(self) -> None:
        if not self._mine:
            return
        self._mine = False
        entry = _held.get(self._key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[self._key]
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: a waiter then sees a new inode
        except OSError:
            pass
        os.close(entry[0])

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


def _read_info(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
