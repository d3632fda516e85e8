"""Diffusion-DPO and SFT: invariants with hand-derived values (research/objectives.md section 14.3)."""

from __future__ import annotations

import math

import pytest
import torch

from trainers import OBJECTIVES
from trainers.diffusion_dpo import beta_from_convention, diffusion_dpo_loss
from trainers.sft import sft_loss


def _group(b: int = 4, k: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (b, k, 4, 8, 8)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_loss_is_ln2_when_policy_equals_reference():
    """inside = -0.5*beta*(d - d) = 0 for every pair, so loss = -log sigmoid(0) = ln 2."""
    policy, _, target = _group()
    loss, metrics = diffusion_dpo_loss(policy, policy.clone(), target, beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["dpo/implicit_acc"].item() == 0.0  # Salesforce: ties count as wrong
    assert metrics["dpo/implicit_acc_ties_half"].item() == 0.5  # diffusers convention


def test_hand_derived_value():
    """One pair, C=H=W=1: policy errors w=1, l=4; reference w=4, l=1.
    model_diff = 1-4 = -3, ref_diff = 4-1 = 3, inside = -0.5*beta*(-3-3) = 3*beta; beta=0.1 -> 0.3.
    loss = -log sigmoid(0.3) = log(1 + e^-0.3)."""
    target = torch.zeros(1, 2, 1, 1, 1)
    policy = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1, 1)
    ref = torch.tensor([2.0, 1.0]).view(1, 2, 1, 1, 1)
    loss, metrics = diffusion_dpo_loss(policy, ref, target, beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.3)), rel=1e-6)
    assert metrics["dpo/logit_mean"].item() == pytest.approx(0.3, rel=1e-6)
    assert metrics["dpo/implicit_acc"].item() == 1.0


def test_batch_loss_is_mean_of_pair_losses():
    policy, ref, target = _group(b=5)
    batch_loss, _ = diffusion_dpo_loss(policy, ref, target, beta=3.0)
    per_pair = [
        diffusion_dpo_loss(policy[i : i + 1], ref[i : i + 1], target[i : i + 1], beta=3.0)[0]
        for i in range(5)
    ]
    assert batch_loss.item() == pytest.approx(torch.stack(per_pair).mean().item(), rel=1e-6)


def test_swapping_winner_and_loser_negates_logits():
    policy, ref, target = _group()
    _, m = diffusion_dpo_loss(policy, ref, target, beta=7.0)
    _, m_swapped = diffusion_dpo_loss(policy.flip(1), ref.flip(1), target.flip(1), beta=7.0)
    assert m_swapped["dpo/logit_mean"].item() == pytest.approx(-m["dpo/logit_mean"].item(), rel=1e-5)


def test_gradient_is_nonzero_at_init_and_reference_gets_none():
    policy, _, target = _group()
    policy = policy.clone().requires_grad_(True)
    ref = policy.detach().clone().requires_grad_(True)
    loss, _ = diffusion_dpo_loss(policy, ref, target, beta=100.0)
    loss.backward()
    assert policy.grad is not None and policy.grad.abs().sum() > 0
    assert ref.grad is None


def test_beta_conventions_give_the_same_loss():
    """diffusers SD1.5 beta_dpo=2500 (no 0.5 factor) is Salesforce beta=5000 (PR huggingface/diffusers#6788)."""
    policy, ref, target = _group()
    chw = policy[0, 0].numel()
    a, _ = diffusion_dpo_loss(policy, ref, target, beta=beta_from_convention(2500, "diffusers_sd15", chw))
    b, _ = diffusion_dpo_loss(policy, ref, target, beta=5000)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert beta_from_convention(1.0, "paper_sum", chw) == 2.0 * chw


def test_pair_weight_scales_beta():
    policy, ref, target = _group(b=3)
    weighted, _ = diffusion_dpo_loss(policy, ref, target, beta=2.0, pair_weight=torch.full((3,), 0.5))
    plain, _ = diffusion_dpo_loss(policy, ref, target, beta=1.0)
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-6)


def test_bad_layout_is_refused():
    with pytest.raises(ValueError, match=r"pairs \[B, 2, C, H, W\]"):
        diffusion_dpo_loss(
            torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8), beta=1.0
        )


def test_groups_of_more_than_two_are_refused_not_cut():
    """The old loss silently used columns 0 and 1 of a K = 3 group (the middle image became the loser)."""
    policy, ref, target = _group(k=3)
    with pytest.raises(ValueError, match="reduced to \\(best, worst\\) pairs"):
        diffusion_dpo_loss(policy, ref, target, beta=1.0)


def test_sft_uses_only_the_preferred_column():
    policy, _, target = _group()
    loss, _ = sft_loss(policy, None, target)
    expected = (policy[:, 0] - target[:, 0]).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_every_objective_has_a_config_model_and_a_shipped_yaml():
    from pathlib import Path

    shipped = "\n".join(p.read_text() for p in Path(__file__).parents[1].joinpath("configs").rglob("*.yaml"))
    for name, obj in OBJECTIVES.items():
        assert obj.config_cls.model_fields["name"].default == name
        assert f"name: {name}" in shipped, f"no YAML under configs/ uses objective {name}"


# ------------------------------------------------------------------------------------------------ Diffusion-NPO
def test_npo_is_dpo_on_swapped_columns_and_negates_its_logits():
    """NPO puts the human loser in the winner slot (G-U-N/Diffusion-NPO train_sdxl.py): its loss is Diffusion-DPO's on
    the flipped group, and every logit is the negated DPO logit."""
    from trainers.npo import npo_loss

    policy, ref, target = _group(b=6)
    loss, m = npo_loss(policy, ref, target, beta=7.0)
    swapped, _ = diffusion_dpo_loss(policy.flip(1), ref.flip(1), target.flip(1), beta=7.0)
    assert loss.item() == pytest.approx(swapped.item(), rel=1e-6)
    _, m_dpo = diffusion_dpo_loss(policy, ref, target, beta=7.0)
    assert m["npo/logit_mean"].item() == pytest.approx(-m_dpo["dpo/logit_mean"].item(), rel=1e-5)
    assert m["npo/implicit_acc"].item() == pytest.approx(
        1 - m_dpo["dpo/implicit_acc"].item()
    )  # no exact ties


def test_npo_batch_loss_is_mean_of_pair_losses_and_ties_can_stay_unswapped():
    from trainers.npo import npo_loss

    policy, ref, target = _group(b=5, seed=3)
    swap = torch.tensor([True, False, True, True, False])
    batch_loss, _ = npo_loss(policy, ref, target, beta=3.0, swap=swap)
    per_pair = [
        npo_loss(policy[i : i + 1], ref[i : i + 1], target[i : i + 1], beta=3.0, swap=swap[i : i + 1])[0]
        for i in range(5)
    ]
    assert batch_loss.item() == pytest.approx(torch.stack(per_pair).mean().item(), rel=1e-6)
    kept, _ = npo_loss(policy[1:2], ref[1:2], target[1:2], beta=3.0, swap=swap[1:2])
    dpo, _ = diffusion_dpo_loss(policy[1:2], ref[1:2], target[1:2], beta=3.0)
    assert kept.item() == pytest.approx(
        dpo.item(), rel=1e-6
    )  # an unswapped (official tie) pair is a DPO pair


def test_npo_sd15_beta_convention():
    """The official SD1.5 script's beta_dpo 500 (no 0.5 factor) is 1000 in the Salesforce convention."""
    assert beta_from_convention(500, "diffusers_sd15", 4 * 8 * 8) == 1000
