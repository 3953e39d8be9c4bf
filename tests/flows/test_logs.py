"""Quiet logs: Dask's INFO hidden (here and in the worker processes it starts), each warning once."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

from flows.logs import DASK_LEVEL_ENV, INTERNALS, RUN_LOGGERS, configure_logging
from tasks.cka import DegenerateSiteWarning


@pytest.fixture
def restored_logging():
    """Put the levels and filters configure_logging changes back afterwards."""
    loggers = [logging.getLogger(name) for name in INTERNALS + RUN_LOGGERS]
    saved = [(logger.level, list(logger.filters)) for logger in loggers]
    yield
    logging.captureWarnings(False)
    for logger, (level, filters) in zip(loggers, saved, strict=True):
        logger.setLevel(level)
        logger.filters[:] = filters


def test_dask_internals_at_warning_and_each_warning_once(caplog, monkeypatch, restored_logging):
    monkeypatch.setenv(DASK_LEVEL_ENV, "error")  # restored afterwards
    with warnings.catch_warnings():
        configure_logging()
        assert logging.getLogger("distributed.scheduler").getEffectiveLevel() == logging.WARNING
        assert os.environ[DASK_LEVEL_ENV] == "warning"
        with caplog.at_level(logging.WARNING, logger="py.warnings"):
            for _matrix in range(3):  # the same degenerate site, met by three matrices
                warnings.warn("CKA is NaN for 1 site(s): m/layer1.0/bn2: constant", DegenerateSiteWarning, stacklevel=1)
            warnings.warn("CKA is NaN for 1 site(s): m/other: constant", DegenerateSiteWarning, stacklevel=1)
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 2 and "bn2" in messages[0] and "m/other" in messages[1], messages
        configure_logging(verbose=True)
        assert logging.getLogger("distributed.scheduler").getEffectiveLevel() == logging.INFO
        assert os.environ[DASK_LEVEL_ENV] == "info"
