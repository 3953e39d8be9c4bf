"""The offline model zoo: which models to train on the digits data, how, and training one of them.

Members (`zoo_members(variant)`; variant "demo" for the demo, "test" a much smaller, faster copy):
- `vit_sup`: tiny timm ViT (img 32, patch 8, mean-pooled tokens), supervised cross-entropy.
- `vit_contrastive`: the same ViT, MoCo v3 (InfoNCE on two augmented views).
- `vit_mae`: the same ViT, masked autoencoder; the encoder is kept.
- `vit_mae_ft`: `vit_mae` fine-tuned with labels (`finetuned_from="vit_mae"`).
- `resnet_sup`, `resnet_simclr`: timm resnet10t, supervised and SimCLR.

Outputs of a member in `out_dir`: `<name>.safetensors` (release key layout of its objective, see
`tasks.zoo.objectives`) and `<name>.json`, its model card: spec, spec hash, how to load it
(arch, arch_kwargs, checkpoint_format, preprocessing), per-epoch losses, seconds, and the
last-layer linear probe on held-out digits for the trained model and for the same architecture
at random init (`random:<seed>`, which is also the trained model's starting point). A member is
current when both files exist and the card's spec hash equals the spec's (its parent's hash is
part of it, so retraining a parent retrains its fine-tuned children).

Training is deterministic: the member's seed for the initial weights (model and objective heads),
seeded generators for order, augmentations and masks, `TRAIN_THREADS` CPU threads,
`torch.use_deterministic_algorithms(True)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from safetensors.torch import save_file

import storage
from tasks.analyses.probes.solvers import ProbeResult, probe_in_memory
from tasks.data import HELDOUT_EVERY
from tasks.extract import build_model, data_config
from tasks.zoo.data import DigitsTensors, digits_tensors, normalize
from tasks.zoo.objectives import build_objective, finetune_model

VARIANTS = ("demo", "test")
IMAGE_SIZE = 32
NUM_CLASSES = 10
# Extraction must see what training saw: 32x32 inputs, no centre-crop zoom.
PREPROCESSING = {"input_size": [3, IMAGE_SIZE, IMAGE_SIZE], "crop_pct": 1.0}
# The few-shot probe (first FEW_SHOT training images of each class) separates trained from random
# features far more clearly than the full probe, on which random conv features already reach ~95%.
FEW_SHOT = 10
# One thread: these models are too small to gain from a second, and on a shared CPU two spinning
# OpenMP threads ran several times slower than one.
TRAIN_THREADS = 1


@dataclasses.dataclass(frozen=True)
class Member:
    """One zoo model: architecture, objective and its hyperparameters, schedule, seed."""

    name: str
    arch: str
    arch_kwargs: dict[str, Any]
    objective: str
    epochs: int
    seed: int
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    warmup_epochs: int = 1
    objective_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    finetuned_from: str | None = None
    train_limit: int | None = None  # train on the first `train_limit` training images only

    def spec(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _vit(depth: int, dim: int, num_classes: int) -> dict[str, Any]:
    """A tiny timm ViT on 32x32 digits: 8x8 patches (2x2 pixels of the 8x8 originals), 16 tokens,
    average-pooled patch tokens as features."""
    return {"img_size": IMAGE_SIZE, "patch_size": 8, "depth": depth, "embed_dim": dim, "num_heads": 3,
            "num_classes": num_classes, "global_pool": "avg"}


# Per variant: ViT (depth, width), then (epochs, train_limit) of each member. The "test" variant
# trains a smaller ViT, on the first 640 training images where that suffices.
_ARCHS = {"demo": (4, 96), "test": (2, 48)}
_SCHEDULES: dict[str, dict[str, tuple[int, int | None]]] = {
    "demo": {"vit_sup": (20, None), "vit_contrastive": (20, None), "vit_mae": (40, None), "vit_mae_ft": (10, None),
             "resnet_sup": (8, None), "resnet_simclr": (8, None)},
    "test": {"vit_sup": (40, 640), "vit_contrastive": (20, None), "vit_mae": (30, None), "vit_mae_ft": (40, 640),
             "resnet_sup": (4, 640), "resnet_simclr": (4, None)},
}


def zoo_members(variant: str = "demo") -> list[Member]:
    """The zoo of `variant`, parents before their fine-tuned children."""
    if variant not in VARIANTS:
        raise ValueError(f"zoo variant {variant!r}: use one of {', '.join(VARIANTS)}")
    depth, dim = _ARCHS[variant]
    vit, vit_ssl, vit_cls = "vit_tiny_patch16_224", _vit(depth, dim, 0), _vit(depth, dim, NUM_CLASSES)
    resnet = "resnet10t"
    light = {"augment_strength": 0.3}
    recipes = [
        dict(name="vit_sup", arch=vit, arch_kwargs=vit_cls, objective="supervised", seed=0, lr=3e-3,
             objective_kwargs=light),
        # views at 0.7 of full strength: at 1.0 the tiny ViT sits longer at the chance-level loss
        dict(name="vit_contrastive", arch=vit, arch_kwargs=vit_ssl, objective="moco_v3", seed=1, lr=3e-3,
             objective_kwargs={"momentum": 0.95, "augment_strength": 0.7}),
        # 16 patches only: mask half of them, not 75%; at lr 4e-3 the demo MAE collapses
        dict(name="vit_mae", arch=vit, arch_kwargs=vit_ssl, objective="mae", seed=2, lr=2e-3,
             objective_kwargs={"mask_ratio": 0.5}),
        dict(name="vit_mae_ft", arch=vit, arch_kwargs=vit_cls, objective="supervised", seed=3, lr=1e-3,
             objective_kwargs=light, finetuned_from="vit_mae"),
        dict(name="resnet_sup", arch=resnet, arch_kwargs={"num_classes": NUM_CLASSES}, objective="supervised",
             seed=4, weight_decay=1e-4),
        dict(name="resnet_simclr", arch=resnet, arch_kwargs={"num_classes": 0}, objective="simclr", seed=5, lr=3e-3,
             weight_decay=1e-4),
    ]
    schedule = _SCHEDULES[variant]
    return [Member(**recipe, epochs=schedule[recipe["name"]][0], train_limit=schedule[recipe["name"]][1])
            for recipe in recipes]


def spec_hash(member: Member, parent_hash: str | None = None) -> str:
    """Hash of everything that determines a member's weights (spec, data, parent, library versions)."""
    record = {"spec": member.spec(), "parent": parent_hash, "data": data_description(), "threads": TRAIN_THREADS,
              "torch": torch.__version__, "timm": timm.__version__}
    return storage.fingerprint(record)


