"""SmPO-Diffusion (Lu et al., "Smoothed Preference Optimization via ReNoise Inversion for Aligning Diffusion Models
with Varied Human Preferences", ICML 2025): Diffusion-DPO on ReNoise-inverted latents with a per-pair multiplier of
beta from a smoothed preference label.

Paper form: ``L = -E log sigmoid(-(2 alpha - gamma) beta (s_theta(x^w) - s_theta(x^l)))`` with
``alpha / gamma = p = exp(r'(x^w)) / (exp(r'(x^w)) + exp(r'(x^l)))``, ``r'`` a min-max normalised reward, so
``2 alpha - gamma = gamma (2p - 1)``. As the official code computes it (JaydenLyh/SmPO ``train.py`` L739-747 the
label, L1048-1064 the loss; the inversion L1002-1028, see :mod:`samplers.inversion`)::

    p      = exp(n_w) / (exp(n_w) + exp(n_l)) = sigmoid(n_w - n_l)       n = (score - min) / (max - min)
    inside = -0.5 * beta * (2p - 1) * gamma * ((err_w - err_l) - (ref_err_w - ref_err_l))        gamma = 10
    loss   = -mean_B logsigmoid(inside)

Symbol map: ``p`` = ``GroupBatch.pref_prob`` (P(column 0 preferred), from ``workbench relabel`` / ``workbench
synth``: :mod:`samplers.relabel`); ``_w`` / ``_l`` = columns 0 / 1; errors against the inversion-implied noise
``eps~``; ``beta`` Salesforce convention (examples/sd15.sh 2000, examples/sdxl.sh 5000). The effective beta per pair
is ``beta * gamma * (2p - 1)`` in ``[0, 4.62 beta]`` for ``p`` from normalised scores in ``[0, 1]``: a near-tie
contributes almost no gradient, ``p = 1`` is Diffusion-DPO with ``beta * gamma``.

Difference from the official code, on purpose: the multiplier is per pair. The official line uses
``batch['probs'][0]`` (pair 0's label) for the whole micro-batch, right only for one pair per device, which is how
its launchers run it (``--train_batch_size=1``).
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


class SmPOConfig(BaseModel):
    """SmPO. Defaults quote the official SDXL launcher (examples/sdxl.sh: beta 5000) and train.py's gamma (10)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["smpo"] = "smpo"
    beta: float = Field(
        default=5000.0, gt=0, description="DPO temperature, Salesforce convention (-0.5*beta*...)."
    )
    beta_convention: Literal["salesforce", "diffusers_sd15", "paper_sum"] = Field(
        default="salesforce", description="How `beta` is written (see diffusion_dpo)."
    )
    gamma: float = Field(
        default=10.0, gt=0, description="Label sensitivity: beta is scaled by gamma * (2p - 1) per pair."
    )


def smpo_loss(
    policy_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float,
    pref_prob: torch.Tensor,
    gamma: float = 10.0,
) -> tuple[torch.Tensor, Metrics]:
    """SmPO over pairs ``[B, 2, C, H, W]`` with ``pref_prob`` ``[B]`` = P(column 0 preferred) in ``[0, 1]``:
    Diffusion-DPO with beta multiplied by ``gamma * (2 p - 1)`` per pair. Metrics are Diffusion-DPO's, namespaced
    ``smpo/``, plus ``smpo/pair_weight_mean`` (the mean multiplier)."""
    if policy_pred.ndim != 5 or policy_pred.shape[1] != 2:
        raise ValueError(f"smpo_loss expects pairs [B, 2, C, H, W], got {tuple(policy_pred.shape)}")
    b = policy_pred.shape[0]
    if pref_prob.shape != (b,):
        raise ValueError(
            f"pref_prob must be [B] = [{b}] (one soft label per pair), got {tuple(pref_prob.shape)}"
        )
    p = pref_prob.to(policy_pred.device).float()
    if bool(((p < 0) | (p > 1) | p.isnan()).any()):
        raise ValueError(
            f"pref_prob must lie in [0, 1] (P(column 0 preferred)); got min {float(p.min()):.4g}, max {float(p.max()):.4g}"
        )
    weight = gamma * (2 * p - 1)  # [B]
    loss, metrics = diffusion_dpo_loss(policy_pred, ref_pred, target, beta=beta, pair_weight=weight)
    metrics = {k.replace("dpo/", "smpo/"): v for k, v in metrics.items()}
    metrics["smpo/pair_weight_mean"] = weight.mean().detach()
    return loss, metrics


def build(
    cfg: SmPOConfig, ctx: ObjectiveContext
) -> Callable[[Predictions, GroupBatch], tuple[torch.Tensor, Metrics]]:
    c, h, w = ctx.latent_shape
    beta = beta_from_convention(cfg.beta, cfg.beta_convention, c * h * w)

    def loss(pred: Predictions, batch: GroupBatch) -> tuple[torch.Tensor, Metrics]:
        if batch.pref_prob is None:
            raise ValueError(
                "smpo needs soft preference labels (GroupBatch.pref_prob); score the pairs with `workbench relabel` "
                "and read them with data.sources[].labels: scorer"
            )
        ref = require_reference(pred, "smpo")
        return smpo_loss(pred.policy, ref, pred.target, beta=beta, pref_prob=batch.pref_prob, gamma=cfg.gamma)

    return loss


OBJECTIVES.register("smpo")(
    ObjectiveSpec(
        config_cls=SmPOConfig,
        build=build,
        needs=Needs(data="pairs", soft_labels=True),
        noising="renoise_inversion",
        reference="base",
        margin=dpo_margin,
        progress=("smpo/implicit_acc",),
        summary="SmPO (Lu et al. 2025): smoothed-label DPO on ReNoise-inverted latents",
    )
)
