"""Quiet logs: ckaflow's own flow and task lines at INFO; Dask, Prefect and web-server internals at
WARNING (INFO with `verbose`), Prefect's state transitions of runs that went well too; each distinct
warning once, as one line without its source line; tracebacks of failed runs only with `debug` (the
command line prints one message instead). The command line and `ckaflow.compare` set it up alike."""

from __future__ import annotations

import logging
import os
import warnings

INTERNALS = ("distributed", "prefect", "prefect.server", "prefect.client", "prefect.extra", "uvicorn", "fastapi", "httpx", "httpcore", "alembic", "aiosqlite", "docket", "fakeredis")
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
DASK_LEVEL_ENV = "DASK_LOGGING__DISTRIBUTED"


# Prefect's lines about a run's life that say nothing when it goes well (failures are logged at ERROR)
TRANSITIONS = ("Finished in state Completed", "Beginning flow run", "Beginning subflow run", "View at ",
               "Created task run", "Executing '")


class _NoTransitions(logging.Filter):
    """Drop Prefect's INFO lines about a run's state changes (`TRANSITIONS`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not record.getMessage().startswith(TRANSITIONS)


class _OncePerText:
    """`warnings.showwarning` that logs each distinct (category, text) once to `py.warnings`, as one line:
    `Category: text` (no file, line number or source line)."""

    def __init__(self) -> None:
        self.seen: set[tuple[type, str]] = set()

    def __call__(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: object = None, line: str | None = None) -> None:
        key = (category, str(message))
        if key not in self.seen:
            self.seen.add(key)
            logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)


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
        run_logger.filters[:] = [f for f in run_logger.filters if not isinstance(f, (_NoTraceback, _NoTransitions))]
        if not debug:
            run_logger.addFilter(_NoTraceback())
        if not verbose and not debug:
            run_logger.addFilter(_NoTransitions())
    warnings.simplefilter("once")
    warnings.showwarning = _OncePerText()
    own = logging.getLogger("ckaflow")
    if not own.handlers and not logging.getLogger().handlers:  # in-process runs (no Prefect handler): ours
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(message)s", "%H:%M:%S"))
        own.addHandler(handler)
        own.setLevel(logging.INFO)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The logger of the running stage: Prefect's run logger inside a flow or task run, else `ckaflow`'s."""
    from flows.runner import in_prefect_run

    if in_prefect_run():
        from prefect import get_run_logger

        return get_run_logger()
    return logging.getLogger("ckaflow")
