"""Real servers for tests: a `prefect server start` and a `dask scheduler` with `dask worker`s.

Everything listens on 127.0.0.1 on a free port, lives in a temporary directory, and is stopped
(with all its child processes) when the context manager exits, also when the test fails.
Nothing is assumed to be running beforehand.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def executable(name: str) -> str:
    """A console script of this environment (`prefect`, `dask`), next to the running Python."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name!r} is not installed next to {sys.executable} nor on PATH")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 60) -> str:
    """The end of a log file, for failure messages."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text[-lines:])


def base_env(**overrides: str) -> dict[str, str]:
    """This process's environment, quiet and offline, with `overrides` (None values remove a key)."""
    env = dict(os.environ)
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@dataclass
class Service:
    """A background process started in its own session, its output going to a log file."""

    name: str
    process: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group (the process and its children), then SIGKILL what is left."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Children (flow-run subprocesses, Dask nannies) may outlive their parent: kill the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)

    def kill(self) -> None:
        """SIGKILL the process group at once (the process and its children die, no clean shutdown:
        a machine going away), and reap the process."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


def start(name: str, args: Sequence[str], log_dir: Path, env: dict[str, str], cwd: Path | None = None) -> Service:
    log = Path(log_dir) / f"{name}.log"
    handle = open(log, "ab")  # noqa: SIM115 (kept open by the child)
    try:
        process = subprocess.Popen(list(args), stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=str(cwd or REPO), start_new_session=True)
    finally:
        handle.close()
    return Service(name, process, log)


def run(args: Sequence[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 120,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a command to completion; on failure the error shows its whole output."""
    result = subprocess.run(list(args), env=env, cwd=str(cwd or REPO), capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"command failed ({result.returncode}): {' '.join(args)}\n"
                             f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}")
    return result


def wait_until(predicate, timeout: float, what: str, services: Sequence[Service] = (), interval: float = 0.5):
    """Poll `predicate` until it returns a true value; fail early when one of `services` died."""
    deadline = time.monotonic() + timeout
    while True:
        for service in services:
            if not service.alive():
                raise RuntimeError(f"{service.name} exited with code {service.process.returncode} while waiting "
                                   f"for {what}; log:\n{tail(service.log)}")
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 (not up yet)
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {s.name} ---\n{tail(s.log)}" for s in services)
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------- Prefect


