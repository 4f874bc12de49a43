"""Turns a step's config dataclass into a command line, so every step's CLI has the same shape.

Each dataclass field becomes ``--field-name``; the field's type picks the parser, its default
is the flag's default, and ``metadata={"help": ...}`` is the help text. The container, the
Cloud Run Job and the tests all go through this one parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def build_parser(config_cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or (config_cls.__doc__ or "").strip())
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
        # Bad flags or missing inputs: one line naming the flag on stderr and a non-zero exit,
        # before any work is done.
        raise SystemExit(f"error: {err}") from err


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
