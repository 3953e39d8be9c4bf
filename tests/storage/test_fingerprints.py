"""What produced each stored result: fingerprints, the run history and the store-consistency checker."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import storage
from storage.layout import model_path
from tests.storage.test_storage import (
    SHARD,
    WIDTHS,
    N,
    make_samples,
    new_store,
    site_data,
)


def write_model(root, model: str = "m", samples_fingerprint: str = "samples-0", shards: list[int] | None = None) -> None:
    data = site_data()
    with storage.ActivationWriter(root, model, WIDTHS, N, shard_size=SHARD, fingerprint=f"fp-{model}",
                                  attrs={"samples_fingerprint": samples_fingerprint}) as writer:
        for shard in writer.pending_shards(shards):
            start, stop = writer.shard_bounds(shard)
            writer.write_shard(shard, {site: x[start:stop] for site, x in data.items()})


def test_fingerprint_is_canonical_and_recorded_only_for_complete_results(tmp_path):
    assert storage.fingerprint({"a": 1, "b": [1, 2]}) == storage.fingerprint({"b": (1, 2), "a": np.int64(1)})
    assert storage.fingerprint({"a": 1}) != storage.fingerprint({"a": 2})
    root = new_store(tmp_path / "s")
    assert storage.recorded_fingerprint(root, "analyses") is None
    root.require_group("analyses")
    assert storage.recorded_fingerprint(root, "analyses") is None  # exists, but not marked complete
    value = storage.record_fingerprint(root, "analyses", {"samples": "samples-0"})
    assert storage.recorded_fingerprint(root, "analyses") == value == storage.fingerprint({"samples": "samples-0"})


def test_a_failed_run_is_recorded_but_never_replaces_the_last_successful_one(tmp_path):
    root = new_store(tmp_path / "s")
    good = storage.begin_run(root, config={"name": "good"}, started="t0")
    storage.update_run(root, good, outcome=storage.SUCCEEDED, stages_done=["sample"], finished="t1")
    bad = storage.begin_run(root, config={"name": "bad"}, started="t2")
    assert storage.last_successful_run(root)["config"] == {"name": "good"}
    storage.update_run(root, bad, outcome=storage.FAILED, finished="t3", error="ValueError: x")
    assert storage.last_successful_run(root) == {"config": {"name": "good"}, "started": "t0", "outcome": "succeeded",
                                                 "stages_done": ["sample"], "stages": {}, "finished": "t1"}
    assert [r["outcome"] for r in storage.run_history(root)] == ["succeeded", "failed"]
    from storage.status import render_status, store_status

    status = store_status(str(tmp_path / "s"))
    assert status["last_success"]["config"]["name"] == "good" and status["last_run"]["outcome"] == "failed"
    from rich.console import Console

    console = Console(width=300, record=True)
    console.print(render_status(str(tmp_path / "s")))
    text = console.export_text()
    assert "last successful run: 'good'" in text and "latest run failed: 'bad'" in text and "ValueError: x" in text


def test_verify_finds_a_done_flag_without_its_data(tmp_path):
    root = new_store(tmp_path / "s")
    write_model(root, shards=[0, 1, 2])
    assert storage.verify_store(root).ok
    root[f"{model_path('m')}/_done"][4] = 1  # planted: shard 4 marked done, never written
    found = storage.verify_store(root)
    assert not found.ok
    assert len(found.errors) == len(WIDTHS) and all("shard 4 is marked done" in e for e in found.errors)


def test_verify_finds_a_fingerprint_that_its_inputs_do_not_give_and_lists_stale_results(tmp_path):
    root = new_store(tmp_path / "s")
    write_model(root)
    ids = [f"m/{site}" for site in WIDTHS]
    storage.write_similarity(root, "linear_biased", xr.DataArray(np.eye(len(ids)), dims=("site_a", "site_b"),
                                                                 coords={"site_a": ids, "site_b": ids}))
    storage.record_fingerprint(root, "similarity/linear_biased", {"activations": [["m", "fp-m"]], "settings": {}})
    assert storage.verify_store(root).ok
    storage.record_fingerprint(root, "similarity/linear_biased", {"activations": [["m", "other"]], "settings": {}})
    found = storage.verify_store(root)
    assert found.ok and found.stale == ["similarity/linear_biased: computed from activations no longer stored (m)"]
    root["similarity/linear_biased"].attrs["fingerprint"] = "0123456789abcdef"
    found = storage.verify_store(root)
    assert len(found.errors) == 1 and "is not the one of its recorded inputs" in found.errors[0]


def test_analyses_refuse_activations_of_another_sample(tmp_path):
    from tasks.analyses import run_analyses

    root = new_store(tmp_path / "s")
    write_model(root, "current")
    write_model(root, "old", samples_fingerprint="samples-1")  # same row count, other sample
    assert not storage.verify_store(root).errors
    assert storage.verify_store(root).stale == [
        "activations/old: extracted from the sample samples-1, not the stored one (samples-0)"]
    with pytest.raises(storage.StoreError, match="model 'old' .* extracted from the sample samples-1"):
        run_analyses(root, models=["current", "old"], similarity=[])
    storage.write_samples(root, make_samples(fingerprint="samples-1"))
    with pytest.raises(storage.StoreError, match="model 'current'"):
        run_analyses(root, similarity=[])
