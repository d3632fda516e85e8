"""RankDPO (Karthik, Coskun, Akata, Tulyakov, Ren, Kag, "Scalable Ranked Preference Optimization for Text-to-Image
Generation", arXiv 2410.18013, ICCV 2025): a DCG-weighted pairwise Diffusion-DPO over K ranked images per prompt.

No official code was available (research/objectives.md section 8); this follows the paper (arXiv v2), Eqs. 5-7 and
Algorithm 2 (numbered as its Figure 2 caption cites them: scores Eq. 5, DCG weights Eq. 6, loss Eq. 7). Per group
(one prompt c, K images x^1..x^K with scores phi in [0, 1], higher = better), one timestep t and, per Algorithm 2,
independent noise eps^i per image::

    s_i      = ||eps^i - eps_theta(x_t^i, c)||^2 - ||eps^i - eps_ref(x_t^i, c)||^2    (Eq. 5, lower = better)
    tau(i)   = rank of image i by phi (tau = 1 best)
    G_i      = 2^phi_i - 1,   D(tau) = ln(1 + tau)                                   (Eq. 6, DCG gain and discount)
    Delta_ij = |G_i - G_j| * |1 / D(tau(i)) - 1 / D(tau(j))|                        (Eq. 6, the DCG pair weight)
    L        = -E_{c,t} sum_{i,j: phi_i > phi_j} Delta_ij log sigmoid(-0.5 beta (s_i - s_j))    (Eq. 7, ranking loss)

Symbol map: ``s_i`` = per-sample MSE of the policy minus the reference's, mean over C, H, W in fp32 (the reduction is
not specified by the paper; the mean makes beta the Salesforce Diffusion-DPO beta, so that at K = 2 the loss is
Diffusion-DPO's ``-logsigmoid(-0.5 * beta * ((err_w - ref_w) - (err_l - ref_l)))`` times the pair weight: the
"DPO + Gain Weights" row of the paper's Table 5). ``phi`` = ``GroupBatch.scores``: the Syn-Pic score, the average
pairwise win rate over n reward models (Algorithm 1; ``workbench synth`` writes it). The sum runs over the ordered
pairs of each group and the result is averaged over groups (the paper sums over pairs; it does not normalise).
``D`` uses the natural log (the paper writes ``log``; a base-2 log would multiply every weight by ln 2).

Choices the paper leaves open, as options:

* ``discounts``: ``true`` (default) ranks by phi, as the paper's section 3.3 text and Algorithm 2 (``D(tau^-1(i))``
  with tau from phi) say; ``predicted`` ranks by the model's current ordering (s ascending), as the Figure 2 caption
  says and as LambdaLoss does. Predicted ranks are computed without gradient.
* ``noise``: ``independent`` (default, Algorithm 2: ``eps^i ~ N(0, I)`` per image) or ``shared`` (one draw per
  group, as Diffusion-DPO shares it within a pair). It sets the forward noising's ``share_noise`` through the spec's
  ``noising_options``; the timestep is always shared within a group (Algorithm 2 samples one t per prompt).

Ties in phi are handled explicitly: tied images share the mean of the ranks they span (``phi = [1, .5, .5, 0]`` ranks
``[1, 2.5, 2.5, 4]``), so the loss does not depend on the order in which tied images are stored, and a tied pair has
no term (``G_i = G_j`` and neither is ranked above the other). The predicted ranks treat equal ``s`` the same way.
Groups of different K share a batch through ``GroupBatch.mask`` (padding columns have no rank and no pair).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

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
    per_sample_error,
    require_reference,
)
from trainers.diffusion_dpo import beta_from_convention
from workbench.batch import GroupBatch

Discounts = Literal["true", "predicted"]


class RankDPOConfig(BaseModel):
    """RankDPO. The paper does not state beta, the learning rate or the optimiser (research/objectives.md 8.3); beta
    defaults to the Salesforce Diffusion-DPO SDXL value, so that K = 2 is Diffusion-DPO up to the gain weight."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["rankdpo"] = "rankdpo"
    beta: float = Field(
        default=5000.0, gt=0, description="DPO temperature, Salesforce convention (-0.5*beta*...)."
    )
    beta_convention: Literal["salesforce", "diffusers_sd15", "paper_sum"] = Field(
        default="salesforce", description="How `beta` is written (see diffusion_dpo)."
    )
    discounts: Discounts = Field(
        default="true",
        description="DCG discounts from the true ranks by phi (paper text, Algorithm 2) or from the model's "
        "predicted ranks (paper Figure 2 caption, LambdaLoss).",
    )
    noise: Literal["independent", "shared"] = Field(
        default="independent",
        description="Noise across a group's K images: independent per image (paper Algorithm 2) or one shared "
        "draw (Diffusion-DPO's pairs). Sets noising.share_noise.",
    )


