"""The environment defaults of every ckaflow process (command line, notebook API, deployments): offline by
default (no Hugging Face downloads, no usage telemetry) and a temporary Prefect server given time to start on
a loaded machine. Each is a default: a value already set in the environment wins."""

from __future__ import annotations

import os

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no anonymous usage reports (the tool runs offline)
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",                        # weights come from the local cache only
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # a loaded machine needs > 20 s
}


def apply_defaults() -> None:
    """Set every default this process's environment does not set already."""
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)


apply_defaults()
