"""Fail fast, fail clean: every problem that can be found before heavy work is reported by `ckaflow run`
before the Prefect server starts, as one `error:` line naming the field, model, file or path, with
exit code 2, no traceback, and nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

import flows.preflight
from flows.cli import app
from flows.config import load_config, validate_config
from flows.errors import is_transient, is_user_error
from flows.loop import resolve_config
from flows.pipeline import run_pipeline as compare
from flows.preflight import check_model, preflight
from tasks.extract import list_sites
from tests.conftest import tiny_vit
from tests.mounts import tmpfs

runner = CliRunner()
RESNET = {"name": "resnet", "arch": "resnet10t", "arch_kwargs": {"num_classes": 0}, "weights": "random:2",
          "sites": "resnet-blocks"}


def config(tmp_path: Path, **overrides) -> dict:
    data = {"store": str(tmp_path / "store"),
            "dataset": {"kind": "synthetic", "options": {"n": 32, "size": 32, "n_classes": 4, "seed": 0}},
            "sampling": {"per_class": 8}, "models": [tiny_vit("vit_a", 0), tiny_vit("vit_b", 1)],
            "sites": "vit-blocks", "reduction": "mean", "compute": {"device": "cpu"}}
    data.update(overrides)
    return data


def run(tmp_path: Path, data: dict, *args: str):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return runner.invoke(app, ["run", str(path), *args])


def assert_clean_failure(result, *fragments: str, store: Path | None = None) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:"), result.output
    assert "Traceback" not in result.output and "temporary Prefect server" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    if store is not None:
        assert not store.exists() or not any(store.iterdir()), sorted(store.rglob("*"))


def test_top_level_reduction_that_does_not_fit_a_model_names_it(tmp_path):
    result = run(tmp_path, config(tmp_path, models=[tiny_vit("vit_a", 0), RESNET]))
    assert_clean_failure(result, "models[1] 'resnet'", "reduction 'mean'", "top-level `reduction`",
                         store=tmp_path / "store")


def test_unknown_key_is_named(tmp_path):
    data = config(tmp_path)
    data["sampling"] = {"per_clas": 8}
    assert_clean_failure(run(tmp_path, data), "sampling.per_clas: unknown key", store=tmp_path / "store")


def test_site_pattern_that_matches_nothing_names_model_and_pattern(tmp_path):
    data = config(tmp_path, models=[tiny_vit("vit_a", 0, sites=["trunk.*"])])
    assert_clean_failure(run(tmp_path, data), "'vit_a'", "'trunk.*' matches no module", store=tmp_path / "store")


def test_user_errors_go_to_stderr_one_line_each(tmp_path):
    data = config(tmp_path)
    data["sampling"] = {"per_clas": 8, "seed": "x"}
    result = run(tmp_path, data)
    assert result.exit_code == 2 and result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: invalid configuration") for line in lines), lines
    assert any(line.endswith("did you mean 'per_class'?") for line in lines), lines


FACTORY = """
import torch


def factory(width=4):
    return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.ReLU())
"""


@pytest.fixture
def clean_imports(monkeypatch):
    """sys.path and the `mymodels` module restored after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    sys.modules.pop("mymodels", None)


def test_a_factory_next_to_the_config_is_found_from_any_directory(tmp_path, monkeypatch, clean_imports):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "mymodels.py").write_text(FACTORY)
    path = tmp_path / "project" / "config.yaml"
    model = {"name": "mine", "arch": "mymodels:factory", "weights": "random:0", "sites": ["0", "1"],
             "reduction": "avgpool"}
    path.write_text(yaml.safe_dump(config(tmp_path, models=[model])))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    plan = preflight(load_config(path))
    assert plan.widths == {"mine": 8}


def test_a_factory_that_is_nowhere_says_how_to_add_its_directory(tmp_path, monkeypatch, clean_imports):
    monkeypatch.chdir(tmp_path)
    model = {"name": "mine", "arch": "mymodels:factory", "weights": "random:0", "sites": ["0"]}
    assert_clean_failure(run(tmp_path, config(tmp_path, models=[model])), "cannot import module 'mymodels'",
                         "config file's directory", "PYTHONPATH")


@pytest.mark.parametrize("arch, kwargs", [("resnet10t", {}), ("vit_tiny_patch16_224", tiny_vit("v", 0)["arch_kwargs"])])
def test_every_name_ckaflow_sites_prints_is_accepted_by_a_config(tmp_path, arch, kwargs):
    printed = runner.invoke(app, ["sites", arch, "--arch-kwargs", json.dumps(kwargs)], env={"COLUMNS": "80"})
    assert printed.exit_code == 0, printed.output
    names = [line.split("│")[1].strip() for line in printed.stdout.splitlines() if line.startswith("│")]
    names = [name for name in names if name]  # a row's continuation lines leave the site cell empty
    assert names == [name for entries in list_sites(arch, kwargs).values() for name, _ in entries]
    data = config(tmp_path, models=[{"name": "m", "arch": arch, "arch_kwargs": kwargs, "weights": "random:0",
                                     "sites": names, "reduction": "flatten"}])
    assert sum(check_model(validate_config(data), 0)) > 0
    for name in (names[0], names[-1]):  # a single name is a `sites` string too
        validate_config({**data, "sites": name})


