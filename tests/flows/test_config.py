"""Config validation: every error names the field and the bad value, before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from dask.utils import parse_bytes

from flows.config import ConfigError, load_config, parse_size, validate_config
from tests.servers import REPO

HEAVY = ("torch", "timm", "torchvision", "xarray", "dask", "distributed", "prefect", "zarr")
# `ckaflow run CONFIG [OPTIONS]` in a fresh interpreter; at exit, the heavy modules it imported.
CLI_RUN = textwrap.dedent("""
    import atexit, json, sys
    atexit.register(lambda: print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules))))
    from flows.cli import app
    app(["run", *sys.argv[1:]], prog_name="ckaflow")
""")


def base_config(tmp_path: Path) -> dict:
    return {
        "store": str(tmp_path / "store"),
        "dataset": {"kind": "digits", "path": str(tmp_path / "digits")},
        "sampling": {"n": 20, "seed": 1},
        "models": [{"name": "vit", "arch": "vit_tiny_patch16_224", "arch_kwargs": {"img_size": 32}, "weights": "random:0"}],
    }


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_config(data)
    return str(caught.value)


def test_valid_config_fills_defaults(tmp_path):
    config = validate_config(base_config(tmp_path))
    assert config.similarity[0].key == "linear_biased"
    assert config.sites_of(config.models[0]) == "vit-blocks"
    assert config.compute.device == "auto"


def test_unknown_key_is_named(tmp_path):
    data = base_config(tmp_path)
    data["compute"] = {"batch_sise": 8}
    assert "compute.batch_sise: unknown key (got 8)" in error_of(data)


def test_bad_kernel_name_is_named(tmp_path):
    data = base_config(tmp_path)
    data["similarity"] = [{"kernel": "cosine"}]
    message = error_of(data)
    assert "similarity.0.kernel" in message and "'cosine'" in message


def test_missing_checkpoint_is_named(tmp_path):
    data = base_config(tmp_path)
    data["models"][0]["weights"] = str(tmp_path / "nope.safetensors")
    message = error_of(data)
    assert "models.0.weights" in message and "checkpoint file not found" in message
    assert message.count("nope.safetensors") == 1, message


@pytest.mark.parametrize("section, key, expected", [
    ("sampling", "per_clas", "sampling.per_clas: unknown key (got 3); did you mean 'per_class'?"),
    ("models", "arhc", "models.0.arhc: unknown key (got 3); did you mean 'arch'?"),
    ("similarity", "kernal", "similarity.0.kernal: unknown key (got 3); did you mean 'kernel'?"),
    (None, "stroe", "stroe: unknown key (got 3); did you mean 'store'?"),
])
def test_a_misspelt_key_gets_the_closest_key_of_its_section(tmp_path, section, key, expected):
    data = base_config(tmp_path)
    if section is None:
        data[key] = 3
    elif section in ("models", "similarity"):
        data[section] = [{**(data.get(section) or [{}])[0], key: 3}]
    else:
        data[section] = {**data[section], key: 3}
    assert expected in error_of(data).splitlines()[0]


def test_a_misspelt_preset_gets_the_closest_preset(tmp_path):
    assert "sites: unknown site preset 'vit-blocs'; did you mean 'vit-blocks'?" in error_of(
        {**base_config(tmp_path), "sites": "vit-blocs"})


@pytest.mark.parametrize("sites", ["blocks.*.nope", "layer1.0.conv1:output", "layer1.0/bn2", "layer[12]"])
def test_a_sites_string_with_a_glob_or_a_tap_is_a_pattern_not_a_preset(tmp_path, sites):
    assert validate_config({**base_config(tmp_path), "sites": sites}).sites == sites


def test_every_error_is_one_line_naming_its_field(tmp_path):
    data = {**base_config(tmp_path), "sampling": {"n": -3}, "compute": {"device": "tpu", "batch_sise": 8}}
    lines = error_of(data).splitlines()
    assert len(lines) == 3 and all(line.startswith("invalid configuration: ") for line in lines), lines


@pytest.mark.parametrize("field, value, expected", [
    ("reduction", "max", "unknown reduction 'max'"),
    ("sites", "vit-everything", "unknown site preset 'vit-everything'"),
    ("weights", "random:abc", "integer seed"),
    ("name", "my model", "may only use letters"),
    ("finetuned_from", "ghost", "'ghost' is not a model of this config"),
])
def test_model_field_errors(tmp_path, field, value, expected):
    data = base_config(tmp_path)
    data["models"][0][field] = value
    assert expected in error_of(data)


def test_several_errors_reported_together(tmp_path):
    data = base_config(tmp_path)
    data["sampling"]["n"] = -3
    data["compute"] = {"device": "tpu"}
    message = error_of(data)
    assert "sampling.n" in message and "compute.device" in message and "'tpu'" in message


def test_duplicate_model_names(tmp_path):
    data = base_config(tmp_path)
    data["models"].append(dict(data["models"][0]))
    assert "repeated: ['vit']" in error_of(data)


def test_minibatch_needs_unbiased(tmp_path):
    data = base_config(tmp_path)
    data["similarity"] = [{"method": "minibatch", "estimator": "biased"}]
    assert "unbiased" in error_of(data)


def test_load_config_from_yaml_and_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path)))
    config = load_config(path, {"store": "memory://elsewhere"})
    assert config.store == "memory://elsewhere"


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listed)


def test_parse_size():
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size(4096) == 4096
    for size in ("lots", "5 XB", "1..2GiB", "GiB2"):
        with pytest.raises(ValueError, match="not a memory size"):
            parse_size(size)


@pytest.mark.parametrize("size", ["2GiB", "512MB", "1.5 GiB", "10kb", "10KB", "3k", "4Mi", "7 mib", "100", "1e3",
                                  "1e3kB", "5B", "MiB", "0.5TB", "2PiB", "1g"])
def test_parse_size_reads_dasks_units(size):
    assert parse_size(size) == parse_bytes(size)


@pytest.mark.parametrize("fields, message", [
    ({"sampling": {"per_clas": 3}}, "sampling.per_clas: unknown key (got 3)"),
    ({"reduction": "pool0"}, "reduction: unknown reduction 'pool0'"),
    ({"sites": "vit-blocs"}, "sites: unknown site preset 'vit-blocs'"),
    ({"dataset": {"kind": "folder", "path": "."}}, "dataset.kind: unknown dataset kind 'folder'"),
    ({"compute": {"memory_budget": "lots"}}, "compute.memory_budget: memory_budget: not a memory size: 'lots'"),
])
def test_schema_error_of_the_command_line_imports_no_heavy_module(tmp_path, fields, message):
    """`ckaflow run` on a config with a schema error: one `error:` line, exit code 2, and none of torch,
    timm, xarray, dask, prefect, zarr imported (they cost seconds)."""
    errors, imported = cli_run(tmp_path, {**base_config(tmp_path), **fields})
    assert len(errors) == 1 and errors[0].startswith("error: invalid configuration") and message in errors[0], errors
    assert imported == [], f"a schema error imported {imported}"


def cli_run(tmp_path: Path, data: dict, *args: str) -> tuple[list[str], list[str]]:
    """`ckaflow run` on `data` in a fresh interpreter, which must fail with exit code 2 and print nothing on
    stdout: its stderr lines and the heavy modules it imported."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-c", CLI_RUN.format(heavy=HEAVY), str(path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    *printed, imported = done.stdout.strip().splitlines()
    assert done.returncode == 2 and not printed, done.stdout + done.stderr
    return done.stderr.strip().splitlines(), json.loads(imported)


@pytest.mark.parametrize("fields, args, message", [
    (lambda tmp: {}, ["--stage", "simlarity"], "--stage: unknown stage 'simlarity'; did you mean 'similarity'?"),
    (lambda tmp: {}, ["--refresh", "extrct"], "--refresh: unknown stage 'extrct'; did you mean 'extract'?"),
    (lambda tmp: {"store": str(tmp / "FILE")}, [], "exists and is not a directory"),
    (lambda tmp: {"sampling": {"n": 20}}, [], "20 images requested, but the dataset has only 8"),
    (lambda tmp: {"dataset": {"kind": "imagefolder", "path": str(tmp / "nowhere")}}, [], "dataset path does not exist"),
], ids=["stage", "refresh", "store", "sample size", "dataset path"])
def test_stage_store_and_dataset_errors_go_to_stderr_before_torch_is_imported(tmp_path, fields, args, message):
    """Checks that need no torch run before it is imported: each error is one `error:` line on stderr."""
    (tmp_path / "FILE").write_text("not a store")
    data = {**base_config(tmp_path), "dataset": {"kind": "synthetic", "options": {"n": 8, "size": 8, "n_classes": 2}}}
    errors, imported = cli_run(tmp_path, {**data, **fields(tmp_path)}, *args)
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors
    assert "torch" not in imported, imported


def test_demo_config_is_valid():
    import importlib.resources

    text = importlib.resources.files("flows").joinpath("demo.yaml").read_text()
    data = yaml.safe_load(text)
    for model in data["models"]:
        model["weights"] = "random:0"  # the zoo checkpoints are trained by `ckaflow demo`
    validate_config(data)
