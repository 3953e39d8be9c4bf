"""Extraction: run one model over the sample and write its sites' reduced activations.

Pipeline (one process, any device): a DataLoader (workers, pinned memory on CUDA) decodes and
preprocesses images; the main thread copies each batch to the device (non-blocking,
channels_last for conv nets), runs the forward under `torch.inference_mode` (autocast on CUDA)
while hooks reduce every site to float32 (batch, features) on the device; a background thread
copies the reduced batches to the host (on its own CUDA stream), assembles whole shards and
writes them with `storage.ActivationWriter`, so the forward never waits for Zarr.

Batches never straddle a shard, so a shard's values do not depend on which other shards run:
resuming (only `writer.pending_shards()` are extracted) gives the same arrays as one run.
Non-finite values are counted per site (in the stored features) and recorded in the store.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xarray as xr
import zarr

import storage
from tasks.data import sample_image
from tasks.extract.devices import resolve_device
from tasks.extract.models import build_model, data_config, model_fingerprint
from tasks.extract.models import preprocessing as make_transform
from tasks.extract.options import ExtractOptions
from tasks.extract.reductions import check_reduction, reduce
from tasks.extract.sites import Site, resolve_sites, tap_sites

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """What to extract: a model (timm `arch` + `arch_kwargs`, `weights`), its sites and their reduction.

    weights: 'random:<seed>', 'timm' or a checkpoint file (`checkpoint_format`: see `checkpoints`);
    preprocessing: overrides of timm's data config; extra_attrs: recorded with the activations."""

    name: str
    arch: str
    weights: str
    sites: str | list[str]
    reduction: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] | None = None
    checkpoint_format: str = "auto"
    extra_attrs: dict[str, Any] | None = None


def resolve_autocast(autocast: str, device: torch.device) -> str:
    """Effective autocast: off on CPU; `auto` -> bf16 where supported, else fp16, on CUDA."""
    if autocast not in ("auto", "off", *AUTOCAST):
        raise ValueError(f"autocast must be auto, off, bf16 or fp16; got {autocast!r}")
    if device.type != "cuda" or autocast == "off":
        return "off"
    if autocast == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return autocast


def is_conv_net(model: torch.nn.Module) -> bool:
    """Conv nets (no ViT patch embedding, some 2-D convolution) run channels_last."""
    return not hasattr(model, "patch_embed") and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


class SampleImages(torch.utils.data.Dataset):
    """Preprocessed image of each sample row (the view's augmentation applied by tasks.data.sampling)."""

    def __init__(self, dataset: Any, samples: xr.Dataset, transform: Callable) -> None:
        self.dataset, self.samples, self.transform = dataset, samples, transform

    def __len__(self) -> int:
        return self.samples.sizes["sample"]

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor]:
        return row, self.transform(sample_image(self.dataset, self.samples, row))


def shard_batches(writer: storage.ActivationWriter, shards: list[int], batch_size: int) -> list[tuple[int, list[int]]]:
    """(shard, rows) batches of at most batch_size rows, each inside one shard, in shard order."""
    batches = []
    for shard in shards:
        start, stop = writer.shard_bounds(shard)
        batches += [(shard, list(range(i, min(i + batch_size, stop)))) for i in range(start, stop, batch_size)]
    return batches



@dataclass
class _Batch:
    shard: int
    rows: list[int]
    features: dict[str, torch.Tensor]   # site -> (batch, width), on the device
    nonfinite: torch.Tensor             # (n_sites,) counts, on the device
    ready: torch.cuda.Event | None      # recorded after the forward on CUDA