def session_prefect_env() -> dict[str, str]:
    """{"PREFECT_API_URL": ...} of the server this process uses (the session's `prefect_server` fixture), for
    a `ckaflow run` in a subprocess: it then uses that server, as a run does where one is configured, rather
    than starting a temporary server of its own. Empty when no server is configured here."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return {"PREFECT_API_URL": url} if url else {}


@dataclass
class PrefectServer:
    """A running `prefect server start`; `env` points any Prefect command or client at it."""

    api_url: str
    home: Path
    env: dict[str, str]
    service: Service
    log_dir: Path
    others: list[Service] = field(default_factory=list)

    def cli(self, *args: str, timeout: float = 120, check: bool = True, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run `prefect ARGS...` against this server."""
        return run([executable("prefect"), *args], env={**self.env, **(env or {})}, cwd=cwd, timeout=timeout,
                   check=check)

    def start(self, name: str, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Service:
        """Start `prefect ARGS...` in the background (e.g. a worker); stopped with the server."""
        service = start(name, [executable("prefect"), *args], self.log_dir, {**self.env, **(env or {})}, cwd)
        self.others.append(service)
        return service

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = httpx.request(method, f"{self.api_url}{path}", timeout=30, **kwargs)
        response.raise_for_status()
        return response

    def flow_run_logs(self, flow_run_id: str, limit: int = 200) -> str:
        """The stored log lines of a flow run (for failure messages)."""
        try:
            records = self.api("POST", "/logs/filter", json={
                "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": limit}).json()
        except Exception as error:  # noqa: BLE001
            return f"(logs unavailable: {error})"
        return "\n".join(f"{r['timestamp']} {r['level']:>2} {r['name']}: {r['message']}" for r in records)


@contextlib.contextmanager
def prefect_server(tmp_path: Path, startup_timeout: float = 150) -> Iterator[PrefectServer]:
    """`prefect server start` on 127.0.0.1:<free port>, SQLite in a fresh PREFECT_HOME under tmp_path."""
    home = Path(tmp_path) / "prefect-home"
    logs = Path(tmp_path) / "logs"
    home.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api_url = f"http://{HOST}:{port}/api"
    env = base_env(
        PREFECT_HOME=str(home),
        PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
        PREFECT_API_URL=api_url,
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_API_HOST=HOST,
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_API_KEY=None,
        PREFECT_API_AUTH_STRING=None,
        PREFECT_CLI_PROMPT="false",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    # The scheduler service is off: it would only create the nightly deployment's future runs.
    service = start("prefect-server", [executable("prefect"), "server", "start", "--host", HOST, "--port", str(port),
                                       "--no-ui", "--analytics-off", "--no-scheduler"], logs, env)
    server = PrefectServer(api_url, home, env, service, logs)
    try:
        wait_until(lambda: httpx.get(f"{api_url}/health", timeout=5).json() is True, startup_timeout,
                   f"the Prefect server at {api_url}", [service])
        yield server
    finally:
        for other in reversed(server.others):
            other.stop()
        service.stop()


# ------------------------------------------------------------------------------------------------ Dask


@dataclass
class DaskCluster:
    address: str
    scheduler: Service
    workers: list[Service]
    worker_args: list[str] = field(default_factory=list)   # `dask worker ADDRESS ...` options but the name
    log_dir: Path = Path()
    env: dict[str, str] = field(default_factory=dict)

    @property
    def services(self) -> list[Service]:
        return [self.scheduler, *self.workers]

    def start_worker(self) -> Service:
        """One more `dask worker` process (named worker-<i>, i counting all started), like the first ones;
        stopped with the cluster. Returns without waiting for it to join (see `wait_for_workers`)."""
        name = f"worker-{len(self.workers)}"
        worker = start(f"dask-{name}", [*self.worker_args, "--name", name, "--local-directory",
                                        str(self.log_dir / name)], self.log_dir, self.env, cwd=self.log_dir)
        self.workers.append(worker)
        return worker

    def wait_for_workers(self, n: int, timeout: float = 90) -> None:
        """Until the scheduler has exactly `n` workers; fails early when the scheduler dies."""
        from distributed import Client

        def count() -> bool:
            with Client(self.address, timeout=10) as client:
                return len(client.nthreads()) == n

        wait_until(count, timeout, f"{n} Dask workers at {self.address}", [self.scheduler], interval=0.5)


def without_checkout(pythonpath: str | None) -> str | None:
    """`pythonpath` minus any entry that points at this checkout (None when nothing is left)."""
    entries = [p for p in (pythonpath or "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    return os.pathsep.join(entries) or None


@contextlib.contextmanager
def dask_cluster(tmp_path: Path, n_workers: int = 2, nthreads: int = 1, memory_limit: str = "2GiB",
                 startup_timeout: float = 90) -> Iterator[DaskCluster]:
    """`dask scheduler` and `n_workers` separate `dask worker` processes on 127.0.0.1.

    Started like workers on another machine: outside the checkout (cwd and --local-directory under
    tmp_path) and without it on PYTHONPATH; they import the project's packages through its
    installation alone (`pip install -e . --config-settings editable_mode=compat`, see the Makefile)."""
    from distributed import Client

    logs = Path(tmp_path) / "dask-logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"tcp://{HOST}:{port}"
    env = base_env(PYTHONPATH=without_checkout(os.environ.get("PYTHONPATH")))
    dask = executable("dask")
    scheduler = start("dask-scheduler", [dask, "scheduler", "--host", HOST, "--port", str(port),
                                         "--no-dashboard"], logs, env, cwd=logs)
    cluster = DaskCluster(address, scheduler, [], log_dir=logs, env=env, worker_args=[
        dask, "worker", address, "--host", HOST, "--nthreads", str(nthreads), "--nworkers", "1",
        "--memory-limit", memory_limit, "--no-dashboard"])
    try:
        wait_until(lambda: socket.create_connection((HOST, port), timeout=2).close() or True, startup_timeout,
                   f"the Dask scheduler at {address}", [scheduler])
        for _ in range(n_workers):
            cluster.start_worker()

        def ready() -> bool:
            with Client(address, timeout=10) as client:
                return len(client.nthreads()) >= n_workers

        wait_until(ready, startup_timeout, f"{n_workers} Dask workers at {address}", cluster.services,
                   interval=1.0)
        yield cluster
    finally:
        for worker in cluster.workers:
            worker.stop()
        scheduler.stop()
