"""The run store: round trips, errors, kill-resume and concurrent writers (issue: run store)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import storage
from storage.layout import chunk_rows
from storage.locks import LOCKS
from storage.status import render_status, store_status

WIDTHS = {"blocks.0/attn": 6, "blocks.0/block": 4, "norm/output": 3}
N, SHARD = 50, 8


def site_data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {site: rng.standard_normal((N, width)).astype(np.float32) for site, width in WIDTHS.items()}


def make_samples(n: int = N, fingerprint: str = "samples-0") -> xr.Dataset:
    return xr.Dataset(
        {"image_index": ("sample", np.arange(n)), "key": ("sample", np.array([f"img{i}.png" for i in range(n)])),
         "label": ("sample", np.arange(n) % 3), "label_name": ("sample", np.array(["cat", "dog", "émù"] * n)[:n]),
         "view": ("sample", np.zeros(n, dtype=np.int64))},
        attrs={"fingerprint": fingerprint, "seed": 0, "n": None, "skipped": [], "dataset": {"kind": "synthetic"}})


def new_store(path: Path | str) -> zarr.Group:
    root = storage.open_store(str(path))
    storage.write_samples(root, make_samples())
    return root


def write_all(root: zarr.Group, data: dict[str, np.ndarray], model: str = "m", **options) -> None:
    with storage.ActivationWriter(root, model, WIDTHS, N, shard_size=SHARD, fingerprint="fp", **options) as writer:
        for shard in writer.pending_shards():
            start, stop = writer.shard_bounds(shard)
            writer.write_shard(shard, {site: x[start:stop] for site, x in data.items()})


def stored(root: zarr.Group, model: str = "m") -> dict[str, np.ndarray]:
    return {site: np.asarray(array[:]) for site, array in storage.activation_arrays(root, model).items()}


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("url", ["local", "memory"])
def test_activations_round_trip_with_labels(tmp_path, url):
    root = new_store(tmp_path / "store" if url == "local" else f"memory://roundtrip-{os.getpid()}")
    data = site_data()
    write_all(root, data, attrs={"arch": "vit", "weights": None, "nested": {"a": [1, None]}},
              site_attrs={"blocks.0/attn": {"module": "blocks.0.attn"}})
    assert storage.model_progress(root, "m") == (7, 7)
    attrs = storage.model_attrs(root, "m")
    assert attrs["sites"] == list(WIDTHS) and attrs["nested"] == {"a": [1, None]} and attrs["weights"] is None
    assert attrs["nonfinite"] == {}
    acts = storage.open_activations(root, "m")
    for site, x in data.items():
        assert acts[site].dtype == np.float32
        np.testing.assert_array_equal(acts[site].values, x)
    assert acts["blocks.0/attn"].attrs["layer"] == "blocks.0" and acts["blocks.0/attn"].attrs["sublayer"] == "attn"
    assert acts["blocks.0/attn"].attrs["module"] == "blocks.0.attn"
    assert list(acts.label_name.values[:3]) == ["cat", "dog", "émù"]
    assert acts.sel(sample=acts.label == 1)["norm/output"].shape == (17, 3)
    samples = storage.read_samples(root)
    assert samples.key.dtype.kind == "U" and samples.attrs["dataset"] == {"kind": "synthetic"}


def test_chunks_align_with_shards_and_stay_small():
    for shard, width in [(512, 768), (512, 150528), (100, 3), (7, 10**7)]:
        rows = chunk_rows(shard, width, 4)
        assert shard % rows == 0 and (rows == 1 or rows * width * 4 <= 4 << 20)


def test_zarr_shards_and_compression_options(tmp_path):
    root = new_store(tmp_path / "store")
    data = site_data(1)
    write_all(root, data, zarr_shards=True, compression_level=0)
    array = storage.activation_arrays(root, "m")["blocks.0/attn"]
    assert array.shards == (SHARD, 6) and array.compressors == ()
    np.testing.assert_array_equal(stored(root)["blocks.0/attn"], data["blocks.0/attn"])


def test_float16_storage_and_out_of_range_error_names_site(tmp_path):
    root = new_store(tmp_path / "store")
    data = site_data(2)
    write_all(root, data, dtype="float16")
    np.testing.assert_array_equal(stored(root)["norm/output"], data["norm/output"].astype(np.float16))
    big = {site: x.copy() for site, x in data.items()}
    big["blocks.0/block"][SHARD + 1, 2] = 1e6
    other = new_store(tmp_path / "other")
    with pytest.raises(storage.StoreError, match=r"m/blocks.0/block shard 1: value 1e\+06 .*float16"):
        write_all(other, big, dtype="float16")
    assert storage.model_progress(other, "m") == (1, 7)
    assert np.isnan(np.asarray(storage.activation_arrays(other, "m", require_complete=False)["blocks.0/attn"][SHARD:])).all()


def test_nonfinite_values_are_counted_per_site(tmp_path):
    root = new_store(tmp_path / "store")
    data = site_data(3)
    data["blocks.0/block"][:5, 0] = np.nan
    data["norm/output"][10, :] = np.inf
    write_all(root, data)
    assert storage.model_attrs(root, "m")["nonfinite"] == {"blocks.0/block": 5, "norm/output": 3}


def test_similarity_and_analyses_round_trip(tmp_path):
    root = new_store(tmp_path / "store")
    ids = ["vit/blocks.0/attn", "vit/blocks.0/mlp", "mae/blocks.0/attn"]
    values = np.arange(9, dtype=np.float64).reshape(3, 3)
    matrix = xr.DataArray(values, dims=("site_a", "site_b"), coords={"site_a": ids, "site_b": ids},
                          attrs={"kernel": "linear", "n": np.int64(5), "reasons": {"x": None}})
    storage.write_similarity(root, "linear_biased", matrix)
    assert storage.list_similarity(root) == ["linear_biased"]
    cka = storage.open_similarity(str(tmp_path / "store"), "linear_biased")
    assert float(cka.sel(model_a="vit", layer_a="blocks.0", sublayer_a="mlp", model_b="mae", layer_b="blocks.0", sublayer_b="attn")) == 5
    assert cka.attrs == {"kernel": "linear", "n": 5, "reasons": {"x": None}}
    storage.write_similarity(root, "copy", cka)  # MultiIndexed input round-trips too
    np.testing.assert_array_equal(storage.open_similarity(root, "copy").values, values)

    result = xr.Dataset({"acc": (("point",), [0.5, 0.25])},
                        coords={"model": ("point", ["a", "b"]), "site": ("point", ["x/y", "z/w"])}).set_index(
        point=["model", "site"])
    storage.write_analysis(root, "probes", result.assign_attrs(n_test=4))
    back = storage.read_analysis(root, "probes").load()
    assert back.attrs == {"n_test": 4}
    assert float(back["acc"].sel(model="b", site="z/w")) == 0.25
    with pytest.raises(storage.StoreError, match="analysis 'agreement' is missing"):
        storage.read_analysis(root, "agreement")


# ------------------------------------------------------------------ errors

def test_clear_errors_for_foreign_missing_and_other_schema(tmp_path):
    with pytest.raises(storage.StoreError, match="no run store at"):
        storage.open_store(str(tmp_path / "absent"), mode="r")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(storage.StoreError, match="not a ckaflow run store"):
        storage.open_store(str(foreign))
    assert (foreign / "notes.txt").read_text() == "hello"
    plain = zarr.open_group(str(tmp_path / "plain"), mode="w", zarr_format=3)
    plain.create_group("something")
    with pytest.raises(storage.StoreError, match="without a ckaflow schema version"):
        storage.open_store(str(tmp_path / "plain"))
    root = new_store(tmp_path / "store")
    root.attrs["ckaflow_schema"] = 99
    with pytest.raises(storage.StoreError, match="schema version 99"):
        storage.open_store(str(tmp_path / "store"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "zarr.json").write_text("{not json")
    with pytest.raises(storage.StoreError, match="cannot open the run store"):
        storage.open_store(str(corrupt))


def test_missing_models_samples_and_incomplete_models(tmp_path):
    root = storage.open_store(str(tmp_path / "store"))
    with pytest.raises(storage.StoreError, match="run the sample stage first"):
        storage.read_samples(root)
    storage.write_samples(root, make_samples())
    with pytest.raises(storage.StoreError, match="no activations of model 'vit'"):
        storage.activation_arrays(root, "vit")
    with storage.ActivationWriter(root, "m", WIDTHS, N, shard_size=SHARD, fingerprint="fp") as writer:
        writer.write_shard(0, {site: x[:SHARD] for site, x in site_data().items()})
    with pytest.raises(storage.StoreError, match="only 1/7 shards extracted"):
        storage.open_activations(root, "m")
    with pytest.raises(storage.StoreError, match="similarity matrix 'linear_biased' is missing"):
        storage.open_similarity(root, "linear_biased")
    with pytest.raises(storage.StoreError, match="expected shape"):
        with storage.ActivationWriter(root, "m", WIDTHS, N, shard_size=SHARD, fingerprint="fp") as writer:
            writer.write_shard(1, {site: x[:3] for site, x in site_data().items()})
    with pytest.raises(storage.StoreError, match="not a valid store name"):
        storage.ActivationWriter(root, "m", {"_done/x": 3}, N, shard_size=SHARD, fingerprint="fp")


def test_fingerprint_change_replaces_and_same_fingerprint_resumes(tmp_path):
    root = new_store(tmp_path / "store")
    write_all(root, site_data(0))
    with storage.ActivationWriter(root, "m", WIDTHS, N, shard_size=SHARD, fingerprint="fp") as writer:
        assert writer.pending_shards() == []
    with storage.ActivationWriter(root, "m", WIDTHS, N, shard_size=SHARD, fingerprint="fp2") as writer:
        assert writer.pending_shards() == list(range(7))
    assert storage.model_progress(root, "m") == (0, 7)


def test_a_model_deletion_killed_halfway_is_redone_not_reused(tmp_path, monkeypatch):
    """A kill during `delete_model` (e.g. of a `--refresh extract`) must not leave arrays that look
    complete: the group's attributes go first, and a writer rebuilds a group that lacks arrays."""
    root = new_store(tmp_path / "store")
    write_all(root, site_data(0))
    group = root["activations/m"]
    deleted = []

    def killed(self, key):   # the process dies after the first array is gone
        deleted.append(key)
        raise KeyboardInterrupt

    monkeypatch.setattr(zarr.Group, "__delitem__", killed)
    with pytest.raises(KeyboardInterrupt):
        storage.delete_model(root, "m")
    monkeypatch.undo()
    assert deleted and "initialized" not in dict(storage.open_store(str(tmp_path / "store"))["activations/m"].attrs)
    del group["_done"]       # what the killed deletion had already removed, in any order
    with storage.ActivationWriter(root, "m", WIDTHS, N, shard_size=SHARD, fingerprint="fp") as writer:
        assert writer.pending_shards() == list(range(7))
    write_all(root, site_data(0))
    np.testing.assert_array_equal(stored(root)["blocks.0/attn"], site_data(0)["blocks.0/attn"])