class ShardAssembler:
    """Background thread: host copies of reduced batches -> whole shards -> writer.write_shard."""

    def __init__(self, writer: storage.ActivationWriter, widths: dict[str, int], device: torch.device,
                 progress: Callable[[int, int | None], None] | None, total: int | None = None, depth: int = 8) -> None:
        self.writer, self.widths, self.progress, self.total = writer, widths, progress, total
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.queue: queue.Queue[_Batch | None] = queue.Queue(maxsize=depth)
        self.nonfinite = dict.fromkeys(widths, 0)
        self.shards_written = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ckaflow-shard-writer", daemon=True)
        self.thread.start()

    def submit(self, batch: _Batch) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(batch)

    def close(self) -> None:
        """Write what is queued, stop the thread, re-raise its error if any."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _host(self, batch: _Batch) -> tuple[dict[str, np.ndarray], np.ndarray]:
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            if batch.ready is not None:
                self.stream.wait_event(batch.ready)
            features = {k: v.to("cpu").numpy() for k, v in batch.features.items()}
            return features, batch.nonfinite.to("cpu").numpy()

    def _run(self) -> None:
        shard, start, filled, buffers = -1, 0, 0, {}
        counts = np.zeros(len(self.widths), dtype=np.int64)
        while (batch := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain so the producer never blocks
            try:
                features, nonfinite = self._host(batch)
                if batch.shard != shard:
                    shard, (start, stop) = batch.shard, self.writer.shard_bounds(batch.shard)
                    buffers = {k: np.empty((stop - start, w), dtype=np.float32) for k, w in self.widths.items()}
                    filled, counts[:] = 0, 0
                lo = batch.rows[0] - start
                for k, v in features.items():
                    buffers[k][lo:lo + len(batch.rows)] = v
                counts += nonfinite
                filled += len(batch.rows)
                if filled == stop - start:
                    self._write(shard, buffers, counts)
                if self.progress is not None:  # images, reported once buffered (a shard's last: once written)
                    self.progress(len(batch.rows), self.total)
            except BaseException as error:  # surfaced to the producer by submit()/close()
                self.error = error

    def _write(self, shard: int, buffers: dict[str, np.ndarray], counts: np.ndarray) -> None:
        self.writer.write_shard(shard, buffers)  # also records the shard's NaN/Inf counts in the store
        for site, count in zip(self.widths, counts.tolist(), strict=True):
            self.nonfinite[site] += int(count)
        self.shards_written += 1


def extract_model(root: zarr.Group, spec: ModelSpec, *, dataset: Any, samples: xr.Dataset,
                  options: ExtractOptions = ExtractOptions(), shards: list[int] | None = None,
                  progress: Callable[[int, int | None], None] | None = None, break_locks: bool = False
                  ) -> dict[str, Any]:
    """Extract the sites of `spec` over `samples` into activations/<spec.name>/ of `root`, only for
    shards not yet done (all, or those in `shards`). Returns a summary dict. progress: `(images done now,
    images of the requested shards)`: those of already finished shards at once, then after each batch.
    break_locks: take over shards locked by a writer that cannot be checked (another host)."""
    began = time.perf_counter()
    model_name, arch, arch_kwargs, weights = spec.name, spec.arch, spec.arch_kwargs, spec.weights
    sites, reduction, preprocessing, checkpoint_format = spec.sites, spec.reduction, spec.preprocessing, spec.checkpoint_format
    dtype, shard_size = options.dtype, options.shard_size
    check_reduction(reduction)
    dev = resolve_device(options.device)
    amp = resolve_autocast(options.autocast, dev)
    model = build_model(arch, arch_kwargs, weights, checkpoint_format=checkpoint_format)
    memory_format = torch.channels_last if is_conv_net(model) else torch.contiguous_format
    model = model.to(dev, memory_format=memory_format)
    image = sample_image(dataset, samples, 0)  # the input size of a model that takes the images as they are
    image_size = (image.height, image.width)
    config = data_config(model, preprocessing, image_size)
    site_list = resolve_sites(model, sites, tuple(config["input_size"]))
    widths = {s.name: s.width(reduction) for s in site_list}
    model_fp = model_fingerprint(arch, arch_kwargs, weights, checkpoint_format=checkpoint_format)
    fingerprint = storage.fingerprint({"model": model_fp, "sites": [(s.name, s.module, s.tap) for s in site_list],
                                       "reduction": reduction, "samples": samples.attrs.get("fingerprint"),
                                       "data_config": config, "dtype": dtype, "autocast": amp})
    attrs = {"arch": arch, "arch_kwargs": arch_kwargs, "weights": weights, "model_fingerprint": model_fp,
             "reduction": reduction, "sites_spec": sites, "preprocessing": config, "autocast": amp,
             "checkpoint": getattr(model, "ckaflow_load", None), "samples_fingerprint": samples.attrs.get("fingerprint"),
             **(spec.extra_attrs or {})}
    site_attrs = {s.name: {"module": s.module, "tap": s.tap, "shape": list(s.shape),
                           "prefix_tokens": s.prefix_tokens, "reduction": reduction} for s in site_list}
    n_samples = samples.sizes["sample"]
    with storage.ActivationWriter(root, model_name, widths, n_samples, shard_size=shard_size, dtype=dtype,
                                  attrs=attrs, site_attrs=site_attrs,
                                  fingerprint=fingerprint, break_locks=break_locks) as writer:
        requested = list(range(writer.n_shards)) if shards is None else list(shards)
        pending = writer.pending_shards(requested)
        done_rows = sum(stop - start for start, stop in map(writer.shard_bounds, sorted(set(requested) - set(pending))))
        total_rows = sum(stop - start for start, stop in map(writer.shard_bounds, requested))
        if progress is not None and done_rows:
            progress(done_rows, total_rows)
        batches = shard_batches(writer, pending, options.batch_size)
        assembler = ShardAssembler(writer, widths, dev, progress, total_rows)
        loop_began = time.perf_counter()
        try:
            images = SampleImages(dataset, samples, make_transform(model, preprocessing, image_size))
            _forward_all(model, site_list, reduction, images, batches, dev, amp, memory_format, options.loader_workers,
                         assembler)
        finally:
            assembler.close()
        loop_seconds = time.perf_counter() - loop_began
    seconds = time.perf_counter() - began
    n_images = sum(len(rows) for _, rows in batches)
    return {"model": model_name, "fingerprint": fingerprint, "model_fingerprint": model_fp,
            "sites": list(widths), "n_sites": len(widths), "widths": widths, "reduction": reduction,
            "preprocessing": config, "n_samples": n_samples, "shards_total": writer.n_shards, "shards_requested": len(requested),
            "shards_written": assembler.shards_written, "shards_skipped": len(requested) - len(pending),
            "nonfinite": assembler.nonfinite, "device": str(dev), "autocast": amp, "seconds": seconds,
            "loop_seconds": loop_seconds, "n_images": n_images,
            "images_per_s": n_images / loop_seconds if n_images else None}


def _forward_all(model: torch.nn.Module, sites: list[Site], reduction: str, images: SampleImages,
                 batches: list[tuple[int, list[int]]], device: torch.device, amp: str, memory_format: torch.memory_format,
                 loader_workers: int, assembler: ShardAssembler) -> None:
    """Forward every batch with the sites hooked; hand reduced batches to the assembler."""
    if not batches:
        return
    loader = torch.utils.data.DataLoader(images, batch_sampler=[rows for _, rows in batches],
                                         num_workers=loader_workers, pin_memory=device.type == "cuda")
    reduced: dict[str, torch.Tensor] = {}

    def keep(site: Site, tensor: torch.Tensor) -> None:
        reduced[site.name] = reduce(tensor, reduction, site.prefix_tokens)

    cast = torch.autocast(device.type, dtype=AUTOCAST[amp]) if amp != "off" else nullcontext()
    with tap_sites(model, sites, keep), torch.inference_mode(), cast:
        for (shard, _), (rows, x) in zip(batches, loader, strict=True):
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            reduced.clear()
            model(x)
            features = {s.name: reduced[s.name] for s in sites}
            nonfinite = torch.stack([(~torch.isfinite(v)).sum() for v in features.values()])
            ready = torch.cuda.Event() if device.type == "cuda" else None
            if ready is not None:
                ready.record()
            assembler.submit(_Batch(shard, rows.tolist(), features, nonfinite, ready))
