"""ckaflow for notebooks and scripts: where inside vision networks do representations agree?

    import ckaflow
    result = ckaflow.compare(models={"a": module_a, "b": module_b}, images="path/to/imagefolder")
    result.similarity["linear_biased"].sel(model_a="a", model_b="b")

Reading a run store (a path, an fsspec URL or an opened store, alike): `open_similarity`,
`open_activations`, `read_analysis`, `read_samples`, `list_models`, `list_similarity`, `list_analyses`.
CKA on arrays: `cka` (two feature matrices), `cka_matrix` (every pair of sites, exact and out of core),
`minibatch_cka_matrix`.
"""

import flows.environment  # noqa: F401  (the environment defaults, before Prefect is imported)
from ckaflow.api import Comparison, compare
from storage import (
    list_analyses,
    list_models,
    list_similarity,
    open_activations,
    open_similarity,
    open_store,
    read_analysis,
    read_samples,
)
from tasks.cka import cka, cka_matrix, minibatch_cka_matrix

__all__ = [
    "Comparison", "cka", "cka_matrix", "compare", "list_analyses", "list_models", "list_similarity",
    "minibatch_cka_matrix", "open_activations", "open_similarity", "open_store", "read_analysis", "read_samples",
]
