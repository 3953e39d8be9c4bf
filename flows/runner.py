"""Two runners, one set of stages: inside a Prefect flow run a stage is a subflow and each unit of work a
Prefect task (tracked, retried on transient errors); outside one (`ckaflow.compare`, in-process) the same
functions are called directly, with the same retry rule. Prefect is imported only by the Prefect runner."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flows.errors import is_transient, retry_transient
from flows.stages import RunContext, Stage


def in_prefect_run() -> bool:
    """Whether this code runs inside a Prefect flow run."""
    if "prefect" not in sys.modules:
        return False
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


def _retried(fn: Callable[..., Any], retries: int, delay: float) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as error:
                if attempt == retries or not is_transient(error):
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")

    return call


def _as_task(name: str, fn: Callable[..., Any], retries: int, delay: float) -> Any:
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(fn, name=name, retries=retries, retry_delay_seconds=delay, cache_policy=NO_CACHE,
                retry_condition_fn=retry_transient)


def unit(name: str, fn: Callable[..., Any], *args: Any, retries: int = 1, delay: float = 10, **kwargs: Any) -> Any:
    """Run `fn(*args, **kwargs)` as one unit of work named `name`, retried `retries` times on transient errors."""
    if in_prefect_run():
        return _as_task(name, fn, retries, delay)(*args, **kwargs)
    return _retried(fn, retries, delay)(*args, **kwargs)


def units(name: str, fn: Callable[..., Any], calls: Sequence[tuple[tuple, dict]], *, retries: int = 1,
          delay: float = 10) -> list[Any]:
    """`unit` for several calls at once (concurrently); their results in order."""
    if in_prefect_run():
        task = _as_task(name, fn, retries, delay)
        return [future.result() for future in [task.submit(*args, **kwargs) for args, kwargs in calls]]
    call = _retried(fn, retries, delay)
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        return list(pool.map(lambda c: call(*c[0], **c[1]), calls))


def run_in_process(stage: Stage, context: RunContext) -> Any:
    """The stage called directly."""
    return stage.run(context)


def run_as_flow(stage: Stage, context: RunContext) -> Any:
    """The stage as a Prefect subflow named `ckaflow-<stage>`."""
    from prefect import flow

    return flow(stage.run, name=f"ckaflow-{stage.name}", validate_parameters=False)(context)
