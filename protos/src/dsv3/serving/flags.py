"""Command-line flags with `DSV3_<FLAG>` environment twins, derived from a frozen config dataclass.

Each service's `__main__` declares its config as a dataclass; this turns every field into a
`--flag-name` whose default comes from `DSV3_FLAG_NAME` (how the Helm chart configures pods), then
from the dataclass default. A missing required value or an unparsable one is a CLI error naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def env_name(field_name: str) -> str:
    return "DSV3_" + field_name.upper()


def _parser_for(kind: Any) -> Any:
    """argparse `type=` for a field annotation (int, float, str, Path, bool, or optional of those)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    base = args[0] if args else kind
    if base is bool:
        return lambda text: text.lower() in ("1", "true", "yes", "on")
    return base


def parse_config(config_type: type[T], argv: Sequence[str] | None = None, description: str = "") -> T:
    """Parse argv (and the environment) into an instance of the frozen dataclass `config_type`."""
    hints = typing.get_type_hints(config_type)
    parser = argparse.ArgumentParser(description=description)
    for field in dataclasses.fields(config_type):
        convert = _parser_for(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        env = env_name(field.name)
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = (
            None
            if required
            else (field.default if field.default is not dataclasses.MISSING else field.default_factory())
        )
        if env in os.environ:
            try:
                default = convert(os.environ[env])
            except ValueError as exc:
                parser.error(f"{env}={os.environ[env]!r}: {exc}")
            required = False
        parser.add_argument(
            flag, type=convert, default=default, required=required, help=f"(env {env}; default {default!r})"
        )
    values = vars(parser.parse_args(argv))
    try:
        return config_type(**values)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


__all__ = ["Path", "env_name", "parse_config"]