def average_ranks(key: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rank 1 = the largest ``key`` among the valid columns of each row; tied values share the mean of the ranks
    they span. ``key``, ``valid``: ``[B, K]`` -> ``[B, K]`` float ranks (padding columns get rank 0)."""
    k = torch.where(valid, key, torch.zeros_like(key))
    other = valid[:, None, :]  # [B, 1, K]: column j is a real image
    above = ((k[:, None, :] > k[:, :, None]) & other).sum(-1)  # [B, K]: valid j ranked strictly above i
    equal = ((k[:, None, :] == k[:, :, None]) & other).sum(-1) - 1  # [B, K]: valid j != i tied with i
    ranks = 1.0 + above.to(key.dtype) + 0.5 * equal.to(key.dtype)
    return torch.where(valid, ranks, torch.zeros_like(ranks))


def pair_weights(phi: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``Delta_ij = |G_i - G_j| * |1/D_i - 1/D_j|`` for the pairs with ``phi_i > phi_j`` (i ranked above j), zero
    elsewhere. ``phi``, ``ranks``, ``valid``: ``[B, K]`` -> ``[B, K, K]`` (index ``[b, i, j]``)."""
    gain = torch.exp2(phi) - 1.0  # [B, K]   G = 2^phi - 1
    inv_disc = 1.0 / torch.log1p(ranks.clamp_min(1.0))  # [B, K]   1 / ln(1 + rank)
    above = (phi[:, :, None] > phi[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # [B, K, K]
    weight = (gain[:, :, None] - gain[:, None, :]).abs() * (inv_disc[:, :, None] - inv_disc[:, None, :]).abs()
    return torch.where(above, weight, torch.zeros_like(weight))


def _checked_phi(phi: torch.Tensor, valid: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if tuple(phi.shape) != shape:
        raise ValueError(f"phi must be [B, K] = {list(shape)} (one score per image), got {list(phi.shape)}")
    phi = phi.float()
    real = phi[valid]
    if not bool(torch.isfinite(real).all()) or bool((real < 0).any()) or bool((real > 1).any()):
        bad = [float(v) for v in real[~(torch.isfinite(real) & (real >= 0) & (real <= 1))][:3]]
        raise ValueError(
            f"phi (the per-image scores, data 'scores') must lie in [0, 1] for every real image, got e.g. {bad}; "
            "RankDPO's gain is 2^phi - 1: use the Syn-Pic win rate that `workbench synth` writes (or rescale "
            "the scores to [0, 1])"
        )
    return torch.where(valid, phi, torch.zeros_like(phi))


def rankdpo_loss(
    policy_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float,
    phi: torch.Tensor,
    mask: torch.Tensor | None = None,
    discounts: Discounts = "true",
) -> tuple[torch.Tensor, Metrics]:
    """RankDPO over groups ``[B, K, C, H, W]`` (K >= 2) with scores ``phi`` ``[B, K]`` in [0, 1] (higher = better).

    ``mask`` (``[B, K]`` bool, False = padding) lets groups of different K share a batch. The image order inside a
    group does not matter (ranks come from ``phi``). Returns the mean over groups of each group's sum over its
    ranked pairs, and detached metrics (``rankdpo/pair_acc``: fraction of ranked pairs whose logit is > 0, ties
    wrong; ``mse/*_w`` / ``mse/*_l``: the best / worst image by phi).
    """
    if policy_pred.ndim != 5 or policy_pred.shape[1] < 2:
        raise ValueError(f"rankdpo_loss expects groups [B, K >= 2, C, H, W], got {tuple(policy_pred.shape)}")
    if discounts not in ("true", "predicted"):
        raise ValueError(f"discounts={discounts!r}: use 'true' (ranks by phi) or 'predicted' (by the model)")
    b, k = policy_pred.shape[:2]
    valid = (
        torch.ones(b, k, dtype=torch.bool, device=policy_pred.device)
        if mask is None
        else mask.to(policy_pred.device).bool()
    )
    if tuple(valid.shape) != (b, k):
        raise ValueError(f"mask must be [B, K] = {[b, k]}, got {list(valid.shape)}")
    if bool((valid.sum(1) < 2).any()):
        raise ValueError("every group needs at least 2 real images (mask); drop groups of one image")
    phi = _checked_phi(phi.to(policy_pred.device), valid, (b, k))
    err = per_sample_error(policy_pred, target)  # [B, K]
    with torch.no_grad():
        ref_err = per_sample_error(ref_pred, target)  # [B, K]
    s = torch.where(valid, err - ref_err, torch.zeros_like(err))  # [B, K]   Eq. 5
    key = phi if discounts == "true" else -s.detach()  # higher key = ranked higher (predicted: lower s)
    ranks = average_ranks(key, valid)  # [B, K]
    weight = pair_weights(phi, ranks, valid)  # [B, K, K]
    inside = -0.5 * beta * (s[:, :, None] - s[:, None, :])  # [B, K, K]: > 0 when the policy favours i over j
    pairs = weight > 0
    per_pair = torch.where(pairs, weight * -F.logsigmoid(inside), torch.zeros_like(inside))
    loss = per_pair.sum(dim=(1, 2)).mean()  # sum over pairs, mean over groups

    with torch.no_grad():
        ranked = (
            (phi[:, :, None] > phi[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        )  # every i above j
        n_ranked = ranked.sum().clamp_min(1)
        low = torch.finfo(phi.dtype).min
        best = torch.where(valid, phi, torch.full_like(phi, low)).argmax(1, keepdim=True)  # [B, 1]
        worst = torch.where(valid, phi, torch.full_like(phi, 2.0)).argmin(1, keepdim=True)
        metrics = {
            "rankdpo/pair_acc": ((inside > 0) & ranked).sum() / n_ranked,
            "rankdpo/logit_mean": torch.where(ranked, inside, torch.zeros_like(inside)).sum() / n_ranked,
            "rankdpo/saturated_frac": ((inside.abs() > 10) & ranked).sum() / n_ranked,
            "rankdpo/pair_weight_mean": weight.sum() / n_ranked,
            "rankdpo/pairs_per_group": ranked.sum() / b,
            "mse/policy_w": err.gather(1, best).mean(),
            "mse/policy_l": err.gather(1, worst).mean(),
            "mse/ref_w": ref_err.gather(1, best).mean(),
            "mse/ref_l": ref_err.gather(1, worst).mean(),
        }
    return loss, {key_: v.detach().float() for key_, v in metrics.items()}


def _phi_of(batch: GroupBatch) -> torch.Tensor:
    if batch.scores is None:
        raise ValueError(
            "rankdpo needs a score per image (phi in [0, 1]); the batch has none: use ranking_jsonl data with "
            "'scores' (workbench synth writes the Syn-Pic win rate there)"
        )
    return batch.scores


def rankdpo_margin(pred: Predictions, batch: GroupBatch) -> torch.Tensor:
    """RankDPO's implicit reward margin per group, up to the factor beta / 2: ``sum_{phi_i > phi_j} Delta_ij (s_j -
    s_i)`` with the true-rank weights; ``> 0`` when the policy favours the better-ranked images more than the
    reference does, weighted as the loss weights them. ``[B]``."""
    ref = require_reference(pred, "rankdpo_margin")
    b, k = pred.policy.shape[:2]
    valid = torch.ones(b, k, dtype=torch.bool) if batch.mask is None else batch.mask.bool()
    valid = valid.to(pred.policy.device)
    phi = _checked_phi(_phi_of(batch).to(pred.policy.device), valid, (b, k))
    s = per_sample_error(pred.policy, pred.target) - per_sample_error(ref, pred.target)
    s = torch.where(valid, s, torch.zeros_like(s))
    weight = pair_weights(phi, average_ranks(phi, valid), valid)
    return (weight * (s[:, None, :] - s[:, :, None])).sum(dim=(1, 2))


def build(
    cfg: RankDPOConfig, ctx: ObjectiveContext
) -> Callable[[Predictions, GroupBatch], tuple[torch.Tensor, Metrics]]:
    """Bind beta (translated to the Salesforce convention for this latent size) and the discount mode."""
    c, h, w = ctx.latent_shape
    beta = beta_from_convention(cfg.beta, cfg.beta_convention, c * h * w)

    def loss(pred: Predictions, batch: GroupBatch) -> tuple[torch.Tensor, Metrics]:
        ref = require_reference(pred, "rankdpo")
        return rankdpo_loss(
            pred.policy,
            ref,
            pred.target,
            beta=beta,
            phi=_phi_of(batch),
            mask=batch.mask,
            discounts=cfg.discounts,
        )

    return loss


def noising_options(cfg: RankDPOConfig) -> dict[str, Any]:
    """The forward noising's noise sharing from ``objective.noise``."""
    return {"share_noise": cfg.noise == "shared"}


#: |1/ln 2 - 1/ln 3|: the discount factor of the only pair of a K = 2 group (ranks 1 and 2).
K2_DISCOUNT = abs(1.0 / math.log(2.0) - 1.0 / math.log(3.0))

OBJECTIVES.register("rankdpo")(
    ObjectiveSpec(
        config_cls=RankDPOConfig,
        build=build,
        needs=Needs(data="rankings", min_k=2, variable_k=True, scores=True),
        noising="forward",
        noising_options=noising_options,
        reference="base",
        margin=rankdpo_margin,
        progress=("rankdpo/pair_acc",),
        summary="RankDPO (Karthik et al. 2024): DCG-weighted pairwise Diffusion-DPO over Syn-Pic rankings",
    )
)
