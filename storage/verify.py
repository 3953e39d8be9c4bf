"""`ckaflow status --verify`: is the run store consistent? Every done flag must have its data, every
recorded fingerprint must be the one its recorded inputs give, and every result's inputs must be the
ones stored beside it. Results left by earlier configurations, whose inputs have since been replaced,
are not errors: they are listed as stale (a run of their configuration recomputes them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zarr

from storage.activations import list_models, model_attrs
from storage.fingerprints import FINGERPRINT, INPUTS, fingerprint, recorded_fingerprint
from storage.layout import DONE, NONFINITE, model_path, shard_bounds, site_path, split_site_id
from storage.records import is_complete
from storage.results import ANALYSES, SIMILARITY, list_similarity
from storage.runs import last_successful_run
from storage.samples import SAMPLES
from storage.store import open_store


@dataclass
class Verification:
    """The outcome of `verify_store`: `errors` (inconsistencies) and `stale` (outdated results), one line each."""

    errors: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _check_shards(root: zarr.Group, model: str, result: Verification) -> None:
    """Every shard marked done holds data: its non-finite count per site equals the recorded one
    (rows never written read as NaN)."""
    group, attrs = root[model_path(model)], dict(root[model_path(model)].attrs)
    done = np.asarray(group[DONE][:]).astype(bool)
    recorded = np.asarray(group[NONFINITE][:])
    size, n = int(attrs["shard_size"]), int(attrs["n_samples"])
    for shard in np.flatnonzero(done):
        start, stop = shard_bounds(shard, n, size)
        for i, site in enumerate(attrs["sites"]):
            values = np.asarray(root[site_path(model, site)][start:stop])
            found = int(values.size - np.isfinite(values).sum())
            if found != int(recorded[shard, i]):
                result.errors.append(f"activations/{model}/{site}: shard {shard} is marked done but holds {found} "
                                     f"non-finite values where {int(recorded[shard, i])} were written "
                                     "(data missing or damaged)")


def _check_recorded(root: zarr.Group, path: str, result: Verification) -> dict | None:
    """The recorded inputs of the result at `path`, after checking that they give its fingerprint."""
    attrs = root[path].attrs
    if FINGERPRINT not in attrs or INPUTS not in attrs:
        result.errors.append(f"{path}: complete but without a recorded fingerprint")
        return None
    inputs = dict(attrs[INPUTS])
    if fingerprint(inputs) != attrs[FINGERPRINT]:
        result.errors.append(f"{path}: recorded fingerprint {attrs[FINGERPRINT]} is not the one of its recorded "
                             f"inputs ({fingerprint(inputs)})")
    return inputs


def _stale_inputs(path: str, wanted: list, stored: dict[str, str], result: Verification) -> None:
    changed = [model for model, fp in wanted if stored.get(model) != fp]
    if changed:
        result.stale.append(f"{path}: computed from activations no longer stored ({', '.join(changed)})")


def verify_store(store: str | zarr.Group) -> Verification:
    """Check the consistency of a run store (reads every done shard of every model)."""
    root = open_store(store, mode="r")
    result = Verification()
    samples_fp = recorded_fingerprint(root, SAMPLES)
    if SAMPLES in root and samples_fp is None:
        result.errors.append("samples/: incomplete or without a fingerprint")
    models = {}
    for model in list_models(root):
        attrs = model_attrs(root, model)
        models[model] = attrs["fingerprint"]
        if attrs.get("samples_fingerprint") != samples_fp:
            result.stale.append(f"activations/{model}: extracted from the sample {attrs.get('samples_fingerprint')}, "
                                f"not the stored one ({samples_fp})")
        _check_shards(root, model, result)
    matrices = {}
    for name in list_similarity(root):
        path = f"{SIMILARITY}/{name}"
        inputs = _check_recorded(root, path, result)
        if inputs is None:
            continue
        matrices[name] = root[path].attrs[FINGERPRINT]
        wanted = [tuple(pair) for pair in inputs["activations"]]
        sites = [str(s) for s in root[f"{path}/site_a"][:]]
        if list(dict.fromkeys(split_site_id(s)[0] for s in sites)) != [m for m, _ in wanted]:
            result.errors.append(f"{path}: its sites are of models {sorted({split_site_id(s)[0] for s in sites})}, "
                                 f"its recorded inputs of {[m for m, _ in wanted]}")
        _stale_inputs(path, wanted, models, result)
    if is_complete(root, ANALYSES):
        inputs = _check_recorded(root, ANALYSES, result)
        if inputs is not None:
            _stale_inputs(ANALYSES, [tuple(p) for p in inputs["activations"]], models, result)
            if inputs["samples"] != samples_fp:
                result.stale.append(f"{ANALYSES}: computed from the sample {inputs['samples']}, not the stored one")
            changed = [n for n, fp in inputs["similarity"].items() if matrices.get(n) != fp]
            if changed:
                result.stale.append(f"{ANALYSES}: computed from matrices no longer stored ({', '.join(changed)})")
    expected = last_successful_run(root).get("fingerprints")
    if expected:
        missing = [f"activations/{m}" for m, fp in expected["models"].items() if models.get(m) != fp]
        missing += [f"{SIMILARITY}/{n}" for n, fp in expected["similarity"].items() if matrices.get(n) != fp]
        if missing:
            result.stale.append(f"last successful run: results no longer in the store: {', '.join(missing)}")
    return result
