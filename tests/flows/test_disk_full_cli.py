"""Disk full during `ckaflow run`, end to end on a real, small tmpfs: the run stops with one `error:` line
(exit code 2, no traceback) naming the store and the estimated size, and the same command, once the file
system has room, resumes to the results of a run that never failed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import flows.preflight
import storage
from flows.cli import app
from flows.pipeline import run_pipeline as compare
from tests.conftest import tiny_vit
from tests.flows.test_rerun import assert_same_results
from tests.mounts import resize, tmpfs

pytestmark = pytest.mark.timeout(900)
LEFT_FREE = 2**20  # what the ballast leaves: room for the sample, not for the ~2.8 MiB of activations


def config(store: Path) -> dict:
    """Two tiny ViTs (listed out of alphabetical order) with wide sites: 32 rows x 2 models x 14 sites x
    (17 tokens x 48 channels) in float32, 4 shards each."""
    return {"store": str(store),
            "dataset": {"kind": "synthetic", "options": {"n": 32, "size": 32, "n_classes": 4, "seed": 0}},
            "sampling": {"per_class": 8}, "models": [tiny_vit("vit_b", 1), tiny_vit("vit_a", 0)],
            "sites": "vit-sublayers", "reduction": "tokens", "analyses": {"probes": False},
            "compute": {"device": "cpu", "batch_size": 8, "shard_size": 8, "n_workers": 1,
                        "memory_budget": "256MiB"}}


def fill_after_preflight(monkeypatch, mount: Path, plans: list) -> None:
    """Once the pre-flight checks passed (the disk had room for the estimate), another writer fills the file
    system but for LEFT_FREE bytes: the run's own writes then fill it during extraction."""
    check = flows.preflight.preflight

    def checked_then_filled(*args, **kwargs):
        plans.append(check(*args, **kwargs))
        with open(mount / "ballast", "wb") as ballast:
            ballast.write(bytes(shutil.disk_usage(mount).free - LEFT_FREE))
        return plans[-1]

    monkeypatch.setattr(flows.preflight, "preflight", checked_then_filled)


def test_disk_full_while_extracting_then_the_same_command_resumes(tmp_path, monkeypatch, prefect_server):
    reference = config(tmp_path / "reference")
    compare(reference)
    with tmpfs(tmp_path / "small", "8m") as mount:
        store = mount / "store"
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config(store)))
        plans: list = []
        fill_after_preflight(monkeypatch, mount, plans)
        failed = CliRunner().invoke(app, ["run", str(path)], env={"COLUMNS": "300"})
        assert plans and plans[0].store_bytes > LEFT_FREE  # pre-flight passed; the run needed more than was left
        assert failed.exit_code == 2, failed.output
        errors = [line for line in failed.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in failed.output, failed.output
        assert errors[0].startswith(f"error: disk full while writing {store}"), errors
        assert f"(the run writes about {storage.format_size(plans[0].store_bytes)} in all)" in errors[0], errors
        done, total = storage.model_progress(str(store), "vit_b")
        assert 0 < done < total, (done, total)  # it failed extracting the first model, finished shards kept
        status = CliRunner().invoke(app, ["status", str(store)], env={"COLUMNS": "300"}).output
        assert "latest run failed" in status and "No space left on device" in status, status

        monkeypatch.undo()
        resize(mount, "64m")
        resumed = CliRunner().invoke(app, ["run", str(path)], env={"COLUMNS": "300"})
        assert resumed.exit_code == 0, resumed.output
        assert f"report: {store}" in resumed.output
        assert_same_results(str(store), reference["store"])
        status = CliRunner().invoke(app, ["status", str(store)], env={"COLUMNS": "300"})
        assert status.exit_code == 0 and status.output.index("vit_b") < status.output.index("vit_a"), status.output
