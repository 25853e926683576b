"""The `rollouts` command.

`rollouts collect` takes NeMo Gym's `+key=value` arguments (so `ng_collect_rollouts` command
lines keep working) and ordinary flags with the same meaning, then runs the `collect-rollouts`
flow in this process: against the Prefect server that PREFECT_API_URL names (the run shows in
its UI), else an ephemeral one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, get_args

import yaml

from rollouts.errors import ExitCode, RolloutsError, validation_message
from rollouts.models import CollectConfig, MixConfig, count_or_auto
from rollouts_cli import run_link
from rollouts_cli.parameter_flags import TEXT_KEYS, add_parameter_flag

if TYPE_CHECKING:
    from rollouts.request import RunRequest

RCP_PREFIX = "responses_create_params."
# Flags for the most used overrides: `--temperature 0.2` = +responses_create_params.temperature=0.2
RCP_FLAGS: dict[str, type] = {"temperature": float, "top_p": float, "max_output_tokens": int}
# `+key` of ng_collect_rollouts -> flow parameter: the fields of the one declaration.
PLUS_KEYS = frozenset(CollectConfig.model_fields) - {"responses_create_params"}


class UsageError(Exception):
    pass


def parse_plus_args(tokens: list[str]) -> dict[str, Any]:
    """`+a=1 +responses_create_params.temperature=0.2` -> flow parameters (Hydra-style values)."""
    params: dict[str, Any] = {}
    for token in tokens:
        body = token.lstrip("+")
        if "=" not in body:
            raise UsageError(f"{token!r}: expected +key=value")
        key, raw = body.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if key in TEXT_KEYS:
            value = raw  # paths and names stay strings even when they look like numbers
        if key.startswith(RCP_PREFIX):
            params.setdefault("responses_create_params", {})[key[len(RCP_PREFIX) :]] = value
        elif key in PLUS_KEYS:
            params[key] = value
        else:
            known = ", ".join(sorted(f"+{k}" for k in PLUS_KEYS))
            raise UsageError(f"unknown argument +{key}; known: {known}, +{RCP_PREFIX}<param>")
    return params


def _parse_kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    k, v = text.split("=", 1)
    return k, yaml.safe_load(v)


def _output_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose", "-v", action="store_true",
        help="show Prefect's own log lines and full tracebacks (also: ROLLOUTS_VERBOSE=1)",
    )  # fmt: skip
    return common


def _add_collect_parser(sub: Any) -> None:
    p = sub.add_parser(
        "collect",
        parents=[_output_options()],
        help="collect rollouts of one dataset (resumable; NeMo Gym +key=value accepted)",
        description="Collect rollouts. Every flag has a NeMo Gym form: --input = "
        "+input_jsonl_fpath=, --temperature 0.2 = +responses_create_params.temperature=0.2, ...",
    )
    # The parameters' flags come from their fields (rollouts_cli/parameter_flags.py); this
    # says only their order in --help, among the flags that are not parameters.
    for name in ("agent_name", "agent_url", "input_jsonl_fpath", "output_jsonl_fpath", "limit",
                 "num_repeats", "num_samples_in_parallel", "max_in_flight", "chunk_size",
                 "max_parallel_chunks"):  # fmt: skip
        add_parameter_flag(p, name)
    for key, value_type in RCP_FLAGS.items():
        p.add_argument("--" + key.replace("_", "-"), type=value_type, help=f"+{RCP_PREFIX}{key}")
    p.add_argument(
        "--responses-create-param", dest="rcp", action="append", type=_parse_kv, default=[],
        metavar="KEY=VALUE", help="any other +responses_create_params.KEY=VALUE (repeatable)",
    )  # fmt: skip
    for name in ("num_repeats_add_seed", "max_duration", "fresh", "retry_failure_classes"):
        add_parameter_flag(p, name)
    p.add_argument(
        "--dask-address", help="run chunks on this Dask scheduler (tcp://host:8786); needs [dask]"
    )
    add_parameter_flag(p, "processes")
    p.add_argument(
        "--dask-local-workers",
        dest="processes",
        type=count_or_auto,
        help="the older spelling of --processes",
    )
    add_parameter_flag(p, "slurm_jobs")
    # argparse has no public list of a parser's actions; `_actions` has held them since
    # Python 2.7, and test_parameters fails (the flags' check) if it ever moves.
    flagged = {a.dest for a in p._actions}
    for name in CollectConfig.model_fields:  # a parameter not placed above: its flag, last
        if name in PLUS_KEYS and name not in flagged:
            add_parameter_flag(p, name)
    p.add_argument("plus", nargs="*", metavar="+key=value", help="NeMo Gym-style arguments")
    p.set_defaults(func=cmd_collect)


def collect_params(args: argparse.Namespace) -> dict[str, Any]:
    """Flow parameters from flags and `+key=value`s; the same thing said twice is an error."""
    params = parse_plus_args(args.plus)
    flags: dict[str, Any] = {
        k: getattr(args, k) for k in PLUS_KEYS if getattr(args, k, None) is not None
    }
    rcp_flags = {k: getattr(args, k) for k in RCP_FLAGS if getattr(args, k) is not None}
    rcp_flags.update(dict(args.rcp))
    for k, v in flags.items():
        if k in params and params[k] != v:
            raise UsageError(f"{k} given twice with different values: {params[k]!r} and {v!r}")
        params[k] = v
    rcp = params.setdefault("responses_create_params", {})
    for k, v in rcp_flags.items():
        if k in rcp and rcp[k] != v:
            raise UsageError(f"responses_create_params.{k} given twice: {rcp[k]!r} and {v!r}")
        rcp[k] = v
    for required, flag in (("input_jsonl_fpath", "--input"), ("output_jsonl_fpath", "--output")):
        if not params.get(required):
            raise UsageError(f"missing {flag} (or +{required}=...)")
    return params


@contextlib.contextmanager
def prefect_result_storage() -> Iterator[None]:
    """Apply ROLLOUTS_RESULT_STORAGE to Prefect (its result store is fixed when a flow starts)."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from rollouts.settings import RolloutsSettings

    storage = RolloutsSettings().result_storage
    if storage is None:
        yield
        return
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(storage)}):
        yield


