"""DDIM-InPO and SmPO: loss invariants with hand-derived values (research/objectives.md sections 4, 5, 14.3) and the
objectives through the training loop on the tiny SDXL model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from samplers.noising import Noised, NoisingContext
from trainers import OBJECTIVES
from trainers.diffusion_dpo import diffusion_dpo_loss
from trainers.inpo import inpo_loss
from trainers.smpo import smpo_loss
from workbench.config import load_config
from workbench.train import Trainer

ROOT = Path(__file__).parents[1]
SDXL_LORA = "configs/tiny/sdxl_dpo_lora.yaml"
SMPO_MIN, SMPO_MAX = 0.11543526500463486, 0.28201571106910706  # SmPO train.py L741-742 (raw PickScore cosine)


def _pairs(b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (b, 2, 4, 6, 6)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# ------------------------------------------------------------------------------------------------------- SmPO
def test_smpo_with_p_half_has_zero_loss_gradient():
    """p = 0.5: the multiplier gamma * (2p - 1) = 0, so inside = 0 for every pair: loss = ln 2, gradient 0."""
    policy, ref, target = _pairs(4)
    policy.requires_grad_(True)
    loss, m = smpo_loss(policy, ref, target, beta=5000.0, pref_prob=torch.full((4,), 0.5))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert policy.grad is not None and policy.grad.abs().max().item() == 0.0
    assert m["smpo/pair_weight_mean"].item() == 0.0


def test_smpo_with_p_one_is_dpo_with_ten_times_beta():
    """p = 1: gamma * (2p - 1) = 10, the official scale_term -0.5 * beta * 10 (SmPO train.py L1061)."""
    policy, ref, target = _pairs(3, seed=1)
    p1 = policy.clone().requires_grad_(True)
    p2 = policy.clone().requires_grad_(True)
    a, _ = smpo_loss(p1, ref, target, beta=0.02, pref_prob=torch.ones(3))
    b, _ = diffusion_dpo_loss(p2, ref, target, beta=0.2)
    a.backward()
    b.backward()
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert p1.grad is not None and p2.grad is not None
    torch.testing.assert_close(p1.grad, p2.grad)


@pytest.mark.parametrize("b", [1, 3, 8])
def test_smpo_batch_loss_is_the_mean_of_per_pair_losses(b: int):
    """Each pair gets its own multiplier (the official code applies batch['probs'][0] to the whole batch)."""
    policy, ref, target = _pairs(b, seed=b)
    p = torch.linspace(0.5, 0.73, b)
    batch, _ = smpo_loss(policy, ref, target, beta=3.0, pref_prob=p)
    single = [
        smpo_loss(policy[i : i + 1], ref[i : i + 1], target[i : i + 1], beta=3.0, pref_prob=p[i : i + 1])[0]
        for i in range(b)
    ]
    assert batch.item() == pytest.approx(torch.stack(single).mean().item(), rel=1e-6)
    if b > 1:  # pair 0's label for everyone (the official shortcut) gives another loss
        first, _ = smpo_loss(policy, ref, target, beta=3.0, pref_prob=p[:1].expand(b))
        assert first.item() != pytest.approx(batch.item(), rel=1e-4)


def test_smpo_hand_derived_multiplier():
    """A raw PickScore gap of 0.02 with SmPO's constants: n_w - n_l = 0.02 / 0.16658 = 0.12006,
    p = sigmoid(0.12006) = 0.5 + 0.12006 / 4 - 0.12006^3 / 48 = 0.52998, gamma (2p - 1) = 0.5996
    (research/objectives.md 14.3: 0.600). One pair, C=H=W=1,
    policy errors w=1, l=4, reference w=4, l=1: inside = -0.5 * beta * 0.5996 * (-6) = 1.7988 at beta 1."""
    from samplers.relabel import soft_label

    p = soft_label(0.25, 0.23, SMPO_MIN, SMPO_MAX)
    assert p == pytest.approx(1 / (1 + math.exp(-0.02 / (SMPO_MAX - SMPO_MIN))), rel=1e-9)
    assert 10 * (2 * p - 1) == pytest.approx(0.5996, abs=1e-4)
    target = torch.zeros(1, 2, 1, 1, 1)
    policy = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1, 1)
    ref = torch.tensor([2.0, 1.0]).view(1, 2, 1, 1, 1)
    loss, m = smpo_loss(policy, ref, target, beta=1.0, pref_prob=torch.tensor([p]))
    inside = 3 * 10 * (2 * p - 1)
    assert m["smpo/logit_mean"].item() == pytest.approx(inside, rel=1e-5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-inside)), rel=1e-5)


def test_smpo_refuses_bad_labels():
    policy, ref, target = _pairs(2)
    with pytest.raises(ValueError, match=r"pref_prob must be \[B\]"):
        smpo_loss(policy, ref, target, beta=1.0, pref_prob=torch.ones(3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        smpo_loss(policy, ref, target, beta=1.0, pref_prob=torch.tensor([0.7, 1.2]))


# ------------------------------------------------------------------------------------------------------- InPO
@pytest.mark.parametrize("b", [1, 3, 8])
def test_inpo_is_diffusion_dpo_on_its_target_and_a_mean_over_pairs(b: int):
    policy, ref, target = _pairs(b, seed=10 + b)
    loss, m = inpo_loss(policy, ref, target, beta=2000.0)
    dpo, dm = diffusion_dpo_loss(policy, ref, target, beta=2000.0)
    assert loss.item() == pytest.approx(dpo.item(), rel=1e-7)
    assert m["inpo/implicit_acc"].item() == dm["dpo/implicit_acc"].item()
    single = [
        inpo_loss(policy[i : i + 1], ref[i : i + 1], target[i : i + 1], beta=2000.0)[0] for i in range(b)
    ]
    assert loss.item() == pytest.approx(torch.stack(single).mean().item(), rel=1e-6)


def test_specs_name_their_inversions():
    assert OBJECTIVES.get("inpo").noising == "ddim_inversion"
    assert OBJECTIVES.get("smpo").noising == "renoise_inversion"
    assert OBJECTIVES.get("smpo").needs.soft_labels


# --------------------------------------------------------------------------------------- through the training loop
def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_inpo_at_step_zero_has_loss_ln2_and_trains_on_inverted_latents(workdir: Path):
    """A fresh LoRA equals its reference, so every logit is 0 and the first loss is ln 2. The loop's x_t are the
    policy's inversions: x_t and the target satisfy x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps~, t is shared in a
    pair, and x_t differs from what forward noising would give."""
    cfg = load_config(
        ROOT / SDXL_LORA,
        [
            "logging.tensorboard=false",
            "run.name=inpo_ln2",
            "objective={name: inpo, beta: 5000}",
            "train.max_steps=2",
            "train.batch_size=2",
            "validation.prompts=[]",
        ],
    )
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    trainer.reseed(0)
    batch = trainer.cache.batch([0, 1, 2], trainer.noise_generator, empty_prompt_prob=0.0, hflip=False)
    pred = trainer.predictions(batch)
    assert (pred.t[:, 0] == pred.t[:, 1]).all()
    sched: Any = trainer.noise_scheduler
    abar = sched.alphas_cumprod[pred.t].view(*pred.t.shape, 1, 1, 1)
    torch.testing.assert_close(
        abar.sqrt() * pred.x0 + (1 - abar).sqrt() * pred.target, pred.x_t, atol=1e-4, rtol=1e-4
    )
    seen: dict[str, torch.Tensor] = {}

    def probe(x0: torch.Tensor, generator: torch.Generator, ctx: NoisingContext) -> Noised:
        """The loop's denoiser on all groups, and on groups [2, 0] alone: same outputs (each keeps its prompt)."""
        assert ctx.denoiser is not None
        t = torch.full(x0.shape[:2], 500, dtype=torch.long)
        seen["all"] = ctx.denoiser(x0, t)
        seen["some"] = ctx.denoiser(x0[[2, 0]], t[[2, 0]], torch.tensor([2, 0]))
        return Noised(x_t=x0, t=t, eps=torch.zeros_like(x0))

    noise_fn, trainer.noise_fn = trainer.noise_fn, probe
    trainer.predictions(batch)
    torch.testing.assert_close(seen["some"], seen["all"][[2, 0]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen["all"][0], seen["all"][2])  # different prompts, different outputs
    trainer.noise_fn = noise_fn
    run_dir = trainer.train()
    records = [r for r in _records(run_dir) if "train/loss" in r]
    assert records[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert len(records) == 2 and all(math.isfinite(r["train/loss"]) for r in records)
    assert (run_dir / "final" / "COMPLETE").is_file()
