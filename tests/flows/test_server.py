"""The temporary Prefect server start tolerates a slow machine: a start that runs past its limit is tried
again with the next, longer limit. Each case runs in a fresh interpreter, as a user's `ckaflow run` does
(the session's own test server is a process-wide singleton)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

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


def start_in_child(limits: tuple[float, ...]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, "-c", CHILD.format(limits=limits)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_timed_out_start_is_retried_with_the_next_limit():
    outcome = start_in_child((0.001, 180))
    assert outcome == {"attempts": [0.001, 180], "healthy": True}


def test_a_server_that_never_starts_names_the_way_out():
    outcome = start_in_child((0.001, 0.001))
    assert outcome["attempts"] == [0.001, 0.001] and "prefect server start" in outcome["error"]