def cmd_collect(args: argparse.Namespace) -> int:
    from rollouts.request import check_request

    params = collect_params(args)
    # Where chunks run is infrastructure, not a result-changing parameter: a setting.
    if args.dask_address:
        os.environ["ROLLOUTS_DASK_ADDRESS"] = args.dask_address
    try:
        request = check_request(params)  # before Prefect starts; the flow takes it as checked
    except RolloutsError as e:
        return _refused("collect", e)
    return run_collect_flow("collect", request)


def _refused(command: str, error: RolloutsError) -> int:
    """A request refused before any work: its message, and its exit status."""
    print(f"rollouts {command}: {error}", file=sys.stderr)
    return error.exit_code


def run_collect_flow(command: str, request: RunRequest) -> int:
    """Run the collect-rollouts flow here, with a progress bar; print its summary; the exit
    status says what to do next."""
    from rollouts.request import check_agent_first, checked_before_the_flow
    from rollouts.settings import RolloutsSettings

    try:
        # An unknown or unreachable run-level agent is refused in about a second, before
        # Prefect starts (its temporary API alone takes seconds).
        request = asyncio.run(check_agent_first(request, RolloutsSettings()))
    except RolloutsError as e:
        return _refused(command, e)
    for line in request.agents_down or ():
        print(f"rollouts {command}: {line}; collecting from the other replicas", file=sys.stderr)
    from flows.collect import CollectSummary, collect_rollouts
    from rollouts.summary import STOPPED_AT_DEADLINE
    from rollouts_cli.progress import cli_progress_bar
    from rollouts_cli.report import print_summary

    output = request.params["output_jsonl_fpath"]
    with cli_progress_bar(output, RolloutsSettings().work_dir), checked_before_the_flow(request):
        state = _run_flow_state(collect_rollouts, request.params)
    if not state.is_completed():
        return _exit_for_failed(command, state)
    summary = state.result()
    assert isinstance(summary, CollectSummary)
    print_summary(summary)
    if state.name == STOPPED_AT_DEADLINE:
        print(f"rollouts {command}: {state.message}", file=sys.stderr)
        return ExitCode.DEADLINE
    return ExitCode.OK


def _run_flow_state(flow: Any, params: dict[str, Any]) -> Any:
    from rollouts.logs import console_reports_failures_once
    from rollouts.run_state import started_from
    from rollouts_cli import temporary_api

    try:
        temporary_api.attach()
    except temporary_api.TemporaryApiError as e:
        raise UsageError(str(e)) from None
    console_reports_failures_once()  # Prefect's logging is set up by now
    with prefect_result_storage(), started_from("command line"):
        state = asyncio.run(run_link.with_run_link(flow)(**params, return_state=True))
    return state


