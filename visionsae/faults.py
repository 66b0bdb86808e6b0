"""Exact crash points, for tests: die just before or just after the Nth file operation.

visionsae's writers route the operations that order their on-disk state through this module:
``os.replace``, ``os.fsync`` and h5py writes (dataset writes, attribute sets, flushes). Nothing is
wrapped unless an environment variable asks for it, so normal runs pay one dictionary lookup.

- ``VISIONSAE_CRASH_AT=N[:before|:after]`` (default ``after``): the process kills itself with SIGKILL
  (no cleanup, no ``finally``, exactly like ``kill -9``) around the Nth operation, counted from 1.
- ``VISIONSAE_FILE_OPS=PATH``: append one line per operation (``N kind target``) to PATH, which is how
  a test learns how many crash points a run has.

A forked child keeps its parent's count: call ``reset()`` first.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

CRASH_ENV = "VISIONSAE_CRASH_AT"
LOG_ENV = "VISIONSAE_FILE_OPS"

_count = 0


def reset() -> None:
    global _count
    _count = 0


def _crash_point() -> tuple[int, str] | None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return None
    n, _, when = spec.partition(":")
    return int(n), (when or "after")


def operation(kind: str, target: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)``, counted as one file operation ``kind`` on ``target``."""
    if CRASH_ENV not in os.environ and LOG_ENV not in os.environ:
        return fn(*args)
    global _count
    _count += 1
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a") as f:
            f.write(f"{_count} {kind} {target}\n")
    point = _crash_point()
    if point == (_count, "before"):
        os.kill(os.getpid(), signal.SIGKILL)
    result = fn(*args)
    if point == (_count, "after"):
        os.kill(os.getpid(), signal.SIGKILL)
    return result


def replace(src: Any, dst: Any) -> None:
    operation("replace", dst, os.replace, src, dst)


def fsync(fd: int, target: Any = "") -> None:
    operation("fsync", target, os.fsync, fd)
