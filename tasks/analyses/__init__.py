"""Stage 4, analyses: what explains the CKA maps.

`maps` (matched depth curves and their jackknife bands, sublayer attribution, target alignment, fine-tuning
comparison), `crossarch` (best-matching and depth-aligned CKA for model pairs with different site names),
`probes` (per-site linear probes), `agreement` (of the models' class predictions), `options` (the stage's
options, no heavy import) and `run` (`run_analyses`: store in, analyses/ out). Names are imported on first
use (`storage.lazy`).
"""

from storage.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "agreement": ("AGREEMENT_VARS", "agreement_matrix", "pair_agreement"),
    "crossarch": ("crossarch_cka", "crossarch_pairs"),
    "maps": ("attribution_by_type", "finetuning_comparison", "flat_matrix", "jackknife_band", "last_site_agreement",
             "matched_depth", "matched_sites", "model_pairs", "site_coords", "sublayer_attribution", "sublayer_type",
             "target_alignment", "target_features"),
    "options": ("ANALYSES", "AnalysesOptions", "Solver"),
    "probes": ("probe_sites",),
    "run": ("compute_analyses", "run_analyses", "site_order"),
})
