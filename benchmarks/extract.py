"""Extraction throughput: full extraction vs a bare forward pass of the same model, batch and device.

Measured, best of `--repeats` (alternating, after a warm-up):
- compute:  forward only, on batches already preprocessed and on the device (context only);
- bare:     the same DataLoader (workers, preprocessing) + forward, no hooks, nothing stored;
- full:     tasks.extract.run.extract_model into a fresh store: hooks + reductions + host copies +
            Zarr writes (its steady-state loop, and end-to-end including model build and setup).
Prints images/s and the ratio full/bare (goal >= 0.90): best vs best, and the median of the
per-round ratios (each full run paired with the bare run just before it, to cancel load drift).

    .venv/bin/python benchmarks/extract.py --arch vit_small_patch16_224 --sites vit-sublayers --n 256
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import storage
from tasks.data import open_dataset, sample_images
from tasks.extract import (
    AUTOCAST,
    ExtractOptions,
    ModelSpec,
    build_model,
    extract_model,
    is_conv_net,
    preprocessing,
    resolve_autocast,
    resolve_device,
)
from tasks.extract.run import SampleImages


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_small_patch16_224")
    p.add_argument("--arch-kwargs", default="{}", help="JSON")
    p.add_argument("--sites", default="vit-sublayers", help="preset or comma-separated patterns")
    p.add_argument("--reduction", default="mean")
    p.add_argument("--n", type=int, default=256, help="images")
    p.add_argument("--image-size", type=int, default=224, help="synthetic image side")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--autocast", default="auto")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--store", default=None, help="directory for the benchmark stores (default: a temp dir)")
    return p.parse_args()


def main() -> None:
    args = parse()
    kwargs = json.loads(args.arch_kwargs)
    sites = args.sites.split(",")
    dataset = open_dataset("synthetic", None, n=args.n, size=args.image_size)
    samples = sample_images(dataset, n=args.n, per_class=None, seed=0)
    device = resolve_device(args.device)
    amp = resolve_autocast(args.autocast, device)
    model = build_model(args.arch, kwargs, "random:0")
    memory_format = torch.channels_last if is_conv_net(model) else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    images = SampleImages(dataset, samples, preprocessing(model))
    cast = (lambda: torch.autocast(device.type, dtype=AUTOCAST[amp])) if amp != "off" else nullcontext
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def loader() -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(images, batch_size=args.batch_size, num_workers=args.workers,
                                           pin_memory=device.type == "cuda")

    preloaded = [x.to(device).contiguous(memory_format=memory_format) for _, x in loader()]

    def compute() -> float:
        began = time.perf_counter()
        with torch.inference_mode(), cast():
            for x in preloaded:
                model(x)
        sync()
        return args.n / (time.perf_counter() - began)

    def bare() -> float:
        began = time.perf_counter()
        with torch.inference_mode(), cast():
            for _, x in loader():
                model(x.to(device, non_blocking=True).contiguous(memory_format=memory_format))
        sync()
        return args.n / (time.perf_counter() - began)

    with tempfile.TemporaryDirectory(dir=args.store) as tmp:
        runs = iter(range(10**6))

        def full() -> dict:
            root = storage.open_store(str(Path(tmp) / f"store{next(runs)}"))
            storage.write_samples(root, samples)
            spec = ModelSpec("bench", args.arch, "random:0", sites, args.reduction, arch_kwargs=kwargs)
            options = ExtractOptions(batch_size=args.batch_size, device=str(device), shard_size=args.shard_size,
                                     autocast=args.autocast, loader_workers=args.workers)
            summary = extract_model(root, spec, dataset=dataset, samples=samples, options=options)
            return summary

        compute(), bare()  # warm-up
        n_sites = full()["n_sites"]
        results = {"compute": [], "bare": [], "full": [], "full_end_to_end": []}
        for _ in range(args.repeats):
            results["compute"].append(compute())
            results["bare"].append(bare())
            summary = full()
            results["full"].append(summary["images_per_s"])
            results["full_end_to_end"].append(args.n / summary["seconds"])
    best = {k: max(v) for k, v in results.items()}
    print(f"{args.arch} {kwargs or ''} on {device} (autocast {amp}), batch {args.batch_size}, {args.n} images "
          f"{args.image_size}px, workers {args.workers}, {n_sites} sites ({args.sites}, {args.reduction})")
    for name, value in best.items():
        print(f"  {name:16s} {value:9.1f} images/s   (runs: {', '.join(f'{v:.1f}' for v in results[name])})")
    paired = sorted(f / b for f, b in zip(results["full"], results["bare"], strict=True))
    print(f"ratio full/bare = {best['full'] / best['bare']:.3f} (best vs best; median of paired runs "
          f"{paired[len(paired) // 2]:.3f})   "
          f"(end-to-end incl. model build: {best['full_end_to_end'] / best['bare']:.3f}; "
          f"full/compute-only: {best['full'] / best['compute']:.3f})")


if __name__ == "__main__":
    main()
