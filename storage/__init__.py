"""The run store: one Zarr v3 group holding samples/, activations/, similarity/, analyses/, report/.

Every stage reads and writes the store only through these functions; see ../shared/DESIGN.md."""

from storage.activations import (
    activation_arrays,
    list_models,
    model_attrs,
    model_progress,
    open_activations,
    shard_digests,
)
from storage.errors import StoreError
from storage.fingerprints import fingerprint, record_fingerprint, recorded_fingerprint
from storage.layout import site_ids, site_index, split_site_id
from storage.maintenance import delete_analyses, delete_model, delete_samples, delete_similarity, run_lock, wipe
from storage.records import json_safe
from storage.results import (
    STDERR_SUFFIX,
    list_analyses,
    list_similarity,
    open_similarity,
    partials_group,
    read_analysis,
    write_analysis,
    write_similarity,
)
from storage.runs import FAILED, SUCCEEDED, begin_run, last_successful_run, run_history, update_run
from storage.samples import read_samples, samples_fingerprint, write_samples
from storage.store import SCHEMA_VERSION, open_store, store_url
from storage.verify import Verification, verify_store
from storage.writer import ActivationWriter

__all__ = [
    "FAILED", "SCHEMA_VERSION", "STDERR_SUFFIX", "SUCCEEDED", "begin_run", "fingerprint", "last_successful_run",
    "record_fingerprint", "recorded_fingerprint", "run_history", "update_run", "Verification", "verify_store", "ActivationWriter", "StoreError", "activation_arrays", "delete_analyses", "delete_model",
    "delete_samples", "delete_similarity", "json_safe", "list_analyses", "run_lock", "wipe",
    "list_models", "list_similarity", "model_attrs", "model_progress", "open_activations", "open_similarity",
    "open_store", "partials_group", "read_analysis", "read_samples", "samples_fingerprint", "site_ids",
    "shard_digests", "site_index", "split_site_id", "store_url", "write_analysis", "write_samples", "write_similarity",
]
