"""One declaration of a collection's parameters (`CollectionParameters`, extended by
`CollectConfig` and `DatasetConfig`): the CLI's flags and `+key`s and docs/parameters.md are
built from it; the flow's signature mirrors it, and is held to it here."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BeforeValidator, ValidationError
from pydantic.fields import FieldInfo

from flows.collect import collect_rollouts
from rollouts.models import CollectConfig, CollectionParameters, DatasetConfig, MultiDatasetConfig
from rollouts_cli.main import UsageError, build_parser, collect_params, load_multi_config
from rollouts_cli.parameter_flags import TEXT_KEYS
from rollouts_cli.parameters_table import DOC, collect_parser, render, with_tables

pytestmark = pytest.mark.fast

FIELDS = CollectConfig.model_fields
SHARED = CollectionParameters.model_fields
# The one-offs of a single run: never part of a dataset's standing config.
ONE_OFFS = {"fresh", "retry_failure_classes"}
# Containers default to None in the flow's signature (a mutable default would be shared).
CONTAINERS = {"responses_create_params", "retry_failure_classes"}


def test_a_collection_and_a_dataset_share_one_declaration_and_add_only_their_files() -> None:
    assert set(FIELDS) == set(SHARED) | {*CollectConfig.files, *ONE_OFFS}
    assert set(DatasetConfig.model_fields) == set(SHARED) | {"name", *DatasetConfig.files}
    assert DatasetConfig.files == ("input", "output")  # the multi-dataset config's keys
    for config in (CollectConfig, DatasetConfig):  # a shared parameter is declared once
        declared_again = set(vars(config).get("__annotations__", {})) & set(SHARED)
        assert declared_again == set(), f"{config.__name__} declares {declared_again} again"
    # the files come first in the forms, run.json and the docs
    assert list(FIELDS)[:2] == list(CollectConfig.files)
    assert list(DatasetConfig.model_fields)[:3] == ["name", "input", "output"]


@pytest.mark.parametrize("field", sorted(set(FIELDS) - ONE_OFFS))
def test_a_dataset_of_a_multi_dataset_run_can_set_every_parameter(field: str) -> None:
    """Every collection parameter but `fresh` and `retry_failure_classes` (one-offs, never a
    standing config) reaches the dataset's subflow."""
    collect = DatasetConfig(name="d", input="in.jsonl", output="out.jsonl").collect_parameters()
    assert field in collect


def test_a_dataset_s_parameters_are_a_valid_collection() -> None:
    dataset = DatasetConfig(name="d", input="in.jsonl", output="out.jsonl", num_repeats=3,
                            responses_create_params={"temperature": 0.4})  # fmt: skip
    params = dataset.collect_parameters()
    assert set(params) == set(FIELDS) - ONE_OFFS
    config = CollectConfig(**params)
    assert (config.input_jsonl_fpath, config.output_jsonl_fpath) == ("in.jsonl", "out.jsonl")
    assert config.num_repeats == 3 and config.responses_create_params == {"temperature": 0.4}


def multi(*datasets: dict[str, Any]) -> dict[str, Any]:
    return {"datasets": [{"name": "easy", "input": "easy.jsonl", "output": "out/easy.jsonl"},
                         *datasets]}  # fmt: skip


@pytest.mark.parametrize(
    ("dataset", "where", "words"),
    [
        ({"responses_create_params": {"temprature": 0.2}},
         "datasets.1 (hard).responses_create_params",
         "responses_create_params.temprature is not a Responses API create parameter"),
        ({"output": "hard.jsonl"}, "datasets.1 (hard)", "output must differ from input"),
        ({"output": "./hard.jsonl"}, "datasets.1 (hard)", "output must differ from input"),
        ({"num_repeats": 0}, "datasets.1 (hard).num_repeats", "num_repeats must be at least 1"),
        ({"limit": 0}, "datasets.1 (hard).limit", "limit must be a positive number of rows"),
    ],
)  # fmt: skip
def test_a_multi_dataset_config_is_refused_up_front_naming_the_dataset_and_field(
    dataset: dict[str, Any], where: str, words: str, tmp_path: Path
) -> None:
    """Checked when the config is read, as for a single collection: not when that dataset's
    subflow starts, after the other datasets have begun."""
    raw = multi({"name": "hard", "input": "hard.jsonl", "output": "out/hard.jsonl", **dataset})
    with pytest.raises(ValidationError, match=words):
        MultiDatasetConfig.model_validate(raw)
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UsageError) as refused:
        load_multi_config(str(path))
    assert f"config {path}: {where}: Value error, {words}" in str(refused.value)


