"""Planning for the CKA engine: block sizes from a memory budget, site groups, method choice.

Pure arithmetic, no data access. Memory models count the large buffers one task holds at once:
- blocked (sample space): the stacked block Grams M (S x B x B in the working precision), plus one
  site's two row blocks as float64 and working copies;
- features: the float64 cross-product accumulator of two site groups plus their row chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from storage.sizes import format_size


MIN_BLOCK = 8
SAFETY = 0.5          # fraction of a task's budget the modelled buffers may use (allocator, temporaries)
def itemsize(precision: str) -> int:
    """Bytes per value of a working precision ('float32' or 'float64')."""
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    return 4 if precision == "float32" else 8


def blocked_task_bytes(block: int, n_sites: int, max_dim: int, size: int, chunk_rows: int = 1,
                       stored: int = 8) -> int:
    """Modelled peak bytes of one block-pair task with block size `block`.

    chunk_rows / stored: rows per storage chunk and bytes per stored value; a read of `block` rows
    decodes whole chunks (compressed and decoded bytes in flight besides the result).
    """
    grams = (n_sites + 3) * block * block * size + block * block * 8   # M, RBF temporaries, a float64 sum
    working = 2 * block * max_dim * size                                # the two centred row blocks
    reading = 3 * (block + 2 * chunk_rows) * max_dim * stored            # one read in flight
    return grams + working + reading + 4 * n_sites * block * 8


def block_size_for(budget_per_task: int, n: int, n_sites: int, max_dim: int, precision: str,
                   chunk_rows: int = 1, stored: int = 8) -> int:
    """Largest block size whose block-pair task fits the budget (at least MIN_BLOCK, at most n), in
    whole storage chunks when it spans one or more (so no chunk is decoded for two blocks)."""
    size = itemsize(precision)

    def fits(block: int) -> bool:
        return blocked_task_bytes(block, n_sites, max_dim, size, chunk_rows, stored) <= SAFETY * budget_per_task

    lo, hi = MIN_BLOCK, max(n, MIN_BLOCK)
    if fits(hi):
        return max(1, n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    block = min(lo, max(1, n))
    return block // chunk_rows * chunk_rows if block >= chunk_rows > 1 else block


SITE_READ = 16 * 2**20     # stored bytes per read of the site-major schedule (whole storage chunks)


def site_read_rows(n: int, max_dim: int, chunk_rows: int, stored: int) -> int:
    """Rows per read of the site-major schedule: about SITE_READ stored bytes, in whole storage chunks."""
    rows = max(1, SITE_READ // (max(1, max_dim) * stored))
    if chunk_rows > 1:
        rows = max(chunk_rows, rows // chunk_rows * chunk_rows)
    return min(rows, max(1, n))


def site_major_fits(budget: int, parallel: int, n: int, dims: Sequence[int], precision: str, chunk_rows: int = 1,
                    stored: int = 8) -> bool:
    """Whether the site-major schedule of the blocked path fits `budget`: each of `parallel` tasks holds one
    site's N rows in the working precision, a read in flight and its N x N Gram, while the finished Grams
    gather (counted twice: the reduction's copy and the stack the products are formed from)."""
    size, widest = itemsize(precision), max(dims)
    read = site_read_rows(n, widest, chunk_rows, stored)
    task = n * widest * size + read * widest * (2 * stored + size) + 2 * n * n * size
    gathered = 2 * (len(dims) + 1) * n * n * size
    return parallel * task + gathered <= SAFETY * budget


def site_groups(dims: Sequence[int], parallel: int) -> list[list[int]]:
    """Sites cut, in order, into about 4 groups per parallel task of similar total width (at most one
    group per site), so the tasks balance and each finished group frees its rows."""
    count = min(len(dims), 4 * max(1, parallel))
    target = sum(dims) / count
    groups: list[list[int]] = [[]]
    width = 0.0
    for s, d in enumerate(dims):
        if groups[-1] and width + d / 2 > target * len(groups):
            groups.append([])
        groups[-1].append(s)
        width += d
    return groups


def min_budget(method: str, dims: Sequence[int], precision: str, chunk_rows: int = 1, stored: int = 8) -> int:
    """Smallest budget per task for which `method` ('blocked' or 'features') has a plan: blocks of
    MIN_BLOCK rows, or (features) one site of the widest width per group and MIN_BLOCK-row chunks."""
    size, widest = itemsize(precision), max(dims)
    if method == "features":
        need = 2 * widest * widest * (8 + size) + 2 * MIN_BLOCK * 2 * widest * (8 + 2 * size)
    else:
        need = blocked_task_bytes(MIN_BLOCK, len(dims), widest, size, chunk_rows, stored)
    return math.ceil(need / SAFETY)


def scan_rows(n: int, max_dim: int, chunk_rows: int, stored: int, budget_per_task: int, parallel: int) -> int:
    """Rows per first-pass task: whole storage chunks, as many as one site's rows (stored, a float64
    copy and temporaries) fit the task budget, but no fewer tasks than run at once."""
    chunk_rows = max(1, chunk_rows)
    fit = int(SAFETY * budget_per_task // (max(1, max_dim) * (stored + 16)))
    share = -(-n // max(1, parallel))
    rows = min(fit, share)
    return max(chunk_rows, rows // chunk_rows * chunk_rows, MIN_BLOCK)


def blocks(n: int, block: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering range(n) in steps of `block` (the last one may be shorter)."""
    return [(start, min(start + block, n)) for start in range(0, n, block)]


def feature_group_cap(budget_per_task: int, precision: str) -> int:
    """Most feature columns one site group of the feature-space path may hold."""
    return int(math.sqrt(SAFETY * budget_per_task / (2 * (8 + itemsize(precision)))))


def feature_groups(sites: Sequence[int], dims: Sequence[int], cap: int) -> list[list[int]]:
    """`sites` cut, in order, into groups of at most `cap` features each (every site fits alone)."""
    groups: list[list[int]] = [[]]
    width = 0
    for s in sites:
        if groups[-1] and width + dims[s] > cap:
            groups.append([])
            width = 0
        groups[-1].append(s)
        width += dims[s]
    return [g for g in groups if g]


Item = tuple[list[int], list[int]]


def feature_items(dims: Sequence[int], cap: int, new: frozenset[int] | None = None) -> list[Item] | None:
    """The site-group pairs the feature-space path computes; None when one site alone exceeds `cap`.

    new=None: every pair of groups (i <= j). Otherwise only what pairs with a new site needs: old
    groups x new groups, new group pairs, and each old site with itself (its self-HSIC).
    """
    if max(dims) > cap:
        return None
    if new is None:
        groups = feature_groups(range(len(dims)), dims, cap)
        return [(a, b) for i, a in enumerate(groups) for b in groups[i:]]
    old = [s for s in range(len(dims)) if s not in new]
    new_groups = feature_groups(sorted(new), dims, cap)
    return ([(a, b) for a in feature_groups(old, dims, cap) for b in new_groups]
            + [(a, b) for i, a in enumerate(new_groups) for b in new_groups[i:]]
            + [([s], [s]) for s in old])


def feature_rows_for(budget_per_task: int, width: int, precision: str, n: int) -> int:
    """Row-chunk length for a feature-space task whose two groups hold `width` columns together."""
    rows = int(SAFETY * budget_per_task / 2 / max(width, 1) / (8 + 2 * itemsize(precision)))
    return max(MIN_BLOCK, min(rows, n))


def choose_method(method: str, kernel: str, n: int, dims: Sequence[int], per_task: int, precision: str,
                  new: frozenset[int] | None = None) -> tuple[str, list[Item] | None]:
    """The exact path `method` ('auto', 'blocked' or 'features') takes, and the features path's site-group
    pairs (None: a site is too wide for it at this budget): auto takes the cheaper."""
    items = feature_items(dims, feature_group_cap(per_task, precision), new) if kernel == "linear" else None
    if method == "features" or (method == "auto" and items is not None
                                and features_cost(n, dims, items) < blocked_cost(n, dims, new)):
        return "features", items
    return "blocked", None


def too_wide(site: str, width: int) -> str:
    """Why the features path has no plan: `site` alone exceeds a feature group at this budget."""
    return (f"method 'features': site {site} has {width} features, too many for memory_budget; use "
            f"method='blocked' or a larger budget")


def budget_shortfall(chosen: str, dims: Sequence[int], budget: int, parallel: int, precision: str,
                     chunk_rows: int = 1, stored: int = 8) -> str | None:
    """Why `budget` (bytes, for `parallel` tasks at once) is too small for any plan of the path `chosen`
    ('blocked' or 'features'), naming compute.memory_budget and the minimum; None when a plan fits."""
    need = min_budget(chosen, dims, precision, chunk_rows, stored) * parallel
    if budget >= need:
        return None
    return (f"compute.memory_budget {budget} bytes is too small for the CKA engine's smallest plan ({chosen}, "
            f"{len(dims)} sites, widest {max(dims)} features, {parallel} task(s) at once): it needs at least "
            f"{need} bytes ({format_size(need)})")


def blocked_cost(n: int, dims: Sequence[int], new: frozenset[int] | None = None) -> float:
    """Relative cost (multiply-adds) of the sample-space path: Grams and Gram products over the
    N^2 / 2 entries of the upper triangle (diagonal blocks are built from symmetric tiles); with
    `new`, only new sites' product rows and old self-products. Both paths run at a similar fraction
    of the matmul rate (benchmarks/cka.py: about 1.5x and 1.8x their matmul bounds), so no weight."""
    sites = len(dims)
    products = sites * sites if new is None else len(new) * sites + sites - len(new)
    return n * n / 2 * (sum(dims) + products)


def features_cost(n: int, dims: Sequence[int], items: list[Item]) -> float:
    """Relative cost (multiply-adds) of the feature-space path: every item's cross-products (a group
    with itself: the upper triangle only)."""
    def width(group: list[int]) -> int:
        return sum(dims[s] for s in group)

    return float(n * sum(width(a) * width(b) if a != b else width(a) * (width(a) + 1) / 2 for a, b in items))
