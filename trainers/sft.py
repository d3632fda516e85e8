"""Supervised fine-tuning on the preferred image only: the baseline every preference method is compared against.

Diffusion-DPO ``train.py --sft``: ``F.mse_loss(pred_w, eps)``, no reference model. Column 0 of the group is used;
the other columns are ignored (they are still in the batch so that SFT and DPO see identical data).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from trainers.base import (
    OBJECTIVES,
    Metrics,
    Needs,
    ObjectiveContext,
    ObjectiveSpec,
    Predictions,
    per_sample_error,
)
from workbench.batch import GroupBatch


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


def build(
    cfg: SFTConfig, ctx: ObjectiveContext
) -> Callable[[Predictions, GroupBatch], tuple[torch.Tensor, Metrics]]:
    def loss(pred: Predictions, batch: GroupBatch) -> tuple[torch.Tensor, Metrics]:
        return sft_loss(pred.policy, None, pred.target)

    return loss


OBJECTIVES.register("sft")(
    ObjectiveSpec(
        config_cls=SFTConfig,
        build=build,
        needs=Needs(data="winners", min_k=1),
        noising="forward",
        reference=None,
        summary="supervised fine-tuning on the preferred images (Diffusion-DPO train.py --sft)",
    )
)
