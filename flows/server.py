"""Prefect's temporary local server, started before a run when no PREFECT_API_URL is set, with a start-up
limit that tolerates a loaded machine and one retry. For many parallel runs, start one server instead
(`prefect server start`, then PREFECT_API_URL; see the README, Operations)."""

from __future__ import annotations

from collections.abc import Sequence

STARTUP_LIMITS_S = (90, 180)


def start_temporary_server(limits_s: Sequence[int] = STARTUP_LIMITS_S) -> str | None:
    """Start the temporary server (one try per start-up limit in `limits_s`) unless PREFECT_API_URL is set;
    returns its API URL (None when a server is configured). The flows then use this server."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    for attempt, limit in enumerate(limits_s, start=1):
        server = SubprocessASGIServer()
        try:
            server.start(timeout=limit)
            return server.api_url
        except RuntimeError as error:
            server.stop()
            if attempt == len(limits_s):
                raise RuntimeError(
                    f"Prefect's temporary server did not start ({len(limits_s)} tries, up to {limit} s): {error}. "
                    "On a loaded machine or for many parallel runs, start one server with `prefect server start` "
                    "and set PREFECT_API_URL") from None
    return None
