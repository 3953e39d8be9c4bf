"""CKA: the float64 reference and the exact, out-of-core, all-pairs engine with its minibatch estimate.

- `cka`, `gram`, `hsic` (`reference`): the slow float64 oracle, straight from the formulas.
- `cka_matrix` (`exact`): every site pair in one pass; methods `blocked` (stacked block Grams, any kernel),
  `features` (cross-products of centred features, linear kernel), `auto`.
- `minibatch_cka_matrix` (`minibatch`): averaged unbiased HSIC over seeded minibatches.
- `update_similarity` (`stage`): one configured matrix (`CkaOptions`, `options`) computed into the run store,
  reusing stored entries of unchanged models and resuming from stored partial sums.
Machinery, in `_`-prefixed modules: `_plan` (block sizes from the memory budget; pure arithmetic), `_sources`
(inputs and first pass), `_grams`, `_features`, `_sums`, `_passes`, `_execute` (Dask map-reduce), `_known`
(reuse of stored entries), `_partials` (resume), `_shuffle` (the minibatch copy). Names are imported on first
use (`storage.lazy`).
"""

from storage.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "exact": ("cka_matrix",),
    "_known": ("IncompatibleKnownError",),
    "minibatch": ("minibatch_cka_matrix",),
    "reference": ("KERNELS", "DegenerateSiteWarning", "cka", "gram", "hsic"),
    "options": ("VIEWS", "CkaOptions", "Views"),
    "stage": ("reusable", "select_rows", "site_arrays", "update_similarity", "view_rows"),
})
