"""CKA engine benchmark (not a test): prints ratios measured in this one run.

1. All-pairs exact linear CKA (S sites, N samples, d from --dmin to --dmax) with `cka_matrix` versus
   (a) a per-pair loop building N x N Grams with the standard formulas (Kornblith et al.'s reference
   code: centre both Grams, Frobenius products) and (b) a per-pair torch minibatch HSIC loop (what
   torch_cka does). The baselines are timed on --baseline-pairs pairs and scaled to all S(S-1)/2 pairs.
   At equal accuracy: (a) against the exact engine (same estimator), and (b) against both the exact
   engine and `minibatch_cka_matrix` on the very same minibatches (same estimator, same batches).
2. Efficiency: engine time against its matrix-multiply lower bound (Gram + Gram-product FLOPs divided
   by the float32 matmul rate of this machine, measured here before and after; the faster counts).
3. Scaling: time and peak-memory growth (fresh subprocess, Zarr-backed data, VmHWM reset before the
   run) for each --scaling N, blocked exact and minibatch; time growth against the algorithm's
   prediction (N^2 for blocked, N for minibatch, relative to the smallest N).

Full size: python benchmarks/cka.py --threads 1   Quick (`make bench`): python benchmarks/cka.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.cka import cka_matrix, minibatch_cka_matrix  # noqa: E402


def make_sites(n: int, n_sites: int, dmin: int, dmax: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 32)).astype(np.float32)
    dims = np.linspace(dmin, dmax, n_sites).astype(int)
    return {f"m/blocks.{i}/out": latent @ rng.normal(size=(32, d)).astype(np.float32)
            + rng.normal(size=(n, d)).astype(np.float32) for i, d in enumerate(dims)}


def pairs(n_sites: int, count: int) -> list[tuple[int, int]]:
    everything = [(i, j) for i in range(n_sites) for j in range(i + 1, n_sites)]
    step = max(1, len(everything) // count)
    return everything[::step][:count]


def gram_loop_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Baseline (a): N x N Grams, centred with the standard formulas, then Frobenius products."""
    def centred(k: np.ndarray) -> np.ndarray:
        means = k.mean(0, dtype=np.float64)
        means -= means.mean() / 2
        return k - means[:, None] - means[None, :]

    k, l = centred(x @ x.T), centred(y @ y.T)
    return float(k.ravel() @ l.ravel() / (np.linalg.norm(k) * np.linalg.norm(l)))


