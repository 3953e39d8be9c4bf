"""The offline model zoo: tiny ViTs and ResNets trained on the digits with the studies' objectives
(`objectives`: supervised, MoCo v3, SimCLR, MAE), `data` (the digits as tensors, augmentations), `train`
(members, cards, checkpoints in the released key layouts)."""

from tasks.zoo.objectives import OBJECTIVES, build_objective, finetune_model
from tasks.zoo.train import (
                             VARIANTS,
                             Member,
                             checkpoint_path,
                             is_current,
                             read_card,
                             spec_hashes,
                             train_member,
                             zoo_members,
)

__all__ = ["OBJECTIVES", "VARIANTS", "Member", "build_objective", "checkpoint_path", "finetune_model", "is_current",
           "read_card", "spec_hashes", "train_member", "zoo_members"]
