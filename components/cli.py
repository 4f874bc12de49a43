"""Turns a step's config dataclass into a command line, so every step's CLI has the same shape,
and ends every CLI's user errors the same way.

Each dataclass field becomes ``--field-name``; the field's type picks the parser, its default
is the flag's default, and ``metadata={"help": ...}`` is the help text. The container, the
Cloud Run Job and the tests all go through this one parser.

Bad input (a flag, a missing or malformed file) raises :class:`UserError`, whose message names
the flag or file and what to do; :func:`entrypoint` turns it into one ``error: ...`` line on
stderr and exit status 2. Anything else is a bug and keeps its traceback; ``--debug`` or
``GEMMA_PETS_DEBUG=1`` shows the traceback of user errors too. No heavy import here: the
pipelines/ CLIs, which never import torch, use it too.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")
DEBUG_ENV = "GEMMA_PETS_DEBUG"
USER_ERROR_EXIT = 2  # as argparse exits on a bad flag
# owner/name: the only shape sent to the Hugging Face Hub (see hub_id)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class UserError(ValueError):
    """Bad input, not a bug: the message names the flag, field or file and what to do.

    A ValueError, so callers that catch bad values keep working."""


def hub_id(source: str) -> str | None:
    """``source`` when it is to be read from the Hugging Face Hub, else None (a local path).

    A path that exists is always local. One starting with '.', '/' or '~', or with more than one
    '/', is never a hub id (a mistyped relative path such as ``data/oxford-pets/`` must say "no
    such folder", not wait on the Hub); only an ``owner/name`` that is not a local path is.
    """
    if Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
        return None
    return source if HUB_ID.match(source) else None


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"  # e.g. "out/x: Permission denied"
    return str(err)


def entrypoint(main: Callable[..., int | None], user_errors: tuple[type[BaseException], ...] = ()):
    """Wrap a CLI ``main(argv)``: a user error ends as one ``error: ...`` line and exit status 2.

    User errors are :class:`UserError`, ``user_errors`` (a CLI's own types), and the OS errors
    that name a path (missing file, no permission); ``--debug`` or ``GEMMA_PETS_DEBUG=1`` re-raise.
    """
    caught = (UserError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
              *user_errors)

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        try:
            return main([a for a in argv if a != "--debug"]) or 0
        except caught as err:
            if debug:
                raise
            print(f"error: {_describe(err)}", file=sys.stderr)
            return USER_ERROR_EXIT

    return wrapper


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def build_parser(config_cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description or (config_cls.__doc__ or "").strip(),
        epilog=f"--debug (or {DEBUG_ENV}=1): show the traceback of an error")
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        tp, _optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory()
        )
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text, "required": required}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        if typing.get_origin(tp) in (list, tuple):
            (item,) = typing.get_args(tp)[:1]
            kwargs.update(nargs="*", type=item)
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            raise TypeError(f"{config_cls.__name__}.{f.name}: unsupported CLI type {tp!r}")
        if not required:
            kwargs["default"] = default
        parser.add_argument(flag, **kwargs)
    return parser


def parse_config(config_cls: type[T], argv: Sequence[str] | None = None) -> T:
    """Parse argv into ``config_cls``; the dataclass's ``__post_init__`` validates values."""
    args = build_parser(config_cls).parse_args(argv)
    try:
        return config_cls(**vars(args))
    except (ValueError, TypeError, FileNotFoundError) as err:
        # Bad flags or missing inputs, found before any work is done; entrypoint reports them.
        raise UserError(str(err)) from err


def to_argv(config) -> list[str]:
    """The flags that ``parse_config`` turns back into ``config`` (None fields left out), to run
    the same step in another process (finetune's torchrun workers)."""
    argv: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        flag = "--" + f.name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv
