"""Analyses stage benchmark (not a test): prints ratios measured in this one run.

Synthetic class-structured activations (N samples, --classes classes, S sites of widths --dmin..--dmax: class
means mixed into each site plus noise, more separable with depth) written into a real run store through the
ActivationWriter. In one run, with the pipeline's thread budget applied (`flows.threads`, `flows.cluster`):
1. the analyses stage (`tasks.analyses.run_analyses`: probes on every site, target alignment, agreement) and
   the exact linear all-pairs CKA matrix (`tasks.cka.update_similarity`) on the same stored arrays;
2. with --contended, both again beside one competing CPU-bound process.
Peak memory: the flow process's and every Dask worker's peak resident set (VmHWM), against the budget.

Lines: `analyses seconds`, `cka seconds`, `peak memory`, with --contended `analyses contended/quiet time
ratio R` and `cka contended/quiet time ratio R`; the last line is `analyses/cka time ratio R`.

Full size: python benchmarks/analyses.py --contended      (N=10,000, 10 classes, S=150, d=384..768)
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import storage  # noqa: E402
from flows.cluster import dask_client  # noqa: E402
from flows.config import ComputeConfig  # noqa: E402
from flows.threads import flow_pools  # noqa: E402
from tasks.analyses import AnalysesOptions, run_analyses  # noqa: E402
from tasks.cka import CkaOptions, update_similarity  # noqa: E402


def write_store(path: str, n: int, classes: int, n_sites: int, dmin: int, dmax: int, seed: int = 0) -> dict[str, str]:
    """Samples and two models' activations (half the sites each) in a run store; returns the fingerprints."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    root = storage.open_store(path)
    storage.write_samples(root, xr.Dataset({"image_index": ("sample", np.arange(n)), "label": ("sample", labels),
                                            "view": ("sample", np.zeros(n, int))},
                                           coords={"sample": np.arange(n)}, attrs={"fingerprint": f"bench-{n}"}))
    widths = np.linspace(dmin, dmax, n_sites).astype(int)
    fingerprints = {}
    for m, model in enumerate(("a", "b")):
        mine = {f"blocks.{i}/output": int(d) for i, d in enumerate(widths[m::2])}
        fingerprints[model] = f"bench-{model}"
        attrs = {"arch": "synthetic", "sites": list(mine), "samples_fingerprint": f"bench-{n}"}
        with storage.ActivationWriter(root, model, mine, n, shard_size=2048, fingerprint=fingerprints[model],
                                      attrs=attrs) as writer:
            mixes = {s: rng.standard_normal((classes, d)).astype(np.float32) for s, d in mine.items()}
            for shard in range(writer.n_shards):
                lo, hi = writer.shard_bounds(shard)
                data = {}
                for depth, (site, d) in enumerate(mine.items()):
                    signal = 0.3 + 1.5 * depth / max(len(mine) - 1, 1)
                    noise = rng.standard_normal((hi - lo, d), dtype=np.float32)
                    data[site] = signal * mixes[site][labels[lo:hi]] + noise
                writer.write_shard(shard, data)
    return fingerprints


def peak_rss() -> int:
    """This process's peak resident set in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def timed_run(path: str, fingerprints: dict[str, str], compute: ComputeConfig
              ) -> tuple[float, float, int, list[int]]:
    """(analyses seconds, cka seconds, peak RSS of the flow process, of each worker)."""
    root = storage.open_store(path)
    with flow_pools(compute), dask_client(compute) as client:
        start = time.perf_counter()
        update_similarity(root, "bench", fingerprints, CkaOptions(memory_budget=compute.budget_bytes), client=client,
                          reuse=False)
        cka_s = time.perf_counter() - start
        start = time.perf_counter()
        probed = []
        run_analyses(root, AnalysesOptions(memory_budget=compute.budget_bytes, device="cpu"), client=client,
                     probe_progress=lambda done, total: probed.append(done) or print(
                         f"  probes {sum(probed)}/{total} ({time.perf_counter() - start:.0f} s)", flush=True))
        analyses_s = time.perf_counter() - start
        workers = client.run(peak_rss)
    return analyses_s, cka_s, peak_rss(), list(workers.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--sites", type=int, default=150)
    parser.add_argument("--dmin", type=int, default=384)
    parser.add_argument("--dmax", type=int, default=768)
    parser.add_argument("--threads", type=int, default=None, help="compute.threads (default: cores available)")
    parser.add_argument("--memory-budget", default="2GiB")
    parser.add_argument("--contended", action="store_true", help="also run beside one competing CPU-bound process")
    parser.add_argument("--store", default=None, help="run store directory (default: a temporary one)")
    args = parser.parse_args()
    compute = ComputeConfig(threads=args.threads, memory_budget=args.memory_budget)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.store or str(Path(tmp) / "store")
        fingerprints = write_store(path, args.n, args.classes, args.sites, args.dmin, args.dmax)
        print(f"store: N={args.n}, {args.classes} classes, S={args.sites}, d={args.dmin}..{args.dmax}, "
              f"threads={compute.threads or 'all available'}", flush=True)
        analyses_s, cka_s, flow_peak, worker_peaks = timed_run(path, fingerprints, compute)
        print(f"analyses seconds {analyses_s:.1f}")
        print(f"cka seconds {cka_s:.1f}")
        print(f"peak memory: flow process {flow_peak / 2**30:.2f} GiB, workers "
              f"{', '.join(f'{p / 2**30:.2f}' for p in worker_peaks)} GiB (resident, with Python and torch; "
              f"memory_budget {args.memory_budget} bounds the working set)")
        if args.contended:
            stop = multiprocessing.Event()
            rival = multiprocessing.Process(target=spin, args=(stop,), daemon=True)
            rival.start()
            try:
                analyses_c, cka_c, _, _ = timed_run(path, fingerprints, compute)
            finally:
                stop.set()
                rival.join()
            print(f"analyses contended/quiet time ratio {analyses_c / analyses_s:.2f}")
            print(f"cka contended/quiet time ratio {cka_c / cka_s:.2f}")
        print(f"analyses/cka time ratio {analyses_s / cka_s:.2f}")


if __name__ == "__main__":
    main()
