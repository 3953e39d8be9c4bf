"""The options of one CKA matrix, as the similarity stage's door takes them: a frozen record built once from
the config (sizes already in bytes). Cheap to import: no numpy, dask or zarr."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Views = Literal["clean", "all"]
VIEWS = ("clean", "all")
RBF_MEDIAN_SAMPLES = 4096
DEFAULT_BUDGET = 2 * 2**30

# what the matrix's values depend on (its fingerprint); memory_budget and device change only how it is computed
SETTINGS = ("kernel", "estimator", "method", "rbf_threshold", "rbf_median_samples", "batch_size", "seed", "views")


@dataclass(frozen=True)
class CkaOptions:
    """How one matrix is computed: kernel, HSIC estimator, method (auto, blocked, features, minibatch), the RBF
    bandwidth and its median's sample, the minibatch size and seed, the rows (views), the Gram precision, the
    memory budget in bytes and the device."""

    kernel: Literal["linear", "rbf"] = "linear"
    estimator: Literal["biased", "unbiased"] = "biased"
    method: Literal["auto", "blocked", "features", "minibatch"] = "auto"
    rbf_threshold: float = 0.5
    rbf_median_samples: int = RBF_MEDIAN_SAMPLES
    batch_size: int = 256
    seed: int = 0
    views: Views = "clean"
    precision: Literal["float32", "float64"] = "float32"
    memory_budget: int = DEFAULT_BUDGET
    device: str = "auto"

    @property
    def unbiased(self) -> bool:
        return self.estimator == "unbiased"

    def settings(self) -> dict[str, Any]:
        """The settings the matrix's values depend on (what its fingerprint records)."""
        return {key: value for key, value in asdict(self).items() if key in SETTINGS}
