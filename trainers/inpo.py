"""DDIM-InPO (Lu et al., "InPO: Inversion Preference Optimization with Reparametrized DDIM for Efficient Diffusion
Model Alignment", CVPR 2025): the Diffusion-DPO loss on latents obtained by DDIM inversion of the data with the
policy, regressing the noise the inverted latent implies.

As the official code computes it (JaydenLyh/InPO ``train.py``: the inversion L993-1015, see
:mod:`samplers.inversion`; the loss L1033-1052, identical to Salesforce Diffusion-DPO's)::

    x_t   = DDIMInvert_policy(x0, c)           eps~ = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)
    inside = -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))       err = mean_CHW (eps_pred - eps~)^2
    loss   = -mean_B logsigmoid(inside)

Symbol map: ``_w`` / ``_l`` = columns 0 / 1 of the ``[B, 2, ...]`` pair (the human-preferred image first); ``t`` is
shared within a pair (L961-962), the inverted latent and hence ``eps~`` are per image; ``beta`` in the Salesforce
convention (examples/sd15.sh: 2000, examples/sdxl.sh: 5000). The paper frames the inversion as treating the
diffusion model as a one-step generator by DDIM reparametrisation, so the implicit reward attaches to latents
"highly correlated with the preference data".

The noising is its own registered method (``ddim_inversion``: 10-step grid, eta 0.1, diffusers 0.20 grid
semantics), the default of this objective's spec; ``noising:`` in the config changes it (e.g. ``semantics:
diffusers_0.22``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from trainers.base import (
    OBJECTIVES,
    Metrics,
    Needs,
    ObjectiveContext,
    ObjectiveSpec,
    Predictions,
    dpo_margin,
    require_reference,
)
from trainers.diffusion_dpo import beta_from_convention, diffusion_dpo_loss
from workbench.batch import GroupBatch


class InPOConfig(BaseModel):
    """DDIM-InPO. Defaults quote the official SDXL launcher (examples/sdxl.sh: beta 5000)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["inpo"] = "inpo"
    beta: float = Field(
        default=5000.0, gt=0, description="DPO temperature, Salesforce convention (-0.5*beta*...)."
    )
    beta_convention: Literal["salesforce", "diffusers_sd15", "paper_sum"] = Field(
        default="salesforce", description="How `beta` is written (see diffusion_dpo)."
    )


def inpo_loss(
    policy_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, *, beta: float
) -> tuple[torch.Tensor, Metrics]:
    """DDIM-InPO over pairs ``[B, 2, C, H, W]``: Diffusion-DPO where ``target`` is the inversion-implied noise
    ``eps~`` (the noising method provides it). Metrics are Diffusion-DPO's, namespaced ``inpo/``."""
    if policy_pred.ndim != 5 or policy_pred.shape[1] != 2:
        raise ValueError(f"inpo_loss expects pairs [B, 2, C, H, W], got {tuple(policy_pred.shape)}")
    loss, metrics = diffusion_dpo_loss(policy_pred, ref_pred, target, beta=beta)
    return loss, {k.replace("dpo/", "inpo/"): v for k, v in metrics.items()}


def build(
    cfg: InPOConfig, ctx: ObjectiveContext
) -> Callable[[Predictions, GroupBatch], tuple[torch.Tensor, Metrics]]:
    c, h, w = ctx.latent_shape
    beta = beta_from_convention(cfg.beta, cfg.beta_convention, c * h * w)

    def loss(pred: Predictions, batch: GroupBatch) -> tuple[torch.Tensor, Metrics]:
        return inpo_loss(pred.policy, require_reference(pred, "inpo"), pred.target, beta=beta)

    return loss


OBJECTIVES.register("inpo")(
    ObjectiveSpec(
        config_cls=InPOConfig,
        build=build,
        needs=Needs(data="pairs"),
        noising="ddim_inversion",
        reference="base",
        margin=dpo_margin,
        progress=("inpo/implicit_acc",),
        summary="DDIM-InPO (Lu et al. 2025): Diffusion-DPO on policy-DDIM-inverted latents",
    )
)
