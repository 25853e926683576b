"""docs/parameters.md's tables, generated from the one declaration of the collection
parameters (`rollouts.models.CollectConfig`) and `rollouts collect`'s parser:

    python -m rollouts_cli.parameters_table --write     (or: make docs)

Without ``--write`` it prints the tables; with ``--check`` it exits 1 while the page differs
(tests/test_parameters.py checks it too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rollouts.models import CollectConfig, DatasetConfig
from rollouts_cli.main import RCP_FLAGS, RCP_PREFIX, build_parser
from rollouts_cli.parameter_flags import FIELDS, default_text

DOC = Path(__file__).resolve().parents[1] / "docs" / "parameters.md"
BEGIN, END = "<!-- parameters:begin -->", "<!-- parameters:end -->"


def collect_parser() -> argparse.ArgumentParser:
    """The parser of `rollouts collect`."""
    parser = build_parser()
    # argparse's `_actions` and `_SubParsersAction`: no public way to reach a subparser; both
    # unchanged since Python 2.7, and test_parameters (the page current) fails if they move.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices["collect"]
            return found
    raise LookupError("rollouts has no collect command")


def _flag(action: argparse.Action) -> str:
    """`--top-p`, `--responses-create-param KEY=VALUE`: a flag as typed."""
    metavar = f" {action.metavar}" if action.dest == "rcp" else ""
    return ", ".join(f"`{o}{metavar}`" for o in action.option_strings)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def dataset_key(name: str) -> str:
    """The parameter's key in a dataset of a `rollouts multi` config, or "" for none."""
    if name in CollectConfig.files:
        return DatasetConfig.files[CollectConfig.files.index(name)]
    return name if name in DatasetConfig.model_fields else ""


def render() -> str:
    """The parameters' table, then the other flags of `rollouts collect`."""
    flags: dict[str, list[str]] = {}
    others = []
    for action in collect_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        dest = "responses_create_params" if action.dest in {*RCP_FLAGS, "rcp"} else action.dest
        if dest in FIELDS:
            flags.setdefault(dest, []).append(_flag(action))
        else:
            others.append(f"| {_flag(action)} | {_cell(action.help or '')} |")
    rows = [
        "| flag | `+key` / flow parameter | key in a `rollouts multi` dataset | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for name, field in FIELDS.items():
        key = f"{RCP_PREFIX}KEY" if name == "responses_create_params" else name
        in_dataset = dataset_key(name)
        rows.append(
            f"| {', '.join(flags.get(name, []))} | `{key}` | "
            f"{f'`{in_dataset}`' if in_dataset else 'no'} | {default_text(name)} | "
            f"{_cell(field.description or '')} |"
        )
    rows += ["", "Other flags of `rollouts collect`:", "", "| flag | meaning |", "|---|---|"]
    return "\n".join(rows + others) + "\n"


def with_tables(page: str, tables: str) -> str:
    """``page`` with what lies between its markers replaced by ``tables``."""
    head, begin, rest = page.partition(BEGIN + "\n")
    _, end, tail = rest.partition(END)
    if not (begin and end):
        raise ValueError(f"the page has no {BEGIN} ... {END} lines")
    return head + begin + tables + end + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rollouts_cli.parameters_table")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"update {DOC}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 while {DOC} differs")
    args = parser.parse_args(argv)
    tables = render()
    if not (args.write or args.check):
        sys.stdout.write(tables)
        return 0
    page = DOC.read_text(encoding="utf-8")
    wanted = with_tables(page, tables)
    if args.check:
        if wanted != page:
            print(f"{DOC} is out of date: python -m rollouts_cli.parameters_table --write",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    if wanted != page:
        DOC.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
