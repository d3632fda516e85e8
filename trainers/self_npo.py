"""Self-NPO (Wang et al., "Self-NPO: Data-Free Diffusion Model Enhancement via Truncated Diffusion Fine-Tuning",
AAAI 2026, arXiv 2505.11777): a negative model for classifier-free guidance learned without preference data or a
reward model, by regressing the model onto its own EMA teacher's truncated, anti-guided generations.

As the official code computes it (G-U-N/Diffusion-NPO ``Self-NPO/train.py`` L984-1160, ``train_xl.py``;
research/objectives.md section 7.1): the noising :mod:`samplers.truncated` (``truncated_teacher``) forward-noises a
real latent to a 25-step DDIM grid point, runs at most 5 guided DDIM steps of the EMA teacher (w = -1 SD1.5,
-5 SDXL), takes the teacher's x0 estimate ``x0^`` at the truncated point as the target and re-noises to a later
``s``; the student predicts x0 at ``s`` from the *real* prompt, and the loss is a pseudo-Huber distance on x0::

    x0_theta = (x_s - sigma_s eps_theta(x_s, s, c)) / alpha_s                        # (v models: alpha x_s - sigma v)
    loss = mean( sqrt((x0_theta - x0^)^2 + c^2) - c ),   c = huber_c = 0.001        # (loss_type l2: mean squared)

The mean runs over every element of the batch, as ``torch.mean`` does there; with equal latent sizes it equals the
mean over groups of per-sample means, so the batch loss is the mean of single-sample losses. The teacher is the
``ema`` reference (decay 0.999, updated after every optimizer step, saved with each checkpoint); it is used only by
the noising (``reference_forward=False``). Data: any captioned images; preference labels are ignored and only the
preferred column of a pair is used. Defaults quote the SD1.5 launcher (``train.sh``: lr 1e-6, weight decay 1e-3,
1000 steps, batch 20, 8-bit Adam); ``train_xl.sh`` uses lr 1e-7, no weight decay, batch 10, clipping 1.0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from samplers.truncated import origin_and_noise
from trainers.base import OBJECTIVES, Metrics, Needs, ObjectiveContext, ObjectiveSpec, Predictions
from workbench.batch import GroupBatch


class SelfNPOConfig(BaseModel):
    """Self-NPO. Defaults quote the official launchers (``train.sh`` / ``train_xl.sh``)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["self_npo"] = "self_npo"
    loss_type: Literal["huber", "l2"] = Field("huber", description="Official --loss_type (launchers: huber).")
    huber_c: float = Field(0.001, gt=0, description="Pseudo-Huber c (official --huber_c 0.001).")
    ema_decay: float = Field(
        0.999, ge=0.0, lt=1.0, description="EMA teacher decay (official update_ema 0.999)."
    )


def self_npo_loss(
    policy_x0: torch.Tensor, teacher_x0: torch.Tensor, *, huber_c: float = 0.001, loss_type: str = "huber"
) -> tuple[torch.Tensor, Metrics]:
    """Pseudo-Huber (or squared) distance between the student's and the teacher's x0, ``[B, K, C, H, W]`` each,
    averaged over every element (official ``torch.mean``), in fp32. Returns ``(loss, metrics)``."""
    if policy_x0.shape != teacher_x0.shape:
        raise ValueError(f"policy x0 {tuple(policy_x0.shape)} != teacher x0 {tuple(teacher_x0.shape)}")
    diff2 = (policy_x0.float() - teacher_x0.float()).pow(2)
    if loss_type == "huber":
        loss = (torch.sqrt(diff2 + huber_c**2) - huber_c).mean()
    elif loss_type == "l2":
        loss = diff2.mean()
    else:
        raise ValueError(f"loss_type {loss_type!r} is not supported (huber, l2)")
    return loss, {"self_npo/x0_mse": diff2.mean().detach()}


def build(
    cfg: SelfNPOConfig, ctx: ObjectiveContext
) -> Callable[[Predictions, GroupBatch], tuple[torch.Tensor, Metrics]]:
    if ctx.scheduler is None:
        raise ValueError(
            "self_npo needs the training scheduler's alphas_cumprod (ObjectiveContext.scheduler)"
        )
    alphas_cumprod = ctx.scheduler.alphas_cumprod

    def loss(pred: Predictions, batch: GroupBatch) -> tuple[torch.Tensor, Metrics]:
        # pred.x0 is the teacher's x0 at the truncated point (truncated_teacher's Noised.x0), pred.t = s
        policy_x0, _ = origin_and_noise(pred.policy, pred.x_t, pred.t, alphas_cumprod, ctx.prediction_type)
        value, metrics = self_npo_loss(policy_x0, pred.x0, huber_c=cfg.huber_c, loss_type=cfg.loss_type)
        metrics["self_npo/t_mean"] = pred.t.float().mean()
        return value, metrics

    return loss


def _reference_options(cfg: SelfNPOConfig) -> dict[str, Any]:
    return {"decay": cfg.ema_decay}


OBJECTIVES.register("self_npo")(
    ObjectiveSpec(
        config_cls=SelfNPOConfig,
        build=build,
        needs=Needs(data="winners", min_k=1),
        noising="truncated_teacher",
        reference="ema",
        reference_options=_reference_options,
        reference_forward=False,
        progress=("self_npo/x0_mse",),
        summary="Self-NPO (Wang et al. 2026): data-free truncated fine-tuning on an EMA teacher, a negative model",
    )
)