def test_the_flow_signature_mirrors_the_declaration() -> None:
    """Name, order, default and type of every parameter; the validators the flow's own
    parameter check runs are the field's; the form's title and description are the field's."""
    params = inspect.signature(collect_rollouts.fn, eval_str=True).parameters
    assert list(params) == list(FIELDS)
    for name, p in params.items():
        field = FIELDS[name]
        model_default = field.get_default(call_default_factory=True)
        if field.is_required():
            assert p.default is inspect.Parameter.empty, name
        elif name in CONTAINERS:
            assert p.default is None and model_default in ([], {}), name
        else:
            assert p.default == model_default and type(p.default) is type(model_default), name
        assert typing.get_origin(p.annotation) is typing.Annotated, name
        value_type, *metadata = typing.get_args(p.annotation)
        expected = field.annotation | None if name in CONTAINERS else field.annotation  # type: ignore[operator]
        assert value_type == expected, name
        validators = [m.func for m in metadata if isinstance(m, BeforeValidator)]
        assert all(f in [m.func for m in field.metadata if isinstance(m, BeforeValidator)]
                   for f in validators), name  # fmt: skip
        (form,) = [m for m in metadata if isinstance(m, FieldInfo)]
        assert form.json_schema_extra == {"title": field.title, "description": field.description}


def test_every_field_has_a_title_and_a_description_the_form_shows() -> None:
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(collect_rollouts.fn).model_dump_for_openapi()["properties"]
    for name, field in FIELDS.items():
        assert field.title and field.description, name
        assert schema[name]["title"] == field.title
        assert schema[name]["description"] == field.description


# `rollouts collect`'s flags, as they were typed by hand before being built from the fields.
FLAGS = [
    ["-h", "--help"], ["--verbose", "-v"], ["--agent-name"], ["--agent-url"], ["--input"],
    ["--output"], ["--limit"], ["--num-repeats"], ["--num-samples-in-parallel"],
    ["--max-in-flight"], ["--chunk-size"], ["--max-parallel-chunks"], ["--temperature"],
    ["--top-p"], ["--max-output-tokens"], ["--responses-create-param"],
    ["--num-repeats-add-seed"], ["--max-duration"], ["--fresh"], ["--retry-failure-class"],
    ["--dask-address"], ["--processes"], ["--dask-local-workers"], ["--slurm-jobs"], [],
]  # fmt: skip


def test_the_flags_are_the_ones_users_know_and_each_parameter_has_one() -> None:
    actions = collect_parser()._actions
    assert [a.option_strings for a in actions] == FLAGS
    flagged = {a.dest for a in actions if a.option_strings and a.dest in FIELDS}
    assert flagged == set(FIELDS) - {"responses_create_params"}  # it has --temperature & co.


def shown_default(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_each_flag_s_help_is_its_field_s_description_and_default() -> None:
    for a in collect_parser()._actions:
        if a.dest not in FIELDS or a.option_strings == ["--dask-local-workers"]:
            continue
        field = FIELDS[a.dest]
        assert a.help is not None and a.help.startswith(f"+{a.dest}: {field.description}")
        # not given, a flag is no parameter: the flow's default (the field's) applies
        assert a.default is None, a.dest
        default = field.get_default(call_default_factory=True)
        if field.is_required():
            assert "(required)" in a.help, a.dest
        elif default not in (None, [], {}, False):
            assert a.help.endswith(f"default: {shown_default(default)})"), a.dest
        else:
            assert "default:" not in a.help, a.dest


def test_flag_values_are_read_as_their_field_s_type() -> None:
    args = build_parser().parse_args(
        ["collect", "--input", "1.jsonl", "--output", "2", "--limit", "5", "--num-repeats", "2",
         "--num-samples-in-parallel", "auto", "--processes", "3", "--agent-name", "007",
         "--max-duration", "90", "--retry-failure-class", "timeout",
         "--retry-failure-class", "http_500", "--fresh"])  # fmt: skip
    params = collect_params(args)
    assert params == {
        "input_jsonl_fpath": "1.jsonl", "output_jsonl_fpath": "2", "limit": 5, "num_repeats": 2,
        "num_samples_in_parallel": "auto", "processes": 3, "agent_name": "007",
        "max_duration": "90", "retry_failure_classes": ["timeout", "http_500"], "fresh": True,
        "responses_create_params": {},
    }  # fmt: skip
    CollectConfig(**params)


def test_plus_keys_that_hold_text_stay_text() -> None:
    text = {"input_jsonl_fpath", "output_jsonl_fpath", "agent_name", "agent_url", "max_duration"}
    assert text == TEXT_KEYS


def test_cli_forms_build_a_valid_declaration() -> None:
    params = collect_params(build_parser().parse_args(
        ["collect", "--input", "a.jsonl", "--output", "b.jsonl", "--num-repeats-add-seed",
         "+limit=5", "--temperature", "0.3"]))  # fmt: skip
    assert CollectConfig(**params).num_repeats_add_seed is True


def test_the_docs_table_is_generated_from_the_declaration() -> None:
    page = DOC.read_text(encoding="utf-8")
    assert with_tables(page, render()) == page, (
        f"{DOC} is out of date: run `make docs` (python -m rollouts_cli.parameters_table --write)"
    )
    for name, field in FIELDS.items():
        assert f"`{name}`" in page or name == "responses_create_params"
        assert field.description is not None and field.description in page
