"""Retry by failure class inside the `collect-rollouts` flow (rollouts/retry.py does the work):
reopen the chosen failures before collecting, forget the reopening once collected."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prefect import get_run_logger

from rollouts.models import CollectConfig, SplitResult
from rollouts.retry import clear_retry, reopen_failures


async def reopen_for_retry(config: CollectConfig, split: SplitResult, run_dir: Path) -> None:
    """With retry_failure_classes: move the matching failures back to "to collect" (under
    the run's lock, after split), and say how many of each class."""
    if not config.retry_failure_classes:
        return
    report = await asyncio.to_thread(
        reopen_failures, run_dir, split.chunks, config.num_repeats, config.retry_failure_classes
    )
    get_run_logger().info("%s", report.describe())


async def finish_retry(config: CollectConfig, split: SplitResult, run_dir: Path) -> None:
    """After a retry's collection (not after a stop: a rerun of the retry carries its keys)."""
    if config.retry_failure_classes:
        await asyncio.to_thread(clear_retry, run_dir, split.chunks)
