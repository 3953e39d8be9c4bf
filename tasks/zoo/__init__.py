"""The offline model zoo: tiny ViTs and ResNets trained on the digits with the studies' objectives
(`objectives`: supervised, MoCo v3, SimCLR, MAE), `data` (the digits as tensors, augmentations), `train`
(members, cards, checkpoints in the released key layouts). Names are imported on first use (`storage.lazy`)."""

from storage.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "objectives": ("OBJECTIVES", "build_objective", "finetune_model"),
    "train": ("VARIANTS", "Member", "checkpoint_path", "is_current", "read_card", "spec_hashes", "train_member",
              "zoo_members"),
})