def test_status_reports_progress_and_matrices(tmp_path):
    root = new_store(tmp_path / "store")
    write_all(root, site_data())
    with storage.ActivationWriter(root, "half", WIDTHS, N, shard_size=SHARD, fingerprint="fp") as writer:
        writer.write_shard(2, {site: x[16:24] for site, x in site_data().items()})
    storage.write_similarity(root, "linear_biased", xr.DataArray(
        np.eye(2), dims=("site_a", "site_b"), coords={"site_a": ["m/a/b", "m/c/d"], "site_b": ["m/a/b", "m/c/d"]}))
    status = store_status(str(tmp_path / "store"))
    models = {m["name"]: m for m in status["models"]}
    assert (models["m"]["done"], models["half"]["done"], models["half"]["total"]) == (7, 1, 7)
    assert models["m"]["bytes"] > 0 and status["similarity"] == [{"name": "linear_biased", "shape": [2, 2]}]
    from rich.console import Console
    console = Console(record=True, width=120)
    console.print(render_status(str(tmp_path / "store")))
    text = console.export_text()
    assert "1/7 (resume: re-run extract)" in text and "complete, 2 x 2 sites" in text


def test_models_are_listed_in_config_order(tmp_path):
    """list_models, `ckaflow status` and the public API list models as the latest run's config does, then
    models only earlier runs had, then models no run recorded (by name)."""
    import ckaflow

    root = new_store(tmp_path / "store")
    for model in ("zeta", "alpha", "mid", "beta"):
        write_all(root, site_data(), model=model)
    assert storage.list_models(root) == ["alpha", "beta", "mid", "zeta"]  # no run recorded yet
    for names in (["mid", "alpha"], ["zeta", "alpha", "gamma"]):
        storage.begin_run(root, config={"models": [{"name": name} for name in names]})
    expected = ["zeta", "alpha", "mid", "beta"]
    assert storage.list_models(root) == ckaflow.list_models(str(tmp_path / "store")) == expected
    assert [m["name"] for m in store_status(str(tmp_path / "store"))["models"]] == expected