def spec_hashes(members: list[Member]) -> dict[str, str]:
    """Spec hash of each member, chaining parents' hashes into their children's."""
    hashes: dict[str, str] = {}
    for member in members:
        if member.finetuned_from and member.finetuned_from not in hashes:
            raise ValueError(f"zoo member {member.name!r}: finetuned_from {member.finetuned_from!r} "
                             "is not an earlier member")
        hashes[member.name] = spec_hash(member, hashes.get(member.finetuned_from or ""))
    return hashes


def data_description() -> dict[str, Any]:
    return {"dataset": "sklearn.datasets.load_digits", "image_size": IMAGE_SIZE, "channels": 3,
            "heldout": f"index % {HELDOUT_EVERY} == 0", "train": f"index % {HELDOUT_EVERY} != 0"}


def checkpoint_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.safetensors"


def card_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.json"


def read_card(out_dir: str | Path, name: str) -> dict[str, Any]:
    """The model card of member `name` in `out_dir`."""
    path = card_path(out_dir, name)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"zoo model card not found: {path}") from None


def is_current(out_dir: str | Path, name: str, expected_hash: str) -> bool:
    """Whether member `name` is trained in `out_dir` with this spec hash (checkpoint and card present)."""
    if not (checkpoint_path(out_dir, name).is_file() and card_path(out_dir, name).is_file()):
        return False
    try:
        return read_card(out_dir, name).get("spec_hash") == expected_hash
    except json.JSONDecodeError:
        return False


@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Fixed CPU thread count and deterministic algorithms, restored afterwards."""
    previous = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Last-layer pooled features (timm pre-logits) of images in [0, 1], in eval mode."""
    config = data_config(model)
    model.eval()
    out = [model.forward_head(model.forward_features(normalize(images[i:i + batch_size], config["mean"],
                                                                config["std"])), pre_logits=True)
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out).double().numpy()


def linear_probe(model: torch.nn.Module, train: DigitsTensors, heldout: DigitsTensors,
                 per_class: int | None = None) -> ProbeResult:
    """Linear probe (tasks.analyses.probes protocol) fit on the training images' features (or on the first
    `per_class` training images of each class: a few-shot probe), scored on the held-out ones."""
    if per_class is not None:
        labels = train.labels.numpy()
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))
        train = DigitsTensors(train.images[keep], train.labels[keep], train.indices[keep])
    x = np.concatenate([features(model, train.images), features(model, heldout.images)])
    labels = np.concatenate([train.labels.numpy(), heldout.labels.numpy()])
    test_mask = np.r_[np.zeros(len(train.labels), bool), np.ones(len(heldout.labels), bool)]
    return probe_in_memory(x, labels, test_mask)


def extraction_preprocessing(model: torch.nn.Module) -> dict[str, Any]:
    """The complete preprocessing (timm data config keys, JSON values) that shows extraction the
    images as training saw them: 32x32 without crop zoom, normalised with the model's mean/std."""
    return storage.json_safe(data_config(model, PREPROCESSING))


