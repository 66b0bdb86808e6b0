"""Command lines generated from config dataclasses: each flag's name, type, default and help exist once.

A config field declared with ``option(default, help=...)`` becomes ``--field-name``:

- ``int`` / ``float`` / ``str`` (or ``X | None``): a typed option; a non-None default is shown in --help;
- ``tuple[T, ...]``: a comma-separated list (``--k 16,32``), refused in one line when an item is empty
  or not a T; ``parse=`` replaces that with the field's own reader of the text (run in the command body,
  so its UserError is a one-line error too);
- ``bool``: a flag that sets True (default False), or, for a default-True field, the flag named by
  ``off=`` (a name or a tuple of names) that sets it False (``progress`` <- ``--quiet``).

Other keys: ``flag`` (another name), ``choices`` (click checks them), ``path`` (True, or "dir": a
click.Path that is not a file), ``cli_type`` (take the text as this type; the config parses it),
``cli=False`` (not a flag: the command builds that field itself). ``help`` may be a callable, evaluated
when the command is built (for choice lists that live in other modules).

Choices are normally checked by the config's ``validate`` rather than ``choices``, so that the error is
the config's one line; click's own usage errors are one line too (``errors.OneLineCommand``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable

import click

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str | Callable[[], str] = "", default_factory: Any = _MISSING,
           **cli: Any) -> Any:
    """A dataclass field that is also a command-line flag (keys: see the module docstring)."""
    metadata = {"help": help, **cli}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the type without ``| None``, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _comma_list(kind: type) -> Callable:
    def parse(ctx, param, value):
        if value is None:
            return None
        parts = [v.strip() for v in str(value).split(",")]
        if "" in parts:
            raise click.BadParameter(f"has an empty item in '{value}': separate values with single commas")
        try:
            return tuple(kind(v) for v in parts)
        except ValueError:
            raise click.BadParameter(f"takes a comma-separated list of {kind.__name__} values, got '{value}'") from None
    return parse


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _click_option(field: dataclasses.Field, hint: Any) -> Callable:
    meta = field.metadata
    flag = meta.get("flag", "--" + field.name.replace("_", "-"))
    help_text = meta.get("help", "")
    help_text = help_text() if callable(help_text) else help_text
    default = field.default if field.default is not _MISSING else None
    required = field.default is _MISSING and field.default_factory is _MISSING
    kind, _ = _base_type(hint)
    kw: dict[str, Any] = {"help": help_text or None}
    if kind is bool:
        if default:  # a default-True switch: the off flag names it
            off = (meta["off"],) if isinstance(meta["off"], str) else tuple(meta["off"])
            return click.option(*off, field.name, flag_value=False, default=True, show_default=False,
                                help=help_text or None)
        return click.option(flag, field.name, is_flag=True, default=False, show_default=False, help=help_text or None)
    if "cli_type" in meta or "parse" in meta:
        kw["type"] = meta.get("cli_type", str)
        kw["default"] = None if default is None else _shown(default)
    elif typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        kw.update(callback=_comma_list(item), default=None if default is None else _shown(default))
    else:
        kw.update(type=kind, default=default)
    if "choices" in meta:
        kw["type"] = click.Choice(list(meta["choices"]))
    if "path" in meta:
        kw["type"] = click.Path(file_okay=meta["path"] != "dir")
    kw["show_default"] = default is not None and not required
    return click.option(flag, field.name, required=required, **kw)


def cli_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def click_options(cls: type) -> Callable:
    """A decorator adding one click option per CLI field of ``cls``, in the fields' order."""
    def decorate(fn: Callable) -> Callable:
        for field, hint in reversed(cli_fields(cls)):
            fn = _click_option(field, hint)(fn)
        return fn
    return decorate


def config_kwargs(cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """The command's parsed values as ``cls`` keyword arguments: each field's ``parse`` applied (its
    errors are one line, as they run inside the command body)."""
    out = dict(params)
    for field, _ in cli_fields(cls):
        parse = field.metadata.get("parse")
        if parse is not None and isinstance(out.get(field.name), str):
            out[field.name] = parse(out[field.name])
    return out