def test_missing_dataset_path_is_named(tmp_path):
    data = config(tmp_path, dataset={"kind": "imagefolder", "path": str(tmp_path / "nowhere")})
    assert_clean_failure(run(tmp_path, data), "dataset path does not exist", str(tmp_path / "nowhere"), store=tmp_path / "store")


def test_checkpoint_with_foreign_keys_names_file_and_model(tmp_path):
    checkpoint = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(checkpoint))
    data = config(tmp_path, models=[tiny_vit("vit_a", 0, weights=str(checkpoint))])
    assert_clean_failure(run(tmp_path, data), "'vit_a'", str(checkpoint), "foreign keys", store=tmp_path / "store")


def test_unknown_refresh_stage_lists_the_stages(tmp_path):
    result = run(tmp_path, config(tmp_path), "--refresh", "extrct")
    assert_clean_failure(result, "--refresh: unknown stage 'extrct'", "sample, extract", store=tmp_path / "store")


def test_directory_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "notes.txt").write_text("mine")
    result = run(tmp_path, config(tmp_path))
    assert_clean_failure(result, "not a ckaflow run store")
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["notes.txt"]


def test_read_only_store_location(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as mount:
        result = run(tmp_path, config(tmp_path, store=str(mount / "store")))
        assert_clean_failure(result, f"{mount} is not writable", "Read-only file system")
        assert not any(mount.iterdir())


def test_not_enough_disk_for_the_estimated_store(tmp_path):
    with tmpfs(tmp_path / "small", "64k") as mount:
        plan = preflight(resolve_config(config(tmp_path, store=str(tmp_path / "elsewhere"))))
        assert plan.store_bytes == 32 * 2 * (2 * 48) * 4  # rows x models x (2 blocks x 48 features) x float32
        data = config(tmp_path, store=str(mount / "store"), sampling={"per_class": 8, "views": 8})
        result = run(tmp_path, data)
        assert_clean_failure(result, "not enough disk space", "256 rows x 192 features", "KiB free")
        assert not any(mount.iterdir())


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, models=[tiny_vit("vit_a", 0), RESNET])))
    result = runner.invoke(app, ["--debug", "run", str(path)])
    assert result.exit_code != 2 and result.exception is not None
    assert "reduction 'mean'" in str(result.exception)


def test_checks_run_once_per_command_line_run_and_on_every_api_call(tmp_path, monkeypatch, prefect_server):
    """The command line checks before the Prefect server starts and `compare` does not check again;
    a caller of `compare` itself (API, deployment) gets the checks."""
    checked, check_model = [], flows.preflight.check_model
    monkeypatch.setattr(flows.preflight, "check_model", lambda cfg, index, image_size=None:
                        checked.append(cfg.models[index].name) or check_model(cfg, index, image_size))
    data = config(tmp_path)
    result = run(tmp_path, data, "--stage", "sample")
    assert result.exit_code == 0, result.output
    assert checked == ["vit_a", "vit_b"]
    checked.clear()
    compare(dict(data, store=str(tmp_path / "api")), stage="sample")
    assert checked == ["vit_a", "vit_b"]


@pytest.mark.parametrize("error, user, transient", [
    (OSError(28, "No space left on device"), True, False),
    (OSError(30, "Read-only file system"), True, False),
    (ValueError("bad"), False, False),
    (TimeoutError("slow"), False, True),
    (ConnectionResetError(104, "reset"), False, True),
    (OSError(5, "Input/output error"), False, True),
])
def test_only_transient_errors_are_retried(error, user, transient):
    assert is_user_error(error) is user and is_transient(error) is transient


def test_config_error_is_not_retried(prefect_server):
    """The retry condition of every flow task: a deterministic error fails the task at once."""
    from prefect import task

    from flows.config import ConfigError
    from flows.errors import retry_transient

    calls = []

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def failing(kind: str) -> None:
        calls.append(kind)
        raise ConfigError("models[0]: bad") if kind == "config" else TimeoutError("slow store")

    for kind, expected in (("config", 1), ("timeout", 4)):
        calls.clear()
        with pytest.raises((ConfigError, TimeoutError)):
            failing(kind)
        assert len(calls) == expected, (kind, calls)


def test_memory_budget_too_small_for_the_similarity_plan_is_refused_before_extraction(tmp_path):
    """The engine's smallest plan is computed from the sites' widths at pre-flight: no activation is
    extracted for a run whose CKA would then be refused (flattened ResNet maps, a 2 MiB budget)."""
    data = config(tmp_path, models=[RESNET], reduction="flatten",
                  compute={"device": "cpu", "memory_budget": "2MiB", "threads": 2})
    result = run(tmp_path, data)
    assert_clean_failure(result, "similarity[0] linear_biased", "compute.memory_budget", "it needs at least",
                         store=tmp_path / "store")
    # minibatch entries have no such plan; a budget that fits passes pre-flight
    ok = preflight(validate_config(config(tmp_path, models=[RESNET], reduction="flatten",
                                          compute={"device": "cpu", "memory_budget": "2GiB"})))
    assert ok.site_widths["resnet"] and sum(ok.site_widths["resnet"]) == ok.widths["resnet"]