# ------------------------------------------------------------------ crashes and concurrency

WRITER_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    import storage
    from test_storage import WIDTHS, N, SHARD, site_data
    root = storage.open_store({store!r})
    shards = {shards!r}
    data = site_data(0)
    with storage.ActivationWriter(root, "m", WIDTHS, N, shard_size=SHARD, fingerprint="fp") as writer:
        pending = writer.pending_shards(shards)
        print("claimed", flush=True)
        if {go!r}:
            sys.stdin.readline()  # the test's go-ahead
        time.sleep({hold!r})
        for shard in pending:
            start, stop = writer.shard_bounds(shard)
            writer.write_shard(shard, {{site: x[start:stop] for site, x in data.items()}})
""")


def spawn_writer(store: Path, shards: list[int] | None = None, hold: float = 0.0, go: bool = False) -> subprocess.Popen:
    """A writer process of model "m" in `store`: prints "claimed" once it holds its shards' locks, then (`go`:
    once it reads a line on stdin) waits `hold` seconds and writes them."""
    script = WRITER_CHILD.format(tests=str(Path(__file__).parent), store=str(store), shards=shards, hold=hold, go=go)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.PIPE if go else None, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path):
    reference = new_store(tmp_path / "reference")
    write_all(reference, site_data(0))
    expected = stored(reference)
    rng = random.Random(0)
    # The four writers start at once (their interpreters start side by side); each writes on the go-ahead.
    roots = [new_store(tmp_path / f"killed{trial}") for trial in range(4)]
    children = [spawn_writer(tmp_path / f"killed{trial}", go=True) for trial in range(4)]
    try:
        for root, child in zip(roots, children, strict=True):
            assert child.stdout.readline().strip() == "claimed"
            child.stdin.write("go\n")
            child.stdin.flush()
            time.sleep(rng.uniform(0.0, 0.4))
            child.send_signal(signal.SIGKILL)
            child.wait()
            done = np.asarray(root["activations/m/_done"][:]).astype(bool)
            arrays = storage.activation_arrays(root, "m", require_complete=False)
            for shard in np.flatnonzero(done):  # a shard marked done never holds partial data
                rows = slice(shard * SHARD, min((shard + 1) * SHARD, N))
                for site, array in arrays.items():
                    np.testing.assert_array_equal(np.asarray(array[rows]), expected[site][rows])
            write_all(root, site_data(0))  # resume: the dead writer's locks are stale and broken
            assert storage.model_progress(root, "m") == (7, 7)
            got = stored(root)
            for site in WIDTHS:
                assert got[site].tobytes() == expected[site].tobytes()
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def test_four_processes_write_disjoint_shards_concurrently(tmp_path):
    root = new_store(tmp_path / "store")
    storage.ActivationWriter(root, "m", WIDTHS, N, shard_size=SHARD, fingerprint="fp").close()
    children = [spawn_writer(tmp_path / "store", shards) for shards in ([0, 4], [1, 5], [2, 6], [3])]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    expected = site_data(0)
    for site, x in stored(root).items():
        np.testing.assert_array_equal(x, expected[site])


def test_second_writer_of_same_shards_is_refused_until_owner_dies(tmp_path):
    root = new_store(tmp_path / "store")
    owner = spawn_writer(tmp_path / "store", hold=60.0)
    try:
        assert owner.stdout.readline().strip() == "claimed"
        with storage.ActivationWriter(root, "m", WIDTHS, N, shard_size=SHARD, fingerprint="fp") as writer:
            with pytest.raises(storage.StoreError, match=rf"being written by another run .*pid {owner.pid} on"):
                writer.pending_shards([2, 3])
            assert writer.pending_shards([]) == []
        with pytest.raises(storage.StoreError, match="refusing to replace"):
            storage.ActivationWriter(root, "m", WIDTHS, N, shard_size=SHARD, fingerprint="other")
    finally:
        owner.kill()
        owner.wait()
    write_all(root, site_data(0))  # its locks are stale now
    assert storage.model_progress(root, "m") == (7, 7)


def test_lock_of_another_host_needs_explicit_break(tmp_path):
    root = new_store(tmp_path / "store")
    storage.ActivationWriter(root, "m", WIDTHS, N, shard_size=SHARD, fingerprint="fp").close()
    lock = {"host": f"not-{socket.gethostname()}", "pid": 1, "process_started": 0.0,
            "created": time.time() - 3600, "token": "elsewhere"}
    (tmp_path / "store" / LOCKS / "m").mkdir(parents=True, exist_ok=True)
    (tmp_path / "store" / LOCKS / "m" / "shard-0.lock").write_text(json.dumps(lock))
    with pytest.raises(storage.StoreError, match="3600 s old.*--break-locks"):
        write_all(root, site_data(0))
    write_all(root, site_data(0), break_locks=True)
    assert storage.model_progress(root, "m") == (7, 7)
