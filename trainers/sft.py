"""Supervised fine-tuning on the preferred image only: the baseline every preference method is compared against.

Diffusion-DPO ``train.py --sft``: ``F.mse_loss(pred_w, eps)``, no reference model. Column 0 of the group is used;
the other columns are ignored (they are still in the batch so that SFT and DPO see identical data).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from trainers.base import OBJECTIVES, Objective, per_sample_error


class SFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["sft"] = "sft"


def sft_loss(
    policy_pred: torch.Tensor, ref_pred: torch.Tensor | None, target: torch.Tensor, *, beta: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean per-sample MSE of the preferred column. ``ref_pred`` and ``beta`` are accepted and ignored."""
    err_w = per_sample_error(policy_pred[:, 0], target[:, 0])  # [B]
    loss = err_w.mean()
    return loss, {"mse/policy_w": loss.detach()}


OBJECTIVES.register("sft")(
    Objective(loss_fn=sft_loss, config_cls=SFTConfig, needs_reference=False, min_images_per_group=1)
)
