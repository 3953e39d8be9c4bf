"""Production orchestration, for real: `prefect server start`, a process work pool, `prefect deploy`
from prefect.yaml, `prefect deployment run` of the tiny config, a worker that runs it to the end.

Also checks the shipped configs (tiny, nightly) and prefect.yaml without any server.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from flows.config import ConfigError, load_config
from tests.servers import REPO, prefect_server, tail

POOL = "ckaflow-process"
FLOW = "ckaflow-pipeline"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


# ------------------------------------------------------------------------------- no server needed


def test_nightly_config_validates(tmp_path):
    """configs/nightly.yaml is a valid config; on a machine without ImageNet only its dataset path is missing."""
    path = REPO / "configs" / "nightly.yaml"
    data = yaml.safe_load(path.read_text())
    imagenet = tmp_path / "imagenet" / "val"
    (imagenet / "n01440764").mkdir(parents=True)
    config = load_config(path, {"dataset": dict(data["dataset"], path=str(imagenet))})
    assert config.dataset.kind == "imagefolder"
    assert {m.name for m in config.models} >= {"mae", "dino"}
    assert config.model("sup_in21k_ft").finetuned_from == "sup_in21k"
    assert config.sites == "vit-sublayers"
    assert config.compute.device == "cuda"
    if not Path(data["dataset"]["path"]).exists():
        with pytest.raises(ConfigError) as error:
            load_config(path)
        problems = str(error.value).splitlines()  # one line per problem, each naming the file and the field
        assert len(problems) == 1 and "nightly.yaml': dataset: dataset path does not exist" in problems[0], problems


def test_nightly_timm_tags_exist():
    """Every `weights: timm` model of the nightly config names a pretrained tag timm knows (no download)."""
    import timm

    data = yaml.safe_load((REPO / "configs" / "nightly.yaml").read_text())
    tagged = [m["arch"] for m in data["models"] if m["weights"] == "timm"]
    assert tagged
    for arch in tagged:
        assert "." in arch, f"{arch!r}: weights 'timm' needs a pretrained tag (arch.tag)"
        timm.models.get_pretrained_cfg(arch, allow_unregistered=False)


def test_tiny_config_validates():
    config = load_config(REPO / "configs" / "tiny.yaml")
    assert config.dataset.kind == "synthetic" and len(config.models) >= 2
    assert all(m.weights.startswith("random:") for m in config.models)
    assert config.compute.device == "cpu"


def test_prefect_yaml_declares_nightly_and_on_demand():
    spec = prefect_yaml()
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"nightly", "on-demand"}
    for deployment in deployments.values():
        assert deployment["entrypoint"] == "flows/pipeline.py:run_pipeline"
        assert deployment["work_pool"]["name"] == POOL
        assert (REPO / deployment["parameters"]["config"]).is_file()
    (schedule,) = deployments["nightly"]["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"]
    assert deployments["nightly"]["parameters"]["config"] == "configs/nightly.yaml"
    assert "schedules" not in deployments["on-demand"]
    (step,) = spec["pull"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $CKAFLOW_HOME }}"


# -------------------------------------------------------------------------------- a real server


def _flow_run(server, flow_run_id: str) -> dict:
    return server.api("GET", f"/flow_runs/{flow_run_id}").json()


@pytest.mark.timeout(300)
def test_deploy_and_run_tiny_config_on_a_real_server(tmp_path):
    store = tmp_path / "store"
    worker_home = tmp_path / "elsewhere"  # the worker starts outside the checkout: the pull step must cd
    worker_home.mkdir()
    home = {"CKAFLOW_HOME": str(REPO)}
    with prefect_server(tmp_path) as server:
        server.cli("work-pool", "create", POOL, "--type", "process")
        deployed = server.cli("deploy", "--all", "--no-prompt", env=home, timeout=240)

        found = server.api("POST", "/deployments/filter", json={}).json()
        by_name = {d["name"]: d for d in found}
        assert set(by_name) == {"nightly", "on-demand"}, deployed.stdout
        nightly = by_name["nightly"]
        assert nightly["work_pool_name"] == POOL and nightly["parameters"] == {"config": "configs/nightly.yaml"}
        (schedule,) = nightly["schedules"]
        assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["schedule"]["timezone"] == "UTC"
        assert schedule["active"]
        assert not by_name["on-demand"]["schedules"]

        params = {"config": "configs/tiny.yaml", "store": str(store)}
        triggered = server.cli("deployment", "run", f"{FLOW}/on-demand", "--params", json.dumps(params))
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", triggered.stdout)
        assert match, triggered.stdout
        flow_run_id = match.group(1)

        # A worker that polls once, runs what it found, and exits when that run is over. Should it
        # poll before the run is visible, start it again (bounded by the deadline).
        deadline = time.monotonic() + 300
        state, attempt = None, 0
        while time.monotonic() < deadline:
            attempt += 1
            worker = server.start(f"prefect-worker-{attempt}", "worker", "start", "--pool", POOL, "--run-once",
                                  "--limit", "1", "--name", f"test-worker-{attempt}", "--install-policy", "never",
                                  cwd=worker_home, env=home)
            try:
                worker.process.wait(max(1.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 (timeout: reported below)
                break
            state = _flow_run(server, flow_run_id)["state"]
            if state and state["type"] in TERMINAL:
                break
            time.sleep(1)

        state = _flow_run(server, flow_run_id)["state"]
        logs = "\n".join(f"--- {s.name} ---\n{tail(s.log, 40)}" for s in server.others)
        assert state is not None and state["type"] == "COMPLETED", (
            f"flow run {flow_run_id} ended {state and state['type']}: {state and state.get('message')}\n"
            f"--- flow run logs ---\n{server.flow_run_logs(flow_run_id)}\n{logs}")

        run = _flow_run(server, flow_run_id)
        assert run["parameters"]["config"] == "configs/tiny.yaml"
        index = store / "report" / "index.html"
        assert index.is_file(), f"no report at {index}; store holds {sorted(p.name for p in store.iterdir())}"
        summary = json.loads((index.parent / "summary.json").read_text())
        assert set(summary["models"]) == {"vit_a", "vit_b"}
        assert "linear_biased" in summary["similarity"]
        # The stages ran as subflows of the deployed run.
        children = server.api("POST", "/flow_runs/filter", json={
            "flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}}).json()
        assert len(children) >= 5 and all(c["state"]["type"] == "COMPLETED" for c in children), \
            [(c["name"], c["state"]["type"]) for c in children]
