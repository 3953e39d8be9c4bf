"""Training objectives of the model zoo, each wrapping a timm backbone (`self.encoder`).

Every objective is an `nn.Module` with `loss(images, labels, generator)` (images already
normalised, float32 (n, 3, h, w)) and `release_state()`: the checkpoint tensors laid out like
the public releases of that method, so the project's loader (`tasks.extract.checkpoints`) remaps them:

- `supervised` (cross-entropy on one augmented view): plain timm keys, classifier head included
  (timm / DeiT layout). Fine-tuning is this objective on a backbone from `finetune_model`.
- `moco_v3` (MoCo v3: projector, predictor, momentum encoder, symmetric InfoNCE on two views):
  `module.base_encoder.*` (the projector lives in `module.base_encoder.head.*`, as in MoCo v3's
  ViTs), `module.momentum_encoder.*` and `module.predictor.*`; the loader keeps the base encoder
  minus its head.
- `simclr` (SimCLR NT-Xent over 2n views): `encoder.*` plus `projector.*`.
- `mae` (masked-patch reconstruction of pixels with a light decoder):
  plain timm keys of the encoder only (decoder and mask token are not part of the backbone).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from tasks.extract import build_model, data_config
from tasks.zoo.data import augment, normalize

OBJECTIVES = ("supervised", "moco_v3", "simclr", "mae")


def _tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def _mlp(dims: list[int], last_bn: bool = True) -> nn.Sequential:
    """Linear-BN-ReLU stack (MoCo v3 `_build_mlp` style); the last layer ends with an affine-free BN."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(d_in, d_out, bias=last and not last_bn))
        if not last:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def _features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logits features of a timm model (cls token / global average pool)."""
    return encoder.forward_head(encoder.forward_features(images), pre_logits=True)


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of queries against keys: the positive of q[i] is k[i], the other keys are negatives."""
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each of the 2n views against the other 2n-1; the positive is its pair."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


