"""Stage 4, analyses: what explains the CKA maps.

`maps` (matched depth curves and their bootstrap bands, sublayer attribution, target alignment, fine-tuning
comparison), `crossarch` (best-matching and depth-aligned CKA for model pairs with different site names),
`probes` (per-site linear probes), `agreement` (of the models' class predictions), and `run`
(`run_analyses`: store in, analyses/ out).
"""

from tasks.analyses.agreement import AGREEMENT_VARS, agreement_matrix, pair_agreement
from tasks.analyses.crossarch import crossarch_cka, crossarch_pairs
from tasks.analyses.maps import (
                                 attribution_by_type,
                                 bootstrap_band,
                                 finetuning_comparison,
                                 flat_matrix,
                                 last_site_agreement,
                                 matched_depth,
                                 matched_sites,
                                 model_pairs,
                                 site_coords,
                                 sublayer_attribution,
                                 sublayer_type,
                                 target_alignment,
                                 target_features,
)
from tasks.analyses.probes import (
                                 ProbeResult,
                                 choose_backend,
                                 probe_in_memory,
                                 probe_site,
                                 probe_sites,
                                 probe_streaming,
                                 split_by_image,
)
from tasks.analyses.run import compute_analyses, run_analyses, site_order

__all__ = [
    "AGREEMENT_VARS", "ProbeResult", "agreement_matrix", "attribution_by_type", "bootstrap_band", "choose_backend",
    "compute_analyses", "crossarch_cka", "crossarch_pairs", "finetuning_comparison", "flat_matrix", "last_site_agreement", "matched_depth",
    "matched_sites", "model_pairs", "pair_agreement", "probe_in_memory", "probe_site", "probe_sites",
    "probe_streaming", "run_analyses", "site_coords", "site_order", "split_by_image", "sublayer_attribution",
    "sublayer_type", "target_alignment", "target_features",
]
