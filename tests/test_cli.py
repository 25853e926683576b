"""The command line: NeMo Gym's `+key=value` form and flags mean the same flow parameters."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from conftest import read_jsonl, write_jsonl

from rollouts_cli.main import UsageError, build_parser, collect_params


def params_of(*argv: str) -> dict:
    return collect_params(build_parser().parse_args(["collect", *argv]))


def test_plus_form_and_flag_form_give_the_same_flow_parameters() -> None:
    plus = params_of(
        "+agent_name=my_agent", "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl",
        "+limit=10000", "+num_repeats=2", "+num_samples_in_parallel=64",
        "+responses_create_params.temperature=0.2",
    )  # fmt: skip
    flags = params_of(
        "--agent-name", "my_agent", "--input", "in.jsonl", "--output", "out.jsonl",
        "--limit", "10000", "--num-repeats", "2", "--num-samples-in-parallel", "64",
        "--temperature", "0.2",
    )  # fmt: skip
    assert plus == flags == {
        "agent_name": "my_agent", "input_jsonl_fpath": "in.jsonl",
        "output_jsonl_fpath": "out.jsonl", "limit": 10000, "num_repeats": 2,
        "num_samples_in_parallel": 64, "responses_create_params": {"temperature": 0.2},
    }  # fmt: skip


def test_plus_values_parse_like_hydra_and_paths_stay_strings() -> None:
    p = params_of("+input_jsonl_fpath=123", "+output_jsonl_fpath=o.jsonl", "+agent_url=http://h:1",
                  "+fresh=true", "+responses_create_params.max_output_tokens=512",
                  "+responses_create_params.metadata={a: b}")  # fmt: skip
    assert p["input_jsonl_fpath"] == "123" and p["fresh"] is True
    assert p["responses_create_params"] == {"max_output_tokens": 512, "metadata": {"a": "b"}}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["+input_jsonl_fpath=a", "+output_jsonl_fpath=b", "+nope=1"], "unknown argument +nope"),
        (["+input_jsonl_fpath=a"], "missing --output"),
        (["+input_jsonl_fpath=a", "+output_jsonl_fpath=b", "+limit=3", "--limit", "4"],
         "given twice"),
    ],
)  # fmt: skip
def test_unknown_missing_or_contradictory_arguments_are_usage_errors(
    argv: list[str], message: str
) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        params_of(*argv)


def test_mix_command_writes_exact_counts_and_a_manifest(tmp_path: Path) -> None:
    rows = [{"_ng_task_index": i, "_ng_rollout_index": 0, "reward": 1.0} for i in range(50)]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", rows)
    out = tmp_path / "mixed.jsonl"
    res = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "mix", "--source", f"x={a}:0.7",
         "--source", f"y={b}:0.3", "--total", "40", "--seed", "3", "--output", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    sources = [r["_mix_source"] for r in read_jsonl(out)]
    assert sources.count("x") == 28 and sources.count("y") == 12
    manifest = orjson.loads((tmp_path / "mixed_manifest.json").read_bytes())
    assert manifest["seed"] == 3 and manifest["sources"]["x"]["selected"] == 28

    short = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "mix", "--source", f"x={a}:0.5",
         "--source", f"y={b}:0.5", "--total", "400", "--output", str(tmp_path / "m2.jsonl")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert short.returncode == 2 and "50 available, 200 needed" in short.stderr
