"""What a run prints when nothing goes wrong: no Prefect state transitions, one line per warning, and each
progress count's last line once."""

from __future__ import annotations

import logging
import warnings

import pytest

from flows.logs import RUN_LOGGERS, configure_logging
from flows.progress import ProgressLog
from tasks.cka import DegenerateSiteWarning


@pytest.fixture
def run_loggers():
    loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
    saved = [(logger.level, list(logger.filters)) for logger in loggers]
    yield loggers
    for logger, (level, filters) in zip(loggers, saved, strict=True):
        logger.setLevel(level)
        logger.filters[:] = filters


def record(logger: logging.Logger, level: int, text: str) -> logging.LogRecord:
    return logger.makeRecord(logger.name, level, __file__, 1, text, (), None)


def test_state_transitions_are_dropped_unless_verbose_and_failures_are_kept(run_loggers):
    flow_runs = run_loggers[0]
    configure_logging()
    assert not flow_runs.filter(record(flow_runs, logging.INFO, "Finished in state Completed()"))
    assert not flow_runs.filter(record(flow_runs, logging.INFO, "Beginning subflow run 'x' for flow 'ckaflow-sample'"))
    assert flow_runs.filter(record(flow_runs, logging.INFO, "sampled 40 rows (40 images x 1 views) from digits"))
    assert flow_runs.filter(record(flow_runs, logging.ERROR, "Finished in state Failed('boom')"))
    configure_logging(verbose=True)
    assert flow_runs.filter(record(flow_runs, logging.INFO, "Finished in state Completed()"))


def test_a_warning_is_one_line_without_its_source_once(caplog):
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="py.warnings"):
        configure_logging()
        for _ in range(3):
            warnings.warn("CKA is NaN for 1 site(s): m/layer1.0/bn2: constant", DegenerateSiteWarning, stacklevel=1)
    assert [r.getMessage() for r in caplog.records] == [
        "DegenerateSiteWarning: CKA is NaN for 1 site(s): m/layer1.0/bn2: constant"]


def test_the_last_progress_line_is_printed_once():
    lines: list[str] = []
    now = [0.0]
    log = ProgressLog("extract a", 10, "images", every=1.0, log=lines.append, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 0.6
        log.advance(1)
    log.close()
    assert sum("10/10" in line for line in lines) == 1 and lines[-1].endswith("s") and "in 6.0 s" in lines[-1]
    assert len(lines) == 5  # every second (4 of them before the end), then the closing line
