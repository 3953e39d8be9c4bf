"""Wide-site CKA benchmark (not a test): the everyday job's shapes, ratios measured in this one run.

The job most users start with: two ResNet-18s at 64 px, 26 sites each (the stem, then every block's
`act1`, `bn2` and output, and the pooled features), flattened conv maps, so up to 16,384 features a
site and about 200,000 a model, on 1,024 images. Synthetic float32 features of exactly those widths
(a shared low-rank signal plus noise) stand in for the activations: only the shapes set the cost.

Prints, each time the fastest of --repeats:
1. exact linear CKA (all 52 x 52 pairs) on in-memory arrays: the site-major schedule the engine picks
   for these shapes, and the block-pair schedule (block_size forced) it replaces;
2. each against the matmul lower bound N^2 (sum d + S^2) FLOPs at this machine's float32 matmul rate;
3. the same engine reading the arrays from a Zarr v3 store written with the run store's layout
   (chunks of a few MB, zstd), in this process and on a LocalCluster of --workers single-threaded
   workers, as the similarity stage runs it, against the in-memory time.

    python benchmarks/wide.py              # full size (N = 1024)
    python benchmarks/wide.py --quick      # N = 256, a few seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cka import fastest, lower_bound_flops, matmul_rate  # noqa: E402

from storage.layout import chunk_rows  # noqa: E402
from tasks.cka import cka_matrix  # noqa: E402

# (channels, spatial side at 64 px) of a ResNet-18's stem and four stages
STAGES = [(64, 16), (64, 16), (128, 8), (256, 4), (512, 2)]


def resnet18_widths() -> list[int]:
    """Flattened widths of one model's 26 sites: stem, 8 blocks x (act1, bn2, block), pooled."""
    widths = [STAGES[0][0] * STAGES[0][1] ** 2]
    for channels, side in STAGES[1:]:
        widths += [channels * side * side] * 6        # two blocks x (act1, bn2, block)
    return widths + [512]


def make_sites(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 16)).astype(np.float32)
    arrays = {}
    for model in ("a", "b"):
        for i, d in enumerate(resnet18_widths()):
            mix = rng.normal(size=(16, d)).astype(np.float32)
            arrays[f"{model}/site{i:02d}"] = latent @ mix + rng.normal(size=(n, d)).astype(np.float32)
    return arrays


def write_store(arrays: dict[str, np.ndarray], path: str) -> dict[str, zarr.Array]:
    """The arrays as a run store's activations are written: (sample, feature), chunks along sample."""
    root = zarr.open_group(path, mode="w")
    out = {}
    for key, x in arrays.items():
        rows = chunk_rows(len(x), x.shape[1], x.itemsize)
        array = root.create_array(key.replace("/", "_"), shape=x.shape, dtype=x.dtype, chunks=(rows, x.shape[1]),
                                  compressors=ZstdCodec(level=1))
        array[...] = x
        out[key] = array
    return out


def report(label: str, seconds: float, reference: float | None, bound: float) -> None:
    ratio = f"  {seconds / reference:5.2f}x in-memory" if reference else ""
    print(f"{label:46s} {seconds:8.2f} s  {seconds / bound:5.2f}x bound{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="N = 256")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget", default="2GiB")
    args = parser.parse_args()
    n = 256 if args.quick else args.n
    torch.set_num_threads(args.threads)
    arrays = make_sites(n)
    dims = [x.shape[1] for x in arrays.values()]
    rate = matmul_rate()
    bound = lower_bound_flops(n, dims, "blocked") / rate
    print(f"N = {n}, S = {len(dims)} sites, {sum(dims):,} features ({sum(dims) * n * 4 / 2**30:.2f} GiB float32), "
          f"{args.threads} threads, matmul {rate / 1e9:.0f} GFLOP/s: lower bound {bound:.2f} s")

    def run(data, **kw):
        return fastest(args.repeats, lambda: cka_matrix(data, memory_budget=args.budget, device="cpu", **kw))

    memory = run(arrays)
    report(f"in memory, {memory.attrs['schedule']} schedule", memory.attrs["seconds"], None, bound)
    pairs = run(arrays, block_size=-(-n // 4))
    report(f"in memory, block pairs (block {pairs.attrs['block_size']})", pairs.attrs["seconds"],
           memory.attrs["seconds"], bound)
    print(f"max |difference| between the schedules: {float(np.nanmax(abs(memory.values - pairs.values))):.1e}")

    with tempfile.TemporaryDirectory() as tmp:
        stored = write_store(arrays, tmp)
        del arrays
        local = run(stored)
        report(f"from the store, in process ({local.attrs['schedule']})", local.attrs["seconds"],
               memory.attrs["seconds"], bound)
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            client.run(torch.set_num_threads, 1)
            on_cluster = run(stored, client=client)
        report(f"from the store, {args.workers} workers ({on_cluster.attrs['schedule']})",
               on_cluster.attrs["seconds"], memory.attrs["seconds"], bound)
        print(f"max |difference| store vs memory: {float(np.nanmax(abs(on_cluster.values - memory.values))):.1e}")


if __name__ == "__main__":
    main()
