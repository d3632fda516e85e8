"""Diffusion-NPO (Wang et al., "Diffusion-NPO: Negative Preference Optimization for Better Preference Aligned
Generation of Diffusion Models", ICLR 2025): Diffusion-DPO with the preference order inverted, so the LoRA learns the
*dispreferred* images; the result is used as the negative (unconditional) model of classifier-free guidance.

As the official code computes it (G-U-N/Diffusion-NPO ``DPO-DPO-NPO/train_sdxl.py``: the diffusers SDXL DPO script
with one change in the data preprocessing, ``if label_0 == 1: im_tup = im_tup[::-1]`` instead of ``== 0``, i.e. the
human loser in the winner slot; research/objectives.md section 6.1)::

    inside = -0.5 * beta * ((err_l - err_w) - (ref_err_l - ref_err_w))      # = -(Diffusion-DPO's inside)
    loss   = -mean_B logsigmoid(inside)

Symbol map: ``_w`` / ``_l`` = the human-preferred / dispreferred image (columns 0 / 1 of the group); errors are
per-sample MSE (mean over C, H, W); beta in the Salesforce convention (the SDXL script's 2000; the SD1.5 script's
``beta_dpo`` 500 has no 0.5 factor, i.e. 1000 here: ``beta_convention: diffusers_sd15``).

Ties: the official scripts do not filter them; a 0.5 / 0.5 row keeps ``jpg_0`` first and is therefore trained as
"jpg_0 is the NPO winner". The default here drops ties, as Diffusion-DPO does (``data.drop_ties: true``); with
``data.drop_ties: false`` and ``objective.ties: official`` a tie pair (``pref_prob == 0.5``) is not swapped, which
reproduces the official behaviour (the readers keep a tie's images in file order).
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


class NPOConfig(BaseModel):
    """Diffusion-NPO. Defaults quote the official SDXL launcher (run_sdxl.sh: beta 2000)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["npo"] = "npo"
    beta: float = Field(
        default=2000.0, gt=0, description="DPO temperature, Salesforce convention (-0.5*beta*...)."
    )
    beta_convention: Literal["salesforce", "diffusers_sd15", "paper_sum"] = Field(
        default="salesforce",
        description="How `beta` is written (see diffusion_dpo); the SD1.5 script's 500 is diffusers_sd15.",
    )
    ties: Literal["swap", "official"] = Field(
        default="swap",
        description="Kept ties (data.drop_ties: false): swap them like every pair, or leave image 0 in the NPO "
        "winner slot as the official scripts do.",
    )


def npo_loss(
    policy_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float,
    swap: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Diffusion-NPO over pairs ``[B, 2, C, H, W]`` (column 0 = the human-preferred image): Diffusion-DPO on the
    columns swapped, so the policy is pushed towards column 1. ``swap`` (``[B]`` bool, default all True) leaves the
    pairs where it is False unswapped (official tie handling). Metrics are Diffusion-DPO's, namespaced ``npo/``:
    ``npo/implicit_acc`` is the fraction of pairs where the policy prefers the *dispreferred* image more than the
    reference does; in ``mse/*_w`` / ``mse/*_l``, ``w`` is the NPO winner (the human loser)."""
    if policy_pred.ndim != 5 or policy_pred.shape[1] != 2:
        raise ValueError(f"npo_loss expects pairs [B, 2, C, H, W], got {tuple(policy_pred.shape)}")
    if swap is None:
        order = torch.tensor([1, 0], device=policy_pred.device)
        p, r, t = policy_pred[:, order], ref_pred[:, order], target[:, order]
    else:
        s = swap.to(policy_pred.device).bool().view(-1, 1, 1, 1, 1)

        def flip(x: torch.Tensor) -> torch.Tensor:
            return torch.where(s, x.flip(1), x)

        p, r, t = flip(policy_pred), flip(ref_pred), flip(target)
    loss, metrics = diffusion_dpo_loss(p, r, t, beta=beta)
    return loss, {k.replace("dpo/", "npo/"): v for k, v in metrics.items()}


def npo_margin(pred: Predictions, batch: GroupBatch) -> torch.Tensor:
    """The implicit reward margin of the NPO winner (the human loser) over the human winner: minus DPO's."""
    return -dpo_margin(pred, batch)


def build(
    cfg: NPOConfig, ctx: ObjectiveContext
) -> Callable[[Predictions, GroupBatch], tuple[torch.Tensor, Metrics]]:
    c, h, w = ctx.latent_shape
    beta = beta_from_convention(cfg.beta, cfg.beta_convention, c * h * w)

    def loss(pred: Predictions, batch: GroupBatch) -> tuple[torch.Tensor, Metrics]:
        ref = require_reference(pred, "npo")
        swap = None
        if cfg.ties == "official" and batch.pref_prob is not None:
            swap = batch.pref_prob != 0.5  # a kept tie stays in file order: image 0 is the NPO winner
        return npo_loss(pred.policy, ref, pred.target, beta=beta, swap=swap)

    return loss


OBJECTIVES.register("npo")(
    ObjectiveSpec(
        config_cls=NPOConfig,
        build=build,
        needs=Needs(data="pairs"),
        noising="forward",
        reference="base",
        margin=npo_margin,
        progress=("npo/implicit_acc",),
        summary="Diffusion-NPO (Wang et al. 2025): DPO on swapped pairs, a negative model for CFG",
    )
)
