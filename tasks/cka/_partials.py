"""Resume support: each finished task's partial sums persisted as one array in a Zarr group.

Layout of the group (e.g. similarity/<name>/partials in the run store):
- attrs["plan"]: a JSON description of everything that produced the sums (digest of the stored bytes
  of every site, method, kernel, estimator, precision, blocks, sites, means and scales, RBF
  bandwidths); a group holding another plan's partials is cleared before use, and why is logged;
- one float64 array per finished task, named by the task, of shape (S, S + sum of block lengths):
  the products, then each row-sum and diagonal block; attrs["blocks"] lists [kind, start, length] and
  attrs["done"] is set last, so a task killed while writing is simply recomputed.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tasks.cka._sums import Sums

log = logging.getLogger(__name__)


class Partials:
    """Finished tasks' partial sums in a Zarr group, valid for exactly one plan."""

    def __init__(self, group: Any, plan: dict):
        self.group = group
        stored = group.attrs.get("plan")
        if stored != plan:
            if stored is not None and self.done():
                changed = sorted(k for k in {*stored, *plan} if stored.get(k) != plan.get(k))
                log.warning("CKA partial sums in %s discarded (%d tasks), computing afresh: they were produced "
                            "with other %s", group.path, len(self.done()), ", ".join(changed))
            self.clear()
            group.attrs["plan"] = plan

    def done(self) -> set[str]:
        """Names of the tasks whose sums are completely stored."""
        return {name for name, array in self.group.arrays() if array.attrs.get("done")}

    def save(self, name: str, sums: Sums) -> None:
        """Persist one task's partial sums (overwriting an incomplete earlier attempt)."""
        layout, pieces = [], [sums.products]
        for kind, blocks in (("rows", sums.rows), ("diag", sums.diag)):
            for start, values in sorted(blocks.items()):
                layout.append([kind, int(start), int(values.shape[1])])
                pieces.append(values)
        data = np.concatenate(pieces, axis=1)
        array = self.group.create_array(name, shape=data.shape, dtype="float64", chunks=data.shape,
                                        compressors=None, overwrite=True)
        array[...] = data
        array.attrs.update({"blocks": layout, "done": True})

    def load(self, name: str) -> Sums:
        """The partial sums of one finished task."""
        array = self.group[name]
        data = np.asarray(array[...])
        n_sites = data.shape[0]
        sums = Sums(data[:, :n_sites].copy())
        column = n_sites
        for kind, start, length in array.attrs["blocks"]:
            getattr(sums, kind)[int(start)] = data[:, column:column + length].copy()
            column += length
        return sums

    def clear(self) -> None:
        """Delete every stored partial sum."""
        for name in [name for name, _ in self.group.members()]:
            del self.group[name]
