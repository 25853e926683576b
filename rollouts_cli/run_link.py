"""The flow run's page in the Prefect UI, printed as the run starts when the command runs on a
Prefect server the user named; never for the command's own temporary API, which has no UI."""

from __future__ import annotations

import os
import sys
from typing import Any

# As the command started (this module is imported with it): later the command may point
# PREFECT_API_URL at its temporary API.
_USER_API_URL = os.environ.get("PREFECT_API_URL", "").strip() or None


def user_server_api_url() -> str | None:
    """The API URL of the Prefect server the user named in PREFECT_API_URL when the command
    started, or None: none named, or the temporary API of an earlier command of this process
    (a program calling `main()` twice)."""
    from rollouts.settings import TEMPORARY_API_ENV  # here: not before the API's launch

    if _USER_API_URL is None or os.environ.get(TEMPORARY_API_ENV) == _USER_API_URL:
        return None
    return _USER_API_URL


def with_run_link(flow: Any) -> Any:
    """``flow``, printing its run's page in the UI on stderr once it is running, when the
    command runs on the user's server; else ``flow`` itself."""
    if user_server_api_url() is None:
        return flow
    return flow.with_options(on_running=[*flow.on_running_hooks, _print_run_link])


def _print_run_link(flow: Any, flow_run: Any, state: Any) -> None:
    from prefect.utilities.urls import url_for

    url = url_for(flow_run)  # PREFECT_UI_URL, else derived from PREFECT_API_URL
    if url:
        print(f"Prefect UI: {url}", file=sys.stderr, flush=True)
