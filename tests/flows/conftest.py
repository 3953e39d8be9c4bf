"""Fixtures of the flow tests that several modules share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def kill_reference(tmp_path_factory, prefect_server) -> dict:
    """The config of the kill-and-resume tests (`test_resume.kill_config`) run once, uninterrupted, on a fresh
    store: what their interrupted runs must match. Read only; a test that needs this state to change copies the
    store (its dataset path is shared: the exported digits, read only too)."""
    from flows.pipeline import run_pipeline
    from tests.flows.test_resume import kill_config

    config = kill_config(tmp_path_factory.mktemp("kill-reference"), "reference")
    run_pipeline(config)
    return config
