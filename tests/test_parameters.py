"""One declaration of a collection's parameters (`CollectConfig`): the flow's signature and
form, the CLI's `+key`s and the multi-dataset config follow it."""

from __future__ import annotations

import inspect

import pytest

from flows.collect import collect_rollouts
from rollouts.models import CollectConfig, DatasetConfig
from rollouts_cli.main import build_parser, collect_params

FIELDS = CollectConfig.model_fields


def test_the_flow_signature_is_the_declaration() -> None:
    params = inspect.signature(collect_rollouts.fn).parameters
    assert list(params) == list(FIELDS)
    for name, p in params.items():
        field = FIELDS[name]
        # Containers default to None in the signature (a mutable default is shared).
        default = None if name in ("responses_create_params", "retry_failure_classes") else (
            field.get_default(call_default_factory=True))  # fmt: skip
        expected = inspect.Parameter.empty if field.is_required() else default
        assert p.default == expected, name


def test_every_field_has_a_title_and_a_description_the_form_shows() -> None:
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(collect_rollouts.fn).model_dump_for_openapi()["properties"]
    for name, field in FIELDS.items():
        assert field.title and field.description, name
        assert schema[name]["title"] == field.title
        assert schema[name]["description"] == field.description


def test_every_field_has_a_flag() -> None:
    flag_dests = {a.dest for a in build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
                  .choices["collect"]._actions}  # fmt: skip
    assert set(FIELDS) - {"responses_create_params"} <= flag_dests


@pytest.mark.parametrize("field", sorted(set(FIELDS) - {"fresh", "retry_failure_classes"}))
def test_a_dataset_of_a_multi_dataset_run_can_set_every_parameter(field: str) -> None:
    """Every collection parameter but `fresh` and `retry_failure_classes` (one-offs, never a
    standing config) reaches the dataset's subflow."""
    collect = DatasetConfig(name="d", input="in.jsonl", output="out.jsonl").collect_parameters()
    assert field in collect


def test_cli_forms_build_a_valid_declaration() -> None:
    params = collect_params(build_parser().parse_args(
        ["collect", "--input", "a.jsonl", "--output", "b.jsonl", "--num-repeats-add-seed",
         "+limit=5", "--temperature", "0.3"]))  # fmt: skip
    assert CollectConfig(**params).num_repeats_add_seed is True
