"""Linear probes per site: multinomial logistic regression on each site's features, test accuracy per site.

`protocol` (the splits by image, the standardisation, the principal basis), `_lbfgs` (the batched
optimiser: one L-BFGS per site), `solvers` (batched L-BFGS, streaming SGD, closed-form ridge), `fanout`
(groups within the memory budget, Dask tasks), `sites` (`probe_sites`: every site, one dataset).
"""

from tasks.analyses.probes.sites import probe_sites

__all__ = ["probe_sites"]
