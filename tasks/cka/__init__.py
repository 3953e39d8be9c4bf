"""CKA: the float64 reference and the exact, out-of-core, all-pairs engine with its minibatch estimate.

- `cka`, `gram`, `hsic` (`reference`): the slow float64 oracle, straight from the formulas.
- `cka_matrix` (`exact`): every site pair in one pass; methods `blocked` (`grams`: stacked block Grams,
  any kernel), `features` (`features`: cross-products of centred features, linear kernel), `auto`.
- `minibatch_cka_matrix` (`minibatch`, `shuffle`): averaged unbiased HSIC over seeded minibatches.
- `update_similarity` (`stage`): one configured matrix computed into the run store, reusing stored entries
  of unchanged models (`known`) and resuming from stored partial sums (`partials`).
Machinery: `plan` (block sizes from the memory budget), `sources` (inputs and first pass), `sums`,
`passes`, `execute` (Dask map-reduce).
"""

from tasks.cka.exact import cka_matrix
from tasks.cka.known import IncompatibleKnownError
from tasks.cka.minibatch import minibatch_cka_matrix
from tasks.cka.plan import parse_size
from tasks.cka.reference import KERNELS, DegenerateSiteWarning, cka, gram, hsic
from tasks.cka.stage import VIEWS, Views, reusable, select_rows, site_arrays, update_similarity, view_rows

__all__ = [
    "KERNELS", "DegenerateSiteWarning", "IncompatibleKnownError", "cka", "cka_matrix", "gram", "hsic",
    "VIEWS", "Views", "minibatch_cka_matrix", "parse_size", "reusable", "select_rows", "site_arrays", "update_similarity",
    "view_rows",
]
