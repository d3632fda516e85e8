"""The objective seam: what every preference objective declares, and the shared per-sample error.

An objective is one file in ``trainers/``: a pure ``<name>_loss(policy_pred, ref_pred, target, *, beta, ...)`` over
``[B, K, C, H, W]`` tensors, testable alone, plus an :class:`ObjectiveSpec` registered in :data:`OBJECTIVES` that
says what the training loop must provide and binds the loss to its config. The loop reads the spec and never names
an objective:

* ``config_cls``: the pydantic model of ``objective:`` in the YAML (``name`` is its discriminator);
* ``build(config, context) -> loss``: binds hyperparameters (beta conventions included) once, given the latent shape,
  prediction type and noise scheduler; the returned callable maps ``(Predictions, GroupBatch)`` to
  ``(scalar loss, metrics)``;
* ``needs``: what the batch must hold (pairs, K-wise rankings of fixed or variable K, soft labels, per-image scores,
  or no preference data at all), checked against the data when the config is validated and again when it is read;
* ``noising`` / ``reference``: the default noising method (a name in ``samplers.noising.NOISING``, with
  ``noising_options(config)``: fields of its config the objective's own options decide, such as RankDPO's
  ``share_noise``; an explicit ``noising:`` section may leave them unset but not contradict them) and which
  reference model it compares against (``"base"``: the pretrained weights, a frozen copy or the LoRA-disabled UNet;
  another registered reference such as ``"ema"``, with ``reference_options(config)``; ``None``: no reference forward
  at all); ``reference_forward=False`` when the reference only serves the noising method (Self-NPO's EMA teacher
  drives the truncated chain) and the loss needs no reference prediction at ``x_t``;
* ``margin``: the objective's own implicit reward margin per group (``> 0``: the policy prefers column 0 more than
  the reference does), from which the loop computes implicit accuracy; ``None`` when it has none;
* ``progress``: metric keys shown in the progress bar.

Batch layout contract (owned by :mod:`workbench.batch`): predictions and targets are ``[B, K, C, H, W]``; column 0
is the preferred image, rankings are best-first. Objectives never ``chunk(2)`` along the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel

from workbench.batch import GroupBatch
from workbench.registry import Registry

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Needs:
    """What an objective needs from the data.

    ``data``: ``"pairs"`` (preferred, dispreferred; K-wise rankings are reduced to best and worst), ``"rankings"``
    (all K images of a group, best-first), ``"winners"`` (column 0 only is used; pairs are read as they are) or
    ``"none"`` (no preference data: prompts only). ``min_k``: the smallest group it accepts. ``variable_k``: groups of
    different K may share a batch (padded; ``GroupBatch.mask``). ``soft_labels`` / ``scores``: ``GroupBatch.pref_prob``
    / ``GroupBatch.scores`` must be present.
    """

    data: Literal["pairs", "rankings", "winners", "none"] = "pairs"
    min_k: int = 2
    variable_k: bool = False
    soft_labels: bool = False
    scores: bool = False


@dataclass(frozen=True)
class ObjectiveContext:
    """What a builder may need to bind hyperparameters: the latent shape ``(C, h, w)``, the model's prediction type
    (``epsilon`` or ``v_prediction``) and the training noise scheduler (for ``alphas_cumprod``)."""

    latent_shape: tuple[int, int, int]
    prediction_type: str
    scheduler: Any = None


@dataclass(frozen=True)
class Predictions:
    """Everything the loop computed for one batch, each ``[B, K, ...]`` aligned with the group layout.

    ``policy``: the trainable model's output (with gradient); ``reference``: the reference model's output (no
    gradient) or ``None`` when the objective uses none; ``target``: what the model is trained to predict (epsilon or
    v); ``t``: ``[B, K]`` timesteps; ``x_t``: the noised latents; ``x0``: the clean latents the target is derived
    from (the batch's, or the noising method's own estimate: Self-NPO's teacher x0).
    """

    policy: torch.Tensor
    reference: torch.Tensor | None
    target: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    x0: torch.Tensor


LossFn = Callable[[Predictions, GroupBatch], tuple[torch.Tensor, Metrics]]
MarginFn = Callable[[Predictions, GroupBatch], torch.Tensor]


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective. See the module docstring for each field."""

    config_cls: type[BaseModel]
    build: Callable[[Any, ObjectiveContext], LossFn]
    needs: Needs = Needs()
    noising: str = "forward"
    noising_options: Callable[[Any], dict[str, Any]] | None = (
        None  # config -> fields of the noising config (e.g. share_noise) that `noising:` does not set itself
    )
    reference: str | None = "base"  # "base", a name in workbench.references.REFERENCES (e.g. "ema"), or None
    reference_options: Callable[[Any], dict[str, Any]] | None = (
        None  # config -> keyword options of the reference
    )
    reference_forward: bool = (
        True  # False: the reference only serves the noising (a teacher), no forward at x_t
    )
    margin: MarginFn | None = None
    progress: tuple[str, ...] = ()
    summary: str = ""


OBJECTIVES: Registry[ObjectiveSpec] = Registry("objective")


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over C, H, W in fp32 (every official codebase: ``.mean(dim=[1,2,3])``).

    ``pred``, ``target``: ``[..., C, H, W]`` -> ``[...]``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    return (pred.float() - target.float()).pow(2).mean(dim=(-3, -2, -1))


def require_reference(pred: Predictions, objective: str) -> torch.Tensor:
    """The reference predictions, or a clear error when the loop was told the objective needs none."""
    if pred.reference is None:
        raise ValueError(f"{objective} needs reference predictions; its spec must not set reference=None")
    return pred.reference


def dpo_margin(pred: Predictions, batch: GroupBatch) -> torch.Tensor:
    """Diffusion-DPO's implicit reward difference per group (paper Supp. S4.1), up to the positive factor beta:
    ``(err_ref(w) - err(w)) - (err_ref(l) - err(l))`` on columns 0 and 1; ``> 0`` when the policy prefers the winner
    more than the reference does. ``[B]``."""
    ref = require_reference(pred, "dpo_margin")
    gap = per_sample_error(ref[:, :2], pred.target[:, :2]) - per_sample_error(
        pred.policy[:, :2], pred.target[:, :2]
    )  # [B, 2]
    return gap[:, 0] - gap[:, 1]
