"""Stage 2, extraction: models (timm, import-path factories, in-memory modules; local checkpoints), the sites hooked inside them, reductions of their
tensors, and `extract_model`, which runs one model over the sample into the run store.

Where things are: `models` (build_model, fingerprints, preprocessing), `checkpoints` (released key layouts
remapped to timm's), `sites` (presets, globs, hooks: how a site is tapped), `reductions`, `devices`, `run`.
"""

from tasks.extract.checkpoints import (
                                  FORMATS,
                                  CheckpointError,
                                  LoadReport,
                                  detect_format,
                                  load_checkpoint,
                                  read_checkpoint,
)
from tasks.extract.devices import resolve_device
from tasks.extract.models import (
                                  ModelError,
                                  build_model,
                                  data_config,
                                  file_sha256,
                                  input_size,
                                  model_fingerprint,
                                  preprocessing,
                                  register_module,
                                  state_dict_sha256,
)
from tasks.extract.reductions import ReductionError, check_reduction, feature_width, reduce, reductions_for
from tasks.extract.run import AUTOCAST, ExtractOptions, ModelSpec, extract_model, is_conv_net, resolve_autocast
from tasks.extract.sites import PRESETS as SITE_PRESETS, Site, SiteError, list_sites, resolve_sites, tap_sites

__all__ = [
    "AUTOCAST", "FORMATS", "SITE_PRESETS", "CheckpointError", "ExtractOptions", "LoadReport", "ModelError", "ModelSpec",
    "ReductionError", "Site", "SiteError", "build_model", "check_reduction", "data_config", "detect_format",
    "extract_model", "feature_width", "file_sha256", "input_size", "is_conv_net", "list_sites", "load_checkpoint",
    "model_fingerprint", "preprocessing", "read_checkpoint", "reduce", "reductions_for", "register_module",
    "resolve_autocast", "resolve_device", "resolve_sites", "state_dict_sha256", "tap_sites",
]