def _exit_for_failed(command: str, state: Any) -> int:
    """Bad input, parameters or settings are the caller's to fix (2); an incomplete run, an
    agent down or a crash are fixed by rerunning (1). Each error class says which."""
    error = state.result(raise_on_failure=False)
    print(f"rollouts {command}: {state.message or error}", file=sys.stderr)
    if isinstance(error, RolloutsError):
        return error.exit_code
    return ExitCode.INCOMPLETE


def check_prefect_api() -> None:
    """Empty PREFECT_API_URL means none; a URL where no server answers is refused in one line
    (Prefect would fail after seconds with a traceback, or half-start with ERROR lines)."""
    url = os.environ.get("PREFECT_API_URL")
    if url is None:
        return
    if not url.strip():
        del os.environ["PREFECT_API_URL"]
        return
    import httpx

    try:
        # Any answer will do (a hosted API may want a key for /health): only no answer at all
        # is refused.
        httpx.get(url.rstrip("/") + "/health", timeout=5.0)
    except httpx.TransportError as e:
        cause = "connection refused" if isinstance(e, httpx.ConnectError) else type(e).__name__
        raise UsageError(
            f"no Prefect server answers at PREFECT_API_URL={url} ({cause}). Start it "
            "(`make server`), or unset PREFECT_API_URL to run with a temporary local API."
        ) from None


def load_multi_config(path: str) -> Any:
    from pydantic import ValidationError

    from rollouts.models import MultiDatasetConfig

    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise UsageError(f"config {path} not found") from None
    except yaml.YAMLError as e:
        raise UsageError(f"config {path} is not valid YAML: {e}") from None
    try:
        return MultiDatasetConfig.model_validate(raw)
    except ValidationError as e:
        message = validation_message(e, top="(top level)", path=_named_datasets(raw))
        raise UsageError(f"config {path}: {message}") from None


def _named_datasets(raw: Any) -> Callable[[tuple[int | str, ...]], str]:
    """A field's path in a multi-dataset config with each dataset named as the config names
    it: `datasets.1 (hard).responses_create_params`."""
    datasets = raw.get("datasets") if isinstance(raw, dict) else None

    def path(loc: tuple[int | str, ...]) -> str:
        parts = [str(p) for p in loc]
        if len(loc) > 1 and loc[0] == "datasets" and isinstance(loc[1], int):
            i = loc[1]
            entry = datasets[i] if isinstance(datasets, list) and i < len(datasets) else None
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                parts[1] += f" ({entry['name']})"
        return ".".join(parts)

    return path


def cmd_multi(args: argparse.Namespace) -> int:
    config = load_multi_config(args.config)
    from rollouts.request import check_multi_storage

    try:
        check_multi_storage(config)  # before Prefect starts, as collect's check_request
    except RolloutsError as e:
        return _refused("multi", e)
    from flows.multi import collect_multi_dataset
    from rollouts.settings import RolloutsSettings
    from rollouts_cli.progress import cli_multi_progress
    from rollouts_cli.report import print_multi_summary

    outputs = {d.name: d.output for d in config.datasets}
    mix = None if config.mix is None else (config.mix.output, config.mix.total)
    with cli_multi_progress(outputs, mix, RolloutsSettings().work_dir):
        state = _run_flow_state(collect_multi_dataset, {"config": config})
    if not state.is_completed():
        return _exit_for_failed("multi", state)
    print_multi_summary(state.result())
    return ExitCode.OK


def _parse_source(text: str) -> tuple[str, str, float]:
    name, sep, rest = text.partition("=")
    path, sep2, prop = rest.rpartition(":")
    if not (sep and sep2 and name and path):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH:PROPORTION")
    try:
        return name, path, float(prop)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: proportion {prop!r} is not a number") from None


