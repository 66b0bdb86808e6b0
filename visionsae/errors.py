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


def _one_line_command_class():
    import click

    class OneLineCommand(click.Command):
        """A click command whose usage errors (unknown option, bad value, missing argument) are one line,
        ``error: ... (see --help)``, exit status 2, like every other bad input."""

        def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
            if not standalone_mode:
                return super().main(args, prog_name, complete_var, standalone_mode, **extra)
            try:
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except click.UsageError as err:
                name = self.name or prog_name
                print(f"error: {' '.join(err.format_message().split())} (see {name} --help)", file=sys.stderr)
                sys.exit(2)
            except click.ClickException as err:
                print(f"error: {' '.join(err.format_message().split())}", file=sys.stderr)
                sys.exit(err.exit_code)
            except click.Abort:
                print("error: aborted", file=sys.stderr)
                sys.exit(1)
            sys.exit(code if isinstance(code, int) else 0)

    return OneLineCommand


OneLineCommand = _one_line_command_class()
