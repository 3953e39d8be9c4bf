"""The run store: one Zarr v3 group holding samples/, activations/, similarity/, analyses/, report/.

Every stage reads and writes the store only through these functions; see ../shared/DESIGN.md.
Names are imported on first use (`storage.lazy`): the size parser (`sizes`) costs no zarr, xarray or dask."""

from storage.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "activations": ("activation_arrays", "list_models", "model_attrs", "model_progress", "open_activations",
                    "shard_digests"),
    "errors": ("StoreError",),
    "fingerprints": ("fingerprint", "record_fingerprint", "recorded_fingerprint"),
    "layout": ("shard_bounds", "shard_count", "site_ids", "site_index", "split_site_id"),
    "maintenance": ("delete_analyses", "delete_model", "delete_samples", "delete_similarity", "run_lock", "wipe"),
    "records": ("json_safe",),
    "reports": ("forget_report", "record_report", "report_exists", "report_fingerprint", "report_index"),
    "results": ("STDERR_SUFFIX", "list_analyses", "list_similarity", "open_similarity", "partials_group",
                "read_analysis", "write_analysis", "write_similarity"),
    "runs": ("FAILED", "SUCCEEDED", "begin_run", "last_successful_run", "run_history", "update_run"),
    "samples": ("read_samples", "samples_fingerprint", "write_samples"),
    "sizes": ("format_size", "parse_size"),
    "store": ("SCHEMA_VERSION", "open_store", "store_url"),
    "verify": ("Verification", "verify_store"),
    "writer": ("ActivationWriter",),
})
