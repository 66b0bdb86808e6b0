"""One exception type for bad input, and the CLI wrapper that turns it into a one-line error.

Every stage raises ``UserError`` (or a subclass) with a message that says what is wrong and what
to do; the CLIs print it as ``error: <message>`` on one line and exit with status 2, never a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Bad input or environment: the message is shown to the user as one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, always


class StoreError(UserError):
    """The activation store is missing, incomplete, corrupt or does not match what was asked."""


class CheckpointError(UserError):
    """A checkpoint file is missing, not a checkpoint, truncated or unsafe."""


def one_line_errors(fn: F) -> F:
    """Decorate a CLI entry point: UserError -> 'error: ...' on stderr, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted; what was complete is kept (use --resume to continue)", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
