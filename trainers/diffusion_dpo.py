"""Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", CVPR 2024).

Paper Eq. 14 with constant weighting omega(lambda_t) and T folded into beta::

    L(theta) = -E log sigmoid( -beta * [ (||eps - eps_theta(x_t^w)||^2 - ||eps - eps_ref(x_t^w)||^2)
                                        - (||eps - eps_theta(x_t^l)||^2 - ||eps - eps_ref(x_t^l)||^2) ] )

As the official code computes it (SalesforceAIResearch/DiffusionDPO ``train.py``, loss block; also the diffusers
SDXL example ``train_diffusion_dpo_sdxl.py``)::

    inside = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    loss   = -logsigmoid(inside).mean()

Symbol map: ``err_*`` = per-sample MSE, mean over C, H, W in fp32 (not the paper pseudocode's sum);
``_w`` / ``_l`` = column 0 / column 1 of the ``[B, K, ...]`` group; ``beta`` = the Salesforce beta (5000 for SDXL
in the launchers). Conventions differ between codebases (research/objectives.md section 1.1): the diffusers SD1.5
script's ``beta_dpo`` has no 0.5 factor, so its 2500 equals beta = 5000 here; the paper pseudocode sums over C*H*W.
Use :func:`beta_from_convention` to translate.

``target`` is whatever the model is trained to predict: epsilon, or v for v-prediction models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from trainers.base import (
    OBJECTIVES,
    Metrics,
    Needs,
    ObjectiveContext,
    ObjectiveSpec,
    Predictions,
    dpo_margin,
    per_sample_error,
    require_reference,
)
from workbench.batch import GroupBatch


class DiffusionDPOConfig(BaseModel):
    """Diffusion-DPO. Defaults quote the official launchers (sdxl.sh / sd15.sh: beta 5000)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["diffusion_dpo"] = "diffusion_dpo"
    beta: float = Field(5000.0, gt=0, description="DPO temperature, Salesforce convention (-0.5*beta*...).")
    beta_convention: Literal["salesforce", "diffusers_sd15", "paper_sum"] = Field(
        "salesforce",
        description="How `beta` is written: salesforce (default), diffusers_sd15 (no 0.5 factor: x2), "
        "paper_sum (summed squared error: x2*C*H*W).",
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="Optional winner-MSE regulariser (MaPO/SDPO-style guard against both errors rising).",
    )


def beta_from_convention(beta: float, convention: str, numel_chw: int) -> float:
    """Translate a beta written in another codebase's convention into the Salesforce convention used here."""
    if convention == "salesforce":
        return beta
    if convention == "diffusers_sd15":  # logit = beta * (ref_diff - model_diff), no 0.5
        return 2.0 * beta
    if convention == "paper_sum":  # logit = -beta * (w_diff - l_diff) with errors summed over C*H*W
        return 2.0 * beta * numel_chw
    raise ValueError(f"unknown beta_convention {convention!r}; use salesforce, diffusers_sd15 or paper_sum")


def diffusion_dpo_loss(
    policy_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float,
    pair_weight: torch.Tensor | None = None,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO loss over pairs ``[B, 2, C, H, W]`` (column 0 preferred, column 1 dispreferred).

    ``pair_weight`` (``[B]``) multiplies beta per pair (SmPO's smoothed-label scale uses this hook).
    Returns the scalar mean over pairs and detached metrics. Groups of K > 2 are refused rather than silently cut
    to their first two columns: reduce rankings to pairs in the data (``Needs(data="pairs")`` does) or use a
    ranking objective.
    """
    if policy_pred.ndim != 5 or policy_pred.shape[1] != 2:
        raise ValueError(
            f"diffusion_dpo_loss expects pairs [B, 2, C, H, W], got {tuple(policy_pred.shape)}; K-wise groups must be "
            "reduced to (best, worst) pairs first, or trained with a ranking objective"
        )
    err = per_sample_error(policy_pred, target)  # [B, 2]
    with torch.no_grad():
        ref_err = per_sample_error(ref_pred, target)  # [B, 2]
    model_diff = err[:, 0] - err[:, 1]  # [B]
    ref_diff = ref_err[:, 0] - ref_err[:, 1]  # [B]
    scale = beta if pair_weight is None else beta * pair_weight.float()
    inside = (
        -0.5 * scale * (model_diff - ref_diff)
    )  # [B]; > 0 when the policy prefers the winner more than ref
    loss = -F.logsigmoid(inside).mean()
    if sft_weight:
        loss = loss + sft_weight * err[:, 0].mean()
    metrics = {
        "dpo/implicit_acc": (inside > 0).float().mean(),  # Salesforce convention: ties count as wrong
        "dpo/implicit_acc_ties_half": ((inside > 0).float() + 0.5 * (inside == 0).float()).mean(),
        "dpo/logit_mean": inside.mean(),
        "dpo/logit_abs_mean": inside.abs().mean(),
        "dpo/saturated_frac": (inside.abs() > 10).float().mean(),
        "mse/policy_w": err[:, 0].mean(),
        "mse/policy_l": err[:, 1].mean(),
        "mse/ref_w": ref_err[:, 0].mean(),
        "mse/ref_l": ref_err[:, 1].mean(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def build(
    cfg: DiffusionDPOConfig, ctx: ObjectiveContext
) -> Callable[[Predictions, GroupBatch], tuple[torch.Tensor, Metrics]]:
    """Bind beta (translated to the Salesforce convention for this latent size) and the SFT weight."""
    c, h, w = ctx.latent_shape
    beta = beta_from_convention(cfg.beta, cfg.beta_convention, c * h * w)

    def loss(pred: Predictions, batch: GroupBatch) -> tuple[torch.Tensor, Metrics]:
        ref = require_reference(pred, "diffusion_dpo")
        return diffusion_dpo_loss(pred.policy, ref, pred.target, beta=beta, sft_weight=cfg.sft_weight)

    return loss


OBJECTIVES.register("diffusion_dpo")(
    ObjectiveSpec(
        config_cls=DiffusionDPOConfig,
        build=build,
        needs=Needs(data="pairs"),
        noising="forward",
        reference="base",
        margin=dpo_margin,
        progress=("dpo/implicit_acc",),
        summary="Diffusion-DPO (Wallace et al. 2024), Salesforce train.py loss",
    )
)
