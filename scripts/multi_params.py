"""Print a multi-dataset config (YAML, as `rollouts multi --config` takes) as the `--params` of
a `collect-multi-dataset` deployment run, with every output (each dataset's and the mix's)
moved into OUTPUT_DIR under its own file name:

    prefect deployment run collect-multi-dataset/local --watch \\
        --params "$(python scripts/multi_params.py examples/mix.yaml out/deployed/mix-yaml)"

An output keeps the parameters it was collected with and answers a rerun from its cache, so a
run of someone else's outputs (`make demo`'s, the deployment's defaults) would either be
refused or do nothing. The config is checked as the server will check it; a bad one is one
message and exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import PurePosixPath
from typing import Any

import orjson
import yaml
from pydantic import ValidationError

from rollouts.errors import validation_message
from rollouts.models import MultiDatasetConfig


def deployment_params(config: Any, output_dir: str) -> dict[str, Any]:
    """``{"config": config}`` with each ``output`` moved into ``output_dir`` (the rest as
    written). Raises pydantic's ValidationError for a config the flow would refuse."""
    MultiDatasetConfig.model_validate(config)
    for part in [*config["datasets"], *([config["mix"]] if config.get("mix") else [])]:
        part["output"] = str(PurePosixPath(output_dir) / PurePosixPath(part["output"]).name)
    return {"config": config}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python scripts/multi_params.py CONFIG.yaml OUTPUT_DIR", file=sys.stderr)
        return 2
    path, output_dir = argv
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        params = deployment_params(config, output_dir)
    except (OSError, yaml.YAMLError) as e:
        print(f"multi_params: {path}: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"multi_params: {path}: {validation_message(e, top='(top level)')}", file=sys.stderr)
        return 2
    print(orjson.dumps(params).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
