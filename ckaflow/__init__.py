"""ckaflow for notebooks and scripts: where inside vision networks do representations agree?

    import ckaflow
    result = ckaflow.compare(models={"a": module_a, "b": module_b}, images="path/to/imagefolder")
    result.similarity["linear_biased"].sel(model_a="a", model_b="b")

Reading a run store (a path, an fsspec URL or an opened store, alike): `open_similarity`,
`open_activations`, `read_analysis`, `read_samples`, `list_models`, `list_similarity`, `list_analyses`.
CKA on arrays: `cka` (two feature matrices), `cka_matrix` (every pair of sites, exact and out of core),
`minibatch_cka_matrix`.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ckaflow.api import Comparison, compare  # noqa: E402
from storage import (  # noqa: E402
    list_analyses,
    list_models,
    list_similarity,
    open_activations,
    open_similarity,
    open_store,
    read_analysis,
    read_samples,
)
from tasks.cka import cka, cka_matrix, minibatch_cka_matrix  # noqa: E402

__all__ = [
    "Comparison", "cka", "cka_matrix", "compare", "list_analyses", "list_models", "list_similarity",
    "minibatch_cka_matrix", "open_activations", "open_similarity", "open_store", "read_analysis", "read_samples",
]