def torch_minibatch_cka(x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """Baseline (b): per pair, unbiased HSIC_1 accumulated over minibatches in torch."""
    def hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        n = k.shape[0]
        k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
        one = torch.ones(n, 1, dtype=k.dtype)
        value = (torch.trace(k @ l) + (one.T @ k @ one) * (one.T @ l @ one) / ((n - 1) * (n - 2))
                 - 2 / (n - 2) * (one.T @ k @ l @ one))
        return value / (n * (n - 3))

    kl = kk = ll = 0.0
    for start in range(0, x.shape[0] - batch + 1, batch):
        xb, yb = x[start:start + batch], y[start:start + batch]
        k, l = xb @ xb.T, yb @ yb.T
        kl, kk, ll = kl + hsic1(k, l), kk + hsic1(k, k), ll + hsic1(l, l)
    return float(kl / torch.sqrt(kk * ll))


def matmul_rate(size: int = 2048, repeats: int = 3) -> float:
    """Best float32 matmul rate (FLOP/s) of torch on this machine."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def lower_bound_flops(n: int, dims: list[int], method: str) -> float:
    """Matmul FLOPs of a path's ideal algorithm: every sample-pair Gram entry once (N^2 / 2 entries,
    d_s multiply-adds each) plus the S x S Gram products over them, or the upper triangle of the
    feature-space cross-products. Blocking overheads (diagonal tiles, row chunks) are not counted."""
    if method == "features":
        total = sum(dims)
        return float(n) * total * (total + 1)
    return float(n) * n * (sum(dims) + len(dims) ** 2)


def fastest(repeats: int, run):
    """The result of `run()` with the least attrs['seconds'] over `repeats` runs (timeit's convention)."""
    return min((run() for _ in range(repeats)), key=lambda out: out.attrs["seconds"])


def engine_runs(arrays: dict[str, np.ndarray], args: argparse.Namespace) -> dict:
    """The exact engine on each method (and auto), plus minibatch CKA with the baseline's batch size;
    each the fastest of --repeats runs (the slow features path: one run)."""
    results = {}
    for method in ("blocked", "features", "auto"):
        out = fastest(1 if method == "features" else args.repeats,
                      lambda: cka_matrix(arrays, method=method, precision="float32", memory_budget=args.budget,
                                         device="cpu"))
        results[method] = out
        print(f"engine {method:8s} -> {out.attrs['method']:8s}: {out.attrs['seconds']:8.2f} s "
              f"(block {out.attrs['block_size']}, {out.attrs['n_tasks']} tasks)")
    results["minibatch"] = fastest(args.repeats, lambda: minibatch_cka_matrix(
        arrays, batch_size=args.batch, seed=0, precision="float32", memory_budget=args.budget, device="cpu"))
    print(f"engine minibatch (batch {args.batch}): {results['minibatch'].attrs['seconds']:8.2f} s")
    return results


def baselines(arrays: dict[str, np.ndarray], results: dict, args: argparse.Namespace) -> None:
    """Time baselines (a) and (b) per pair (fastest of --repeats passes); print their agreement with the
    engine and the speed-ups."""
    keys = list(arrays)
    n_pairs = args.sites * (args.sites - 1) // 2
    exact, engine = results["blocked"].values, results["auto"].attrs["seconds"]
    chosen = pairs(args.sites, args.baseline_pairs)
    t_a = min(_timed(lambda: [gram_loop_cka(arrays[keys[i]], arrays[keys[j]]) for i, j in chosen])
              for _ in range(args.repeats)) / len(chosen)
    err_a = max(abs(gram_loop_cka(arrays[keys[i]], arrays[keys[j]]) - exact[i, j]) for i, j in chosen[:3])
    size = args.batch
    order = np.random.default_rng(0).permutation(args.n)[: args.n // size * size]   # the engine's minibatches
    tensors = {k: torch.from_numpy(v[order]) for k, v in arrays.items()}
    t_b = min(_timed(lambda: [torch_minibatch_cka(tensors[keys[i]], tensors[keys[j]], size) for i, j in chosen])
              for _ in range(args.repeats)) / len(chosen)
    mb = results["minibatch"]
    err_b = max(abs(torch_minibatch_cka(tensors[keys[i]], tensors[keys[j]], size) - float(mb.cka.values[i, j]))
                for i, j in chosen[:3])
    print(f"(a) per-pair N x N Gram loop: {t_a * 1e3:8.1f} ms/pair x {n_pairs} pairs = {t_a * n_pairs:9.1f} s "
          f"(max |diff| vs exact engine {err_a:.1e})")
    print(f"(b) per-pair torch minibatch HSIC (batch {size}): {t_b * 1e3:8.1f} ms/pair -> {t_b * n_pairs:9.1f} s "
          f"(max |diff| vs engine minibatch on the same batches {err_b:.1e})")
    print(f"speed-up, exact engine (auto): {t_a * n_pairs / engine:8.1f}x vs (a), "
          f"{t_b * n_pairs / engine:8.1f}x vs (b)")
    print(f"speed-up, engine minibatch vs (b), same estimator and batches: "
          f"{t_b * n_pairs / mb.attrs['seconds']:8.1f}x")


def all_pairs(args: argparse.Namespace) -> None:
    arrays = make_sites(args.n, args.sites, args.dmin, args.dmax)
    dims = [a.shape[1] for a in arrays.values()]
    print(f"data: S={args.sites} sites, N={args.n}, d={args.dmin}..{args.dmax} (sum {sum(dims)}), "
          f"torch threads {torch.get_num_threads()}")
    before = matmul_rate()
    results = engine_runs(arrays, args)
    gap = np.nanmax(np.abs(results["blocked"].values - results["features"].values))
    print(f"blocked vs features max |diff| = {gap:.2e}")
    baselines(arrays, results, args)
    rate = max(before, matmul_rate())       # the faster of two measurements: the stricter bound
    for method in ("blocked", "features"):
        seconds = min(out.attrs["seconds"] for out in (results[method], results["auto"])
                      if out.attrs["method"] == method)          # auto ran the same path: the faster run
        bound = lower_bound_flops(args.n, dims, method) / rate
        print(f"efficiency {method:8s}: {seconds:.2f} s vs matmul lower bound {bound:.2f} s "
              f"({seconds / bound:.2f}x; matmul peak {rate / 1e9:.0f} GFLOP/s)")


CHILD = """
import json, re, sys, zarr
sys.path.insert(0, sys.argv[4])
from tasks.cka import cka_matrix, minibatch_cka_matrix
def kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
root = zarr.open_group(sys.argv[1], mode="r")
arrays = {k: root[k] for k in sorted(root.array_keys())}
small = {k: v[:64] for k, v in arrays.items()}
cka_matrix(small, method="blocked"); minibatch_cka_matrix(small, batch_size=16)
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS")
if sys.argv[2] == "blocked":
    out = cka_matrix(arrays, method="blocked", memory_budget=sys.argv[3])
else:
    out = minibatch_cka_matrix(arrays, batch_size=256, memory_budget=sys.argv[3])
print(json.dumps({"seconds": out.attrs["seconds"], "grew": kib("VmHWM") - before}))
"""


def scaling(args: argparse.Namespace) -> None:
    print(f"scaling: S={args.scaling_sites} sites of d={args.scaling_dim}, Zarr-backed, budget {args.scaling_budget}")
    first: dict[str, tuple[int, float]] = {}       # method -> (smallest N, its time)
    with tempfile.TemporaryDirectory() as tmp:
        import zarr
        for n in args.scaling:
            path = Path(tmp) / f"n{n}"
            root = zarr.open_group(str(path), mode="w")
            rng = np.random.default_rng(n)
            for s in range(args.scaling_sites):
                array = root.create_array(f"site{s:02d}", shape=(n, args.scaling_dim), chunks=(1024, args.scaling_dim),
                                          dtype="float32")
                for start in range(0, n, 8192):
                    stop = min(start + 8192, n)
                    array[start:stop] = rng.normal(size=(stop - start, args.scaling_dim)).astype(np.float32)
            for method, power in (("blocked", 2), ("minibatch", 1)):
                if method not in args.scaling_methods:
                    continue
                env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(torch.get_num_threads())}
                done = subprocess.run([sys.executable, "-c", CHILD, str(path), method, args.scaling_budget,
                                       str(Path(__file__).resolve().parents[1])],
                                      capture_output=True, text=True, check=True, env=env)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                first.setdefault(method, (n, result["seconds"]))
                n0, t0 = first[method]
                print(f"  N={n:6d} {method:9s}: {result['seconds']:8.2f} s (x{result['seconds'] / t0:6.1f}, "
                      f"predicted x{(n / n0) ** power:6.1f}), peak memory growth {result['grew'] / 2**20:7.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=72)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--dmin", type=int, default=192)
    parser.add_argument("--dmax", type=int, default=768)
    parser.add_argument("--batch", type=int, default=256, help="minibatch size of baseline (b)")
    parser.add_argument("--baseline-pairs", type=int, default=10, help="pairs timed per baseline")
    parser.add_argument("--budget", default="2GiB")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each engine path and baseline; "
                        "the fastest counts (the slow features path runs once)")
    parser.add_argument("--scaling", type=lambda s: [int(v) for v in s.split(",") if v], default=[4096, 16384, 65536])
    parser.add_argument("--scaling-sites", type=int, default=8)
    parser.add_argument("--scaling-dim", type=int, default=256)
    parser.add_argument("--scaling-budget", default="256MiB")
    parser.add_argument("--scaling-methods", type=lambda s: s.split(","), default=["blocked", "minibatch"],
                        help="comma-separated: blocked, minibatch")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for everything timed (0: torch's default); 1 on a shared, busy machine")
    parser.add_argument("--quick", action="store_true",
                        help="a small run (12 sites, N=1024, scaling 1024,2048) to check the benchmark works")
    args = parser.parse_args()
    if args.quick:
        args.sites, args.n, args.scaling, args.baseline_pairs = 12, 1024, [1024, 2048], 3
    if args.threads:
        torch.set_num_threads(args.threads)
    all_pairs(args)
    if args.scaling:
        scaling(args)


if __name__ == "__main__":
    main()
