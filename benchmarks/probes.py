"""Linear-probe benchmark (not a test): `probe_sites` at the real run's size, in this process.

Synthetic features shaped like two ViT-S/16 and a ResNet-18 at 224 px: 197 sites (75 + 75 of width 384,
47 of width 512), 600 images of 10 classes, 420 training rows (test fraction 0.3). Each model's sites are
one latent state drifting with depth (neighbouring sites alike), with class means growing with depth,
seen through an anisotropic mixing (a power-law spectrum and a few dominant features). As the pipeline runs
them on a 2-core machine: a LocalCluster of --workers processes, one thread each, BLAS and torch pools of
one thread (--workers 0: in this process, its default pools).

Lines: `probes seconds S, R sites/s`, the iterations and the convergence; with --save the
per-site results go to a .npz, with --compare they are checked against such a file (test accuracy,
chosen C, predictions).

Full size: python benchmarks/probes.py      Quick: python benchmarks/probes.py --scale 0.2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.analyses.probes import probe_sites  # noqa: E402
from tasks.analyses.probes.protocol import split_by_image  # noqa: E402

MODELS = {"vit_a": (75, 384), "vit_b": (75, 384), "resnet": (47, 512)}


def make_sites(n: int, classes: int, scale: float, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(site id -> (n, d) float32 features, labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % classes)
    sites = {}
    for model, (count, d) in MODELS.items():
        count = max(2, round(count * scale))
        mixing = np.linalg.qr(rng.standard_normal((d, d)))[0] * (1.0 + np.arange(d)) ** -0.5
        mixing[:, :3] *= 20.0  # a few dominant features, as in real activations
        means = rng.standard_normal((classes, d))
        state = rng.standard_normal((n, d))
        for i in range(count):
            state = 0.9 * state + 0.45 * rng.standard_normal((n, d))
            signal = 0.05 + 0.25 * i / (count - 1)
            sites[f"{model}/s{i}/output"] = ((state + signal * means[labels]) @ mixing.T).astype(np.float32)
    return sites, labels


@contextlib.contextmanager
def cluster(workers: int) -> Iterator[Any]:
    """A client of `workers` one-thread processes with one-thread BLAS/torch pools (None for 0)."""
    if not workers:
        yield None
        return
    from distributed import Client, LocalCluster

    os.environ.update({name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as local, \
            Client(local) as client:
        client.run(lambda: probe_sites)  # workers import the probes before the clock starts
        yield client


def cpu_seconds(client: Any) -> float:
    """CPU time of this process and of every worker process (a measure less sensitive to other load)."""
    return time.process_time() + (sum(client.run(time.process_time).values()) if client is not None else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 197 sites")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster workers (0: in this process)")
    parser.add_argument("--save", type=Path, help="write the per-site results to this .npz")
    parser.add_argument("--compare", type=Path, help="compare the per-site results with this .npz")
    args = parser.parse_args()
    sites, labels = make_sites(args.n, args.classes, args.scale)
    mask = split_by_image(np.arange(args.n), labels, 0.3, seed=0)
    with cluster(args.workers) as client:
        start, cpu = time.perf_counter(), cpu_seconds(client)
        ds = probe_sites(sites, labels, mask, device="cpu", client=client)
        wall, cpu = time.perf_counter() - start, cpu_seconds(client) - cpu
    print(f"{len(sites)} sites, {args.n} rows ({int((~mask).sum())} train), d {min(a.shape[1] for a in sites.values())}"
          f"..{max(a.shape[1] for a in sites.values())}, {args.classes} classes")
    print(f"probes seconds {wall:.1f}, {len(sites) / wall:.2f} sites/s ({args.workers or 'no'} workers; "
          f"cpu seconds {cpu:.1f}, this process and the workers)")
    print(f"iterations mean {float(ds['iterations'].mean()):.0f} max {int(ds['iterations'].max())}, "
          f"converged {int(ds['converged'].sum())}/{len(sites)}, test accuracy "
          f"{float(ds['test_accuracy'].min()):.2f}..{float(ds['test_accuracy'].max()):.2f}")
    results = {"test_accuracy": ds["test_accuracy"].values, "C": ds["C"].values, "prediction": ds["prediction"].values}
    if args.save:
        np.savez(args.save, **results)
    if args.compare:
        old = np.load(args.compare)
        gap = np.abs(results["test_accuracy"] - old["test_accuracy"])
        same = results["C"] == old["C"]
        print(f"against {args.compare}: test accuracy |difference| max {gap.max():.4f} mean {gap.mean():.4f}, "
              f"same C {int(same.sum())}/{len(sites)}, same predictions "
              f"{float((results['prediction'] == old['prediction']).mean()):.4f} (at the same C "
              f"{float((results['prediction'][same] == old['prediction'][same]).mean()):.4f}, test accuracy "
              f"|difference| max {gap[same].max():.4f})")


if __name__ == "__main__":
    main()
