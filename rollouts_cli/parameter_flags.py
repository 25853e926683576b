"""`rollouts collect`'s flags for the collection parameters, built from the fields of
`rollouts.models.CollectConfig`: each flag's type, help and the default its help shows come
from its field; only a few names and the order of `--help` are said here."""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable
from typing import Any, Union, get_args, get_origin

from pydantic import BeforeValidator
from pydantic.fields import FieldInfo

from rollouts.errors import ExitCode
from rollouts.models import CollectConfig, count_or_auto

FIELDS: dict[str, FieldInfo] = CollectConfig.model_fields

# Flags not spelled as their field with dashes (the field's name stays the `+key`).
_FLAG_NAMES = {
    "input_jsonl_fpath": "--input",
    "output_jsonl_fpath": "--output",
    "retry_failure_classes": "--retry-failure-class",  # one class per flag, repeatable
}
_METAVARS = {"retry_failure_classes": "CLASS"}
# What a flag's help adds to its field's description: what the command does about it.
_COMMAND_NOTES = {"max_duration": f"exit status {int(ExitCode.DEADLINE)}"}


def _non_none(annotation: Any) -> Any:
    """`int | None` -> int; any other annotation as it is."""
    if get_origin(annotation) in (Union, types.UnionType):
        kept = [a for a in get_args(annotation) if a is not type(None)]
        if len(kept) == 1:
            return kept[0]
    return annotation


# `+key=value`s whose value stays the text given, even when it reads as a number or a date
# (paths, agent names, durations): the fields that hold text.
TEXT_KEYS = frozenset(name for name, f in FIELDS.items() if _non_none(f.annotation) is str)


def flag_name(name: str) -> str:
    """The flag of a parameter: `num_repeats` -> `--num-repeats`, `input_jsonl_fpath` ->
    `--input`."""
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def default_value(name: str) -> Any:
    """The parameter's default, as the model has it (a container's: empty)."""
    return FIELDS[name].get_default(call_default_factory=True)


def default_text(name: str) -> str:
    """The default as the docs and `--help` show it: `required`, `64`, `false`; empty for
    none (the description says what no value means)."""
    if FIELDS[name].is_required():
        return "required"
    value = default_value(name)
    if value is None or value == [] or value == {}:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _value_type(field: FieldInfo) -> Callable[[str], Any] | None:
    """What argparse turns a flag's text into: the field's type, or its own parser for a
    count or "auto"; None for text (argparse keeps it as given)."""
    if any(isinstance(m, BeforeValidator) and m.func is count_or_auto for m in field.metadata):
        return count_or_auto
    value = _non_none(field.annotation)
    if get_origin(value) is list:
        (value,) = get_args(value)
    if value is str:
        return None
    if value in (int, float):
        return value  # type: ignore[no-any-return]
    raise TypeError(f"no flag for a parameter of type {field.annotation}")


def flag_help(name: str) -> str:
    """`+key: description (repeatable; default: N)`: the field's words and default."""
    field = FIELDS[name]
    notes = [n for n in (_COMMAND_NOTES.get(name),) if n]
    if get_origin(_non_none(field.annotation)) is list:
        notes.append("repeatable")
    if field.is_required():
        notes.append("required")  # by the flag or its `+key`
    elif default_text(name) and _non_none(field.annotation) is not bool:  # a switch is off
        notes.append(f"default: {default_text(name)}")
    text = f"+{name}: {field.description}" + (f" ({'; '.join(notes)})" if notes else "")
    return text.replace("%", "%%")  # argparse formats help with %


def add_parameter_flag(parser: argparse.ArgumentParser, name: str) -> argparse.Action:
    """The flag of parameter ``name``. Its argparse default is None, not the model's: a flag
    not given is no parameter at all, and the flow's default applies (a `+key` may give it)."""
    field = FIELDS[name]
    value = _non_none(field.annotation)
    options: dict[str, Any] = {"dest": name, "help": flag_help(name), "default": None}
    if value is bool:
        options["action"] = "store_true"
    else:
        if get_origin(value) is list:
            options["action"] = "append"
        value_type = _value_type(field)
        if value_type is not None:
            options["type"] = value_type
        if name in _METAVARS:
            options["metavar"] = _METAVARS[name]
    return parser.add_argument(flag_name(name), **options)