class Objective(nn.Module):
    """Base: holds the backbone, its input normalisation (the model's timm data config, as used at
    extraction) and the augmentation strength of its views."""

    checkpoint_format = "plain"

    def __init__(self, encoder: nn.Module, augment_strength: float) -> None:
        super().__init__()
        config = data_config(encoder)
        self.encoder, self.augment_strength = encoder, augment_strength
        self.mean, self.std = tuple(config["mean"]), tuple(config["std"])

    def view(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A normalised random view of images in [0, 1]."""
        return normalize(augment(images, generator, strength=self.augment_strength), self.mean, self.std)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training loss of a batch of images in [0, 1] (n, 3, h, w) with labels (n,)."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Hook run after each optimiser step (e.g. a momentum update); nothing by default."""

    def release_state(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensors in the release layout of the method (see module docstring)."""
        return _tensors("", self.encoder)


class Supervised(Objective):
    """Cross-entropy on one augmented view."""

    def __init__(self, encoder: nn.Module, *, augment_strength: float = 0.5) -> None:
        if getattr(encoder, "num_classes", 0) <= 0:
            raise ValueError("objective 'supervised' needs a model with a classifier head (num_classes > 0)")
        super().__init__(encoder, augment_strength)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(self.encoder(self.view(images, generator)), labels)


class MoCoV3(Objective):
    """MoCo v3: q = predictor(projector(encoder(view))), k from the momentum encoder + projector;
    loss = 2T * [InfoNCE(q1, k2) + InfoNCE(q2, k1)]; momentum update after every step."""

    checkpoint_format = "moco_v3"

    def __init__(self, encoder: nn.Module, *, hidden: int = 256, dim: int = 64, temperature: float = 0.2,
                 momentum: float = 0.99, augment_strength: float = 1.0) -> None:
        super().__init__(encoder, augment_strength)
        width = encoder.num_features
        self.projector = _mlp([width, hidden, hidden, dim])
        self.predictor = _mlp([dim, hidden, dim])
        self.momentum_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.temperature, self.momentum = temperature, momentum

    def _keys(self, view: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.momentum_projector(_features(self.momentum_encoder, view))

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        v1, v2 = self.view(images, generator), self.view(images, generator)
        q1, q2 = (self.predictor(self.projector(_features(self.encoder, v))) for v in (v1, v2))
        k1, k2 = self._keys(v1), self._keys(v2)
        t = self.temperature
        return 2 * t * (info_nce(q1, k2, t) + info_nce(q2, k1, t))

    @torch.no_grad()
    def after_step(self) -> None:
        """Momentum (EMA) update of the key encoder and projector."""
        for online, target in ((self.encoder, self.momentum_encoder), (self.projector, self.momentum_projector)):
            for p, m in zip(online.parameters(), target.parameters()):
                m.mul_(self.momentum).add_(p.detach(), alpha=1 - self.momentum)
            for b, m in zip(online.buffers(), target.buffers()):
                m.copy_(b)

    def release_state(self) -> dict[str, torch.Tensor]:
        return {**_tensors("module.base_encoder.", self.encoder),
                **_tensors("module.base_encoder.head.", self.projector),
                **_tensors("module.momentum_encoder.", self.momentum_encoder),
                **_tensors("module.momentum_encoder.head.", self.momentum_projector),
                **_tensors("module.predictor.", self.predictor)}


class SimCLR(Objective):
    """SimCLR: NT-Xent on projector(encoder(view)) of two augmented views of each image."""

    checkpoint_format = "simclr_resnet"

    def __init__(self, encoder: nn.Module, *, hidden: int = 256, dim: int = 64, temperature: float = 0.2,
                 augment_strength: float = 1.0) -> None:
        super().__init__(encoder, augment_strength)
        self.projector = _mlp([encoder.num_features, hidden, dim], last_bn=False)
        self.temperature = temperature

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        z1, z2 = (self.projector(_features(self.encoder, self.view(images, generator))) for _ in range(2))
        return nt_xent(z1, z2, self.temperature)

    def release_state(self) -> dict[str, torch.Tensor]:
        return {**_tensors("encoder.", self.encoder), **_tensors("projector.", self.projector)}


class MAE(Objective):
    """Masked autoencoder on a timm ViT: the encoder sees a random `1 - mask_ratio` of the patches
    (plus its prefix tokens); a light decoder predicts the pixels of the masked patches (MSE on
    masked patches only, as in He et al.), per-patch normalised when `norm_pix` (their
    norm_pix_loss)."""

    def __init__(self, encoder: nn.Module, *, mask_ratio: float = 0.75, decoder_dim: int = 64,
                 decoder_depth: int = 1, decoder_heads: int = 4, norm_pix: bool = True,
                 augment_strength: float = 0.3) -> None:
        if not hasattr(encoder, "patch_embed"):
            raise ValueError("objective 'mae' needs a ViT (a model with patch_embed)")
        super().__init__(encoder, augment_strength)
        self.mask_ratio, self.norm_pix = mask_ratio, norm_pix
        self.patch = encoder.patch_embed.patch_size[0]
        n_patches, prefix = encoder.patch_embed.num_patches, encoder.num_prefix_tokens
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.randn(1, prefix + n_patches, decoder_dim) * 0.02)
        self.decoder_blocks = nn.Sequential(*(Block(decoder_dim, decoder_heads) for _ in range(decoder_depth)))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, h, w) -> (n, patches, p*p*3) in row-major patch order (timm's token order)."""
        n, c, h, w = images.shape
        p = self.patch
        x = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        enc = self.encoder
        view = self.view(images, generator)
        tokens = enc.norm_pre(enc.patch_drop(enc._pos_embed(enc.patch_embed(view))))
        prefix, patches = tokens[:, :enc.num_prefix_tokens], tokens[:, enc.num_prefix_tokens:]
        n, length, dim = patches.shape
        keep = max(1, round(length * (1 - self.mask_ratio)))
        order = torch.rand(n, length, generator=generator).argsort(dim=1)
        restore = order.argsort(dim=1)
        visible = patches.gather(1, order[:, :keep, None].expand(-1, -1, dim))
        latent = enc.norm(enc.blocks(torch.cat([prefix, visible], dim=1)))
        dec = self.decoder_embed(latent)
        dec_prefix, dec_visible = dec[:, :enc.num_prefix_tokens], dec[:, enc.num_prefix_tokens:]
        filled = torch.cat([dec_visible, self.mask_token.expand(n, length - keep, -1)], dim=1)
        filled = filled.gather(1, restore[:, :, None].expand(-1, -1, filled.shape[-1]))
        dec = self.decoder_blocks(torch.cat([dec_prefix, filled], dim=1) + self.decoder_pos)
        pred = self.decoder_pred(self.decoder_norm(dec))[:, enc.num_prefix_tokens:]
        target = self.patchify(view)
        if self.norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        masked = torch.ones(n, length).scatter_(1, order[:, :keep], 0.0)
        return (((pred - target) ** 2).mean(-1) * masked).sum() / masked.sum()


def build_objective(name: str, encoder: nn.Module, **kwargs: float | int) -> Objective:
    """The objective `name` (one of OBJECTIVES) around `encoder`, with its hyperparameters."""
    factories: dict[str, Callable[..., Objective]] = {
        "supervised": Supervised, "moco_v3": MoCoV3, "simclr": SimCLR, "mae": MAE}
    if name not in factories:
        raise ValueError(f"unknown objective {name!r}; use one of {', '.join(OBJECTIVES)}")
    return factories[name](encoder, **kwargs)


def finetune_model(arch: str, arch_kwargs: dict, weights: str, *, num_classes: int, seed: int) -> nn.Module:
    """A backbone loaded from `weights` (through the project's loader) with a fresh seeded
    `num_classes` classifier head, ready for supervised fine-tuning."""
    model = build_model(arch, arch_kwargs, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.reset_classifier(num_classes)
    return model