def cmd_mix(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from rollouts.mix import MixRequest, MixSource, mix_sources

    try:
        request = MixRequest(
            sources=[MixSource(name=n, path=p, proportion=w) for n, p, w in args.source],
            output=args.output,
            total=args.total,
            seed=args.seed,
            keep_groups=args.keep_groups,
            shortfall=args.shortfall,
        )
    except ValidationError as e:
        raise UsageError(validation_message(e, top="mix")) from None
    try:
        result = mix_sources(request)
    except RolloutsError as e:
        print(f"rollouts mix: {e}", file=sys.stderr)
        return ExitCode.USAGE
    for name, s in result.per_source.items():
        print(f"{name}: {s.selected} selected (target {s.target}, {s.available} available, "
              f"shortfall {s.shortfall}, {s.deviation_from_quota:+d} vs quota"
              + (f": {s.note})" if s.note else ")"))  # fmt: skip
    print(f"{result.rows} rows -> {result.output}\nmanifest: {result.manifest}")
    if result.note:
        print(f"mix: {result.note}")
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    import orjson

    from rollouts.settings import RolloutsSettings
    from rollouts.status import read_status
    from rollouts_cli.report import print_status

    if args.watch:
        from rollouts_cli.watch import watch_status

        return watch_status(args.output, RolloutsSettings().work_dir, args.interval, args.json)
    status = read_status(args.output, RolloutsSettings().work_dir, sample_s=args.sample_s)
    if args.json:
        sys.stdout.write(orjson.dumps(status.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print_status(status)
    return ExitCode.OK if status.phase != "not started" else ExitCode.USAGE


def cmd_failures(args: argparse.Namespace) -> int:
    import orjson

    from rollouts.failures import summarize_failures
    from rollouts_cli.triage import print_failures

    try:
        report = summarize_failures(args.output, examples=args.examples)
    except RolloutsError as e:
        return _refused("failures", e)
    if args.json:
        sys.stdout.write(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print_failures(report)
    return ExitCode.OK


def retry_params(output: str, classes: list[str]) -> dict[str, Any]:
    """The flow parameters of a retry: the run's own (run.json), and the classes. Refused,
    before Prefect starts, while a collection holds the output."""
    from rollouts.errors import RunLocked
    from rollouts.run_state import lock_taken_by, read_run_state, run_dir_for
    from rollouts.settings import RolloutsSettings

    run_dir = run_dir_for(output, RolloutsSettings().work_dir)
    holder = lock_taken_by(run_dir)
    if holder is not None:
        raise RunLocked(
            f"{output} is being collected by {holder} right now; retry once it has ended "
            "(a retry and a collection never write one output together)"
        )
    state = read_run_state(run_dir)
    if state is None:
        raise UsageError(f"no collection state for {output} (looked in {run_dir}): "
                         "give the --output of a collection, with the same ROLLOUTS_WORK_DIR")  # fmt: skip
    if state.params is None:
        raise UsageError(
            f"the run state of {output} ({run_dir}) predates stored parameters: rerun its "
            "`rollouts collect` command once (it records them, sending only what is missing), "
            "or add --retry-failure-class to that command"
        )
    return {**state.params, "retry_failure_classes": classes}


def cmd_retry(args: argparse.Namespace) -> int:
    from rollouts.request import check_request

    try:
        request = check_request(retry_params(args.output, args.failure_classes))
    except RolloutsError as e:
        return _refused("retry", e)
    print_retry_plan(args.output, args.failure_classes)
    code = run_collect_flow("retry", request)
    if code == ExitCode.INCOMPLETE:
        print(f"rollouts retry: `rollouts failures {args.output}` shows what is still missing "
              "by class; a retry of those classes, or the run's own collect command, sends "
              "them again", file=sys.stderr)  # fmt: skip
    return code


def print_retry_plan(output: str, classes: list[str]) -> None:
    """What the merged failures file says the retry will send (the flow, which reads the
    chunks' own files, logs the exact count)."""
    from rollouts.failures import summarize_failures

    try:
        report = summarize_failures(output, examples=0)
    except RolloutsError:
        return  # nothing merged yet: the flow finds what to retry in the chunks
    counts = [f"{c} ({report.classes[c].count})" for c in classes if c in report.classes]
    total = sum(report.classes[c].count for c in classes if c in report.classes)
    print(f"rollouts retry: {report.failures_path} lists {total} rollouts failed with "
          f"{', '.join(classes)}" + (f": {', '.join(counts)}; sending them again" if total else ""))  # fmt: skip


def cmd_serve_agent(args: argparse.Namespace) -> int:
    from reference_agent.server import serve_agent_from_args

    serve_agent_from_args(args)
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    from reference_agent.args import add_serve_agent_arguments

    parser = argparse.ArgumentParser(
        prog="rollouts", description="Resumable rollout collection for NeMo Gym agents."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_collect_parser(sub)
    multi = sub.add_parser(
        "multi",
        help="collect several datasets (own temperature, repeats) and mix them",
        parents=[_output_options()],
    )
    multi.add_argument("--config", required=True, help="YAML: datasets + mix (see examples/)")
    multi.set_defaults(func=cmd_multi)

    mix = sub.add_parser("mix", help="mix rollout files by exact target proportions")
    mix.add_argument(
        "--source", action="append", type=_parse_source, required=True,
        metavar="NAME=PATH:PROPORTION", help="a source (repeat for each)",
    )  # fmt: skip
    # The mix's own settings: defaults, choices and wording from MixConfig, declared once.
    mix_field = MixConfig.model_fields
    mix.add_argument("--total", type=int, required=True, help=mix_field["total"].description)
    mix.add_argument("--seed", type=int, default=mix_field["seed"].default,
                     help=f"{mix_field['seed'].description} (default: %(default)s)")  # fmt: skip
    mix.add_argument("--output", required=True, help=mix_field["output"].description)
    mix.add_argument(
        "--keep-groups", action=argparse.BooleanOptionalAction, default=None,
        help=mix_field["keep_groups"].description,
    )  # fmt: skip
    mix.add_argument(
        "--shortfall", choices=get_args(mix_field["shortfall"].annotation),
        default=mix_field["shortfall"].default,
        help=f"{mix_field['shortfall'].description} (default: %(default)s)",
    )  # fmt: skip
    mix.set_defaults(func=cmd_mix)

    status = sub.add_parser(
        "status", help="progress of a collection (also while it runs, from another terminal)"
    )
    status.add_argument("output", help="the output file of the collection")
    status.add_argument(
        "--json", action="store_true",
        help="machine-readable (with --watch: one JSON line per reading)",
    )  # fmt: skip
    status.add_argument(
        "--watch", action="store_true",
        help="redraw it in place every --interval seconds until Ctrl-C",
    )  # fmt: skip
    status.add_argument(
        "--interval", type=float, default=2.0, help="seconds between redraws of --watch (2)"
    )
    status.add_argument(
        "--sample-s", type=float, default=1.0,
        help="seconds between two readings, for the rate and ETA (0: no rate)",
    )  # fmt: skip
    status.set_defaults(func=cmd_status)

    _add_triage_parsers(sub)
    serve = sub.add_parser(
        "serve-agent",
        help="run the reference agent SIMULATOR (arithmetic tasks) for demos, tests, benchmarks",
    )
    add_serve_agent_arguments(serve)
    serve.set_defaults(func=cmd_serve_agent)
    return parser


def _add_triage_parsers(sub: Any) -> None:
    failures = sub.add_parser(
        "failures", help="what failed in a collection: counts by class and agent, first errors"
    )
    failures.add_argument("output", help="the output file of the collection")
    failures.add_argument("--json", action="store_true", help="machine-readable")
    failures.add_argument(
        "--examples", type=int, default=5, help="keys shown per class (default: %(default)s)"
    )
    failures.set_defaults(func=cmd_failures)
    retry = sub.add_parser(
        "retry", parents=[_output_options()],
        help="send again the rollouts that failed with given classes, with the run's own "
        "parameters, and merge",
    )  # fmt: skip
    retry.add_argument("output", help="the output file of the collection")
    retry.add_argument(
        "--failure-class", dest="failure_classes", action="append", required=True,
        metavar="CLASS", help="a failure class to retry, e.g. timeout (repeatable)",
    )  # fmt: skip
    retry.set_defaults(func=cmd_retry)


def _console_settings(verbose: bool) -> None:
    """Before Prefect is imported: it reads these when it sets up logging."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")  # offline machines: no telemetry, no notice
    if verbose:
        os.environ["ROLLOUTS_VERBOSE"] = "1"
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "INFO")
    elif "PREFECT_LOGGING_LEVEL" not in os.environ:
        # The command prints its own progress and summary; Prefect's per-task lines would
        # bury them. Everything still reaches the Prefect API (and its UI) at INFO.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _console_settings(getattr(args, "verbose", False))
    try:
        if args.command in ("collect", "multi", "retry"):
            check_prefect_api()
            from rollouts_cli import temporary_api

            # First thing: the server's start then overlaps everything else the command does.
            temporary_api.launch_unless_configured()
        return int(args.func(args))
    except UsageError as e:
        print(f"rollouts {args.command}: {e}", file=sys.stderr)
        return ExitCode.USAGE
    except RolloutsError as e:  # e.g. a setting refused where a command first reads them
        return _refused(args.command, e)


if __name__ == "__main__":
    sys.exit(main())
