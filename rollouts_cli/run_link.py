"""The flow run's page in the Prefect UI, printed as the run starts when the command runs on a
Prefect server (named by PREFECT_API_URL, a Prefect profile or a settings file); never for the
command's own temporary API, which has no UI."""

from __future__ import annotations

import os
import sys
from typing import Any


def user_server_api_url() -> str | None:
    """The API URL of the Prefect server this command uses, or None when it uses its own
    temporary API. After `temporary_api.attach()`, which settles which one it is."""
    from prefect.settings import get_current_settings

    from rollouts.settings import TEMPORARY_API_ENV

    url = get_current_settings().api.url
    if not url or url == os.environ.get(TEMPORARY_API_ENV):
        return None
    return url


def with_run_link(flow: Any) -> Any:
    """``flow``, printing its run's page in the UI on stderr once it is running, when the
    command runs on a server; else ``flow`` itself."""
    if user_server_api_url() is None:
        return flow
    return flow.with_options(on_running=[*flow.on_running_hooks, _print_run_link])


def _print_run_link(flow: Any, flow_run: Any, state: Any) -> None:
    from prefect.utilities.urls import url_for

    url = url_for(flow_run)  # PREFECT_UI_URL, else derived from PREFECT_API_URL
    if url:
        print(f"Prefect UI: {url}", file=sys.stderr, flush=True)
