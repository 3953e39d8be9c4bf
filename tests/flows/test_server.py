"""The temporary Prefect server start tolerates a slow machine: a start that runs past its limit is tried
again with the next, longer limit. Each case runs in a fresh interpreter, as a user's `ckaflow run` does
(the session's own test server is a process-wide singleton)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.servers import REPO

CHILD = textwrap.dedent("""
    import json, sys
    import httpx
    from prefect.server.api.server import SubprocessASGIServer
    from flows.server import start_temporary_server

    attempts, original = [], SubprocessASGIServer.start

    def counted(self, *args, **kwargs):
        attempts.append(kwargs.get("timeout"))
        return original(self, *args, **kwargs)

    SubprocessASGIServer.start = counted
    try:
        api = start_temporary_server(limits_s={limits!r})
        healthy = httpx.get(f"{{api}}/health", timeout=30).status_code == 200
        print(json.dumps({{"attempts": attempts, "healthy": healthy}}))
    except RuntimeError as error:
        print(json.dumps({{"attempts": attempts, "error": str(error)}}))
    finally:
        SubprocessASGIServer().stop()
""")


RETRIED, NEVER = (0.001, 180), (0.001, 0.001)


def start_in_child(limits: tuple[float, ...], **settings: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | settings
    return subprocess.Popen([sys.executable, "-c", CHILD.format(limits=limits)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outcome_of(child: subprocess.Popen) -> dict:
    stdout, stderr = child.communicate(timeout=600)
    assert child.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """Both cases' interpreters, started at once (each mostly imports and waits on its server); the one whose
    server never starts has a Prefect home (database) of its own, so that the two never share one."""
    home = tmp_path_factory.mktemp("never-home")
    started = {RETRIED: start_in_child(RETRIED), NEVER: start_in_child(NEVER, PREFECT_HOME=str(home))}
    yield started
    for child in started.values():
        if child.poll() is None:
            child.kill()
            child.communicate()


def test_a_timed_out_start_is_retried_with_the_next_limit(children):
    outcome = outcome_of(children[RETRIED])
    assert outcome == {"attempts": [0.001, 180], "healthy": True}


def test_a_server_that_never_starts_names_the_way_out(children):
    outcome = outcome_of(children[NEVER])
    assert outcome["attempts"] == [0.001, 0.001] and "prefect server start" in outcome["error"]
