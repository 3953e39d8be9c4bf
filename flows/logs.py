"""Quiet logs: ckaflow's own flow and task lines at INFO; Dask, Prefect and web-server internals at
WARNING (INFO with `verbose`); each distinct warning once; tracebacks of failed runs only with `debug`
(the command line prints one message instead)."""

from __future__ import annotations

import logging
import os
import warnings

INTERNALS = ("distributed", "prefect", "prefect.server", "prefect.client", "prefect.extra", "uvicorn", "fastapi", "httpx", "httpcore", "alembic", "aiosqlite", "docket", "fakeredis")
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
DASK_LEVEL_ENV = "DASK_LOGGING__DISTRIBUTED"


class _NoTraceback(logging.Filter):
    """Drop the traceback of a record (the message stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def configure_logging(verbose: bool = False, debug: bool = False) -> None:
    """Set the levels above for this process and for the Dask worker processes it starts."""
    import dask
    import distributed  # noqa: F401  (its import sets its loggers' levels from the Dask config: set ours after)

    level = logging.INFO if verbose or debug else logging.WARNING
    level_name = logging.getLevelName(level).lower()
    os.environ[DASK_LEVEL_ENV] = level_name  # read by every worker process at start
    dask.config.set({"logging.distributed": level_name})
    for name in INTERNALS:
        logging.getLogger(name).setLevel(level)
    for name in RUN_LOGGERS:
        run_logger = logging.getLogger(name)
        run_logger.setLevel(logging.INFO)
        if not debug and not any(isinstance(f, _NoTraceback) for f in run_logger.filters):
            run_logger.addFilter(_NoTraceback())
    warnings.simplefilter("once")
    # capture anew: a showwarning restored behind logging's back (by a catch_warnings block, say) would
    # otherwise stay uncaptured, as logging only captures when it has not already
    logging.captureWarnings(False)
    logging.captureWarnings(True)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The logger of the running stage: Prefect's run logger inside a flow or task run, else `ckaflow`'s."""
    from flows.runner import in_prefect_run

    if in_prefect_run():
        from prefect import get_run_logger

        return get_run_logger()
    return logging.getLogger("ckaflow")
