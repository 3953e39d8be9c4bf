"""Stage 2, extraction: models (timm, import-path factories, in-memory modules; local checkpoints), the sites hooked inside them, reductions of their
tensors, and `extract_model`, which runs one model over the sample into the run store.

Where things are: `models` (build_model, fingerprints, preprocessing), `checkpoints` (released key layouts
remapped to timm's), `sites` (presets, globs, hooks: how a site is tapped), `reductions`, `devices`, `run`;
`options` (site presets, reduction names, ExtractOptions) needs no torch. Names are imported on first use
(`storage.lazy`), so the config schema's check of a reduction or preset imports no torch.
"""

from storage.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "checkpoints": ("FORMATS", "CheckpointError", "LoadReport", "detect_format", "load_checkpoint", "read_checkpoint"),
    "devices": ("resolve_device",),
    "models": ("ModelError", "build_model", "data_config", "describe_preprocessing", "file_sha256", "input_size",
               "model_fingerprint", "preprocessing", "register_module", "state_dict_sha256"),
    "options": ("SITE_PRESETS", "ExtractOptions", "ReductionError", "check_reduction"),
    "reductions": ("feature_width", "reduce", "reductions_for"),
    "run": ("AUTOCAST", "ModelSpec", "extract_model", "is_conv_net", "resolve_autocast"),
    "sites": ("Site", "SiteError", "list_sites", "resolve_sites", "tap_sites"),
})