def _initial_model(member: Member, parent: str | Path | None) -> torch.nn.Module:
    if member.finetuned_from:
        if parent is None:
            raise ValueError(f"zoo member {member.name!r} is fine-tuned from {member.finetuned_from!r}: "
                             "give the parent's checkpoint")
        num_classes = member.arch_kwargs.get("num_classes", 0)
        return finetune_model(member.arch, {**member.arch_kwargs, "num_classes": 0}, str(parent),
                              num_classes=num_classes, seed=member.seed)
    return build_model(member.arch, member.arch_kwargs, f"random:{member.seed}")


def _schedule(step: int, warmup: int, total: int) -> float:
    """Linear warmup then cosine decay, as a factor of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def fit(member: Member, model: torch.nn.Module, train: DigitsTensors) -> tuple[torch.nn.Module, list[float]]:
    """Train `model` with the member's objective; returns the objective (holding the model) and
    the mean training loss of each epoch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(member.seed)
        objective = build_objective(member.objective, model, **member.objective_kwargs)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=member.lr, weight_decay=member.weight_decay)
    n = train.images.shape[0]
    per_epoch = n // member.batch_size
    if per_epoch == 0:
        raise ValueError(f"zoo member {member.name!r}: batch_size {member.batch_size} > {n} training images")
    total = per_epoch * member.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _schedule(step, per_epoch * member.warmup_epochs, total))
    generator = torch.Generator().manual_seed(member.seed)
    objective.train()
    losses = []
    for _ in range(member.epochs):
        order = torch.randperm(n, generator=generator)
        epoch_loss = 0.0
        for b in range(per_epoch):
            batch = order[b * member.batch_size:(b + 1) * member.batch_size]
            loss = objective.loss(train.images[batch], train.labels[batch], generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"zoo member {member.name!r}: non-finite loss at epoch {len(losses)}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            objective.after_step()
            epoch_loss += loss.item()
        losses.append(epoch_loss / per_epoch)
    return objective, losses


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def train_member(member: Member, out_dir: str | Path, *, expected_hash: str, parent: str | Path | None = None) -> Path:
    """Train one member, probe it against its random init, write checkpoint then card; returns the
    checkpoint path. `parent`: checkpoint of `member.finetuned_from`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with deterministic(TRAIN_THREADS):
        train, heldout = digits_tensors("train", IMAGE_SIZE, member.train_limit), digits_tensors("heldout", IMAGE_SIZE)
        objective, losses = fit(member, _initial_model(member, parent), train)
        train_seconds = time.perf_counter() - started
        probe_train = digits_tensors("train", IMAGE_SIZE)
        baseline_model = build_model(member.arch, member.arch_kwargs, f"random:{member.seed}")
        probes = {shots: (linear_probe(objective.encoder, probe_train, heldout, shots),
                          linear_probe(baseline_model, probe_train, heldout, shots)) for shots in (None, FEW_SHOT)}
    path = checkpoint_path(out, member.name)
    _atomic_write(path, lambda tmp: save_file(objective.release_state(), str(tmp), metadata={"format": "pt"}))
    card = {
        "name": member.name, "spec_hash": expected_hash, "spec": member.spec(),
        "objective": member.objective, "epochs": member.epochs, "seed": member.seed,
        "finetuned_from": member.finetuned_from,
        "load": {"arch": member.arch, "arch_kwargs": member.arch_kwargs, "weights": path.name,
                 "checkpoint_format": objective.checkpoint_format,
                 "preprocessing": extraction_preprocessing(baseline_model)},
        "data": {**data_description(), "n_train": int(train.labels.shape[0]), "n_heldout": int(heldout.labels.shape[0])},
        "final_loss": losses[-1], "losses": losses,
        "linear_probe": {
            "features": "last layer, pooled pre-logits (timm forward_head(pre_logits=True))",
            "protocol": "tasks.analyses.probes.probe_in_memory, fit on the training images, scored on the held-out ones",
            "random_init_weights": f"random:{member.seed}", "n_test": int(heldout.labels.shape[0]),
            "accuracy": probes[None][0].test_accuracy, "random_init_accuracy": probes[None][1].test_accuracy,
            "n_fit": int(probe_train.labels.shape[0]),
            "fewshot_per_class": FEW_SHOT, "fewshot_accuracy": probes[FEW_SHOT][0].test_accuracy,
            "fewshot_random_init_accuracy": probes[FEW_SHOT][1].test_accuracy},
        "train_seconds": round(train_seconds, 2), "threads": TRAIN_THREADS,
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    _atomic_write(card_path(out, member.name), lambda tmp: tmp.write_text(json.dumps(card, indent=2)))
    return path
