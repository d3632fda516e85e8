"""RankDPO (arXiv 2410.18013, Eqs. 5-7, Algorithm 2): hand-derived values and invariants (issue "Ranked
preferences", Done when), the noise-sharing option, and two training steps on mixed-K ranking data."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from trainers.diffusion_dpo import diffusion_dpo_loss
from trainers.rankdpo import K2_DISCOUNT, average_ranks, rankdpo_loss

ROOT = Path(__file__).parents[1]


def _groups(b: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (b, k, 4, 8, 8)
    policy, ref, target = (torch.randn(shape, generator=g) for _ in range(3))
    return policy, 0.9 * policy + 0.1 * ref, target, torch.rand((b, k), generator=g)


def _loop_loss(s: list[float], phi: list[float], beta: float, ranks_by: str = "true") -> float:
    """The paper's formula written out with Python loops for one group: ranks by sorting (ties: mean rank)."""
    k = len(s)
    key = phi if ranks_by == "true" else [-v for v in s]
    rank = [1 + sum(key[j] > key[i] for j in range(k)) + 0.5 * sum(key[j] == key[i] for j in range(k) if j != i)
            for i in range(k)]  # fmt: skip
    total = 0.0
    for i, j in itertools.permutations(range(k), 2):
        if phi[i] > phi[j]:
            w = abs((2 ** phi[i] - 1) - (2 ** phi[j] - 1)) * abs(
                1 / math.log(1 + rank[i]) - 1 / math.log(1 + rank[j])
            )
            total += w * math.log1p(
                math.exp(0.5 * beta * (s[i] - s[j]))
            )  # -log sigmoid(-0.5 beta (s_i - s_j))
    return total


def _s(policy: torch.Tensor, ref: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    err = (policy - target).pow(2).mean(dim=(-3, -2, -1))
    return err - (ref - target).pow(2).mean(dim=(-3, -2, -1))


def test_k2_is_diffusion_dpo_times_the_gain_weight():
    """K = 2, phi = (p0, p1) with p0 > p1: the only pair has ranks 1 and 2, weight
    |2^p0 - 2^p1| * |1/ln 2 - 1/ln 3| (= |G_0 - G_1| * 0.532456), and its term is Diffusion-DPO's
    -logsigmoid(-0.5 beta ((err_w - ref_w) - (err_l - ref_l))). So each group's loss is weight x DPO loss."""
    policy, ref, target, phi = _groups(6, 2)
    phi, _ = phi.sort(dim=1, descending=True)  # column 0 preferred, as Diffusion-DPO reads it
    loss, metrics = rankdpo_loss(policy, ref, target, beta=300.0, phi=phi)
    weight = (torch.exp2(phi[:, 0]) - torch.exp2(phi[:, 1])).abs() * K2_DISCOUNT
    per_pair = torch.stack(
        [
            diffusion_dpo_loss(policy[i : i + 1], ref[i : i + 1], target[i : i + 1], beta=300.0)[0]
            for i in range(6)
        ]
    )
    assert K2_DISCOUNT == pytest.approx(0.5324558142621261, rel=1e-12)
    assert loss.item() == pytest.approx((weight * per_pair).mean().item(), rel=1e-5)
    _, dpo_metrics = diffusion_dpo_loss(policy, ref, target, beta=300.0)
    assert metrics["rankdpo/pair_acc"].item() == pytest.approx(dpo_metrics["dpo/implicit_acc"].item())


def test_group_of_four_hand_computed():
    """C = H = W = 1, target 0, reference 0, policy (0, 0.5, 1, 1.5): s = (0, 0.25, 1, 2.25). Syn-Pic phi of one
    scorer, K = 4: (1, 2/3, 1/3, 0); G = 2^phi - 1 = (1, 0.587401, 0.259921, 0); ranks 1..4, 1/ln(1 + rank) =
    (1.442695, 0.910239, 0.721348, 0.621335). beta = 2, so each term is w * ln(1 + exp(s_i - s_j)):

        pair   w = |dG| |d(1/D)|   s_j - s_i   ln(1 + e^-(s_j - s_i))   w x term
        0,1    0.412599 x 0.532456 = 0.219691   0.25   0.575939   0.126529
        0,2    0.740079 x 0.721348 = 0.533854   1.00   0.313262   0.167236
        0,3    1.000000 x 0.821360 = 0.821360   2.25   0.100207   0.082306
        1,2    0.327480 x 0.188891 = 0.061858   0.75   0.386871   0.023931
        1,3    0.587401 x 0.288904 = 0.169703   2.00   0.126928   0.021540
        2,3    0.259921 x 0.100013 = 0.025995   1.25   0.251929   0.006549
                                                                   sum 0.428090
    """
    policy = torch.tensor([0.0, 0.5, 1.0, 1.5]).view(1, 4, 1, 1, 1)
    zeros = torch.zeros_like(policy)
    phi = torch.tensor([[1.0, 2 / 3, 1 / 3, 0.0]])
    loss, metrics = rankdpo_loss(policy, zeros, zeros, beta=2.0, phi=phi)
    assert loss.item() == pytest.approx(0.4280904318528374, rel=1e-6)
    assert metrics["rankdpo/pairs_per_group"].item() == 6
    assert metrics["rankdpo/pair_acc"].item() == 1.0  # every s_i < s_j for i ranked above j
    assert metrics["rankdpo/pair_weight_mean"].item() == pytest.approx(
        (0.219691 + 0.533854 + 0.821360 + 0.061858 + 0.169703 + 0.025995) / 6, rel=1e-5
    )


def test_loss_at_init_is_ln2_times_the_weight_sum():
    """policy == reference: every logit is 0, so the loss is ln 2 x (sum of the pair weights), mean over groups."""
    policy, _, target, phi = _groups(3, 4)
    loss, _ = rankdpo_loss(policy, policy.clone(), target, beta=5000.0, phi=phi)
    from trainers.rankdpo import pair_weights

    valid = torch.ones(3, 4, dtype=torch.bool)
    weight = pair_weights(phi, average_ranks(phi, valid), valid).sum(dim=(1, 2))
    assert loss.item() == pytest.approx(math.log(2) * weight.mean().item(), rel=1e-6)


@pytest.mark.parametrize("discounts", ["true", "predicted"])
@pytest.mark.parametrize("b", [1, 3, 8])
def test_batch_loss_is_the_mean_of_group_losses(b: int, discounts: str):
    policy, ref, target, phi = _groups(b, 4, seed=b)
    loss, _ = rankdpo_loss(policy, ref, target, beta=500.0, phi=phi, discounts=discounts)  # type: ignore[arg-type]
    singles = [
        rankdpo_loss(
            policy[i : i + 1],
            ref[i : i + 1],
            target[i : i + 1],
            beta=500.0,
            phi=phi[i : i + 1],
            discounts=discounts,  # type: ignore[arg-type]
        )[0]
        for i in range(b)
    ]
    assert loss.item() == pytest.approx(torch.stack(singles).mean().item(), rel=1e-5)
    s = _s(policy, ref, target)
    loops = [_loop_loss(s[i].tolist(), phi[i].tolist(), 500.0, discounts) for i in range(b)]
    assert loss.item() == pytest.approx(sum(loops) / b, rel=1e-4)


@pytest.mark.parametrize("discounts", ["true", "predicted"])
def test_mixed_k_batch_equals_the_per_group_computation(discounts: str):
    """Groups of K = 2, 4, 3 padded to 4 with a mask (padding latents zero, padding phi NaN, as GroupBatch pads):
    the batch loss is the mean of each group's loss computed on its real images alone."""
    sizes = [2, 4, 3]
    policy, ref, target, phi = _groups(3, 4, seed=7)
    mask = torch.arange(4)[None, :] < torch.tensor(sizes)[:, None]
    pad = ~mask
    for x in (policy, ref, target):
        x[pad] = 0.0
    phi = phi.masked_fill(pad, float("nan"))
    loss, metrics = rankdpo_loss(policy, ref, target, beta=400.0, phi=phi, mask=mask, discounts=discounts)  # type: ignore[arg-type]
    singles = [
        rankdpo_loss(
            policy[i : i + 1, :k], ref[i : i + 1, :k], target[i : i + 1, :k], beta=400.0, phi=phi[i : i + 1, :k],
            discounts=discounts,  # type: ignore[arg-type]
        )[0]
        for i, k in enumerate(sizes)
    ]  # fmt: skip
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(torch.stack(singles).mean().item(), rel=1e-5)
    assert metrics["rankdpo/pairs_per_group"].item() == pytest.approx((1 + 6 + 3) / 3)


def test_padding_gets_no_gradient_and_nan_phi_in_padding_is_harmless():
    policy, ref, target, phi = _groups(2, 3, seed=3)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    phi = phi.masked_fill(~mask, float("nan"))
    policy = policy.clone().requires_grad_(True)
    loss, _ = rankdpo_loss(policy, ref, target, beta=100.0, phi=phi, mask=mask)
    loss.backward()
    assert policy.grad is not None and torch.isfinite(policy.grad).all()
    assert policy.grad[0, 2].abs().sum() == 0 and policy.grad[0, :2].abs().sum() > 0


@pytest.mark.parametrize("discounts", ["true", "predicted"])
def test_permuting_images_with_their_phi_leaves_the_loss_unchanged(discounts: str):
    """Ranks come from phi (or from s), never from the column order; tied phi share their mean rank, so even the
    order of tied images does not matter (phi = (0.9, 0.5, 0.5, 0.1) ranks (1, 2.5, 2.5, 4))."""
    policy, ref, target, _ = _groups(2, 4, seed=11)
    phi = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.2, 1.0, 0.0, 0.6]])
    assert average_ranks(phi, torch.ones(2, 4, dtype=torch.bool))[0].tolist() == [1.0, 2.5, 2.5, 4.0]
    loss, _ = rankdpo_loss(policy, ref, target, beta=250.0, phi=phi, discounts=discounts)  # type: ignore[arg-type]
    for perm in ([3, 2, 1, 0], [0, 2, 1, 3], [1, 3, 0, 2]):
        p = torch.tensor(perm)
        permuted, _ = rankdpo_loss(
            policy[:, p],
            ref[:, p],
            target[:, p],
            beta=250.0,
            phi=phi[:, p],
            discounts=discounts,  # type: ignore[arg-type]
        )
        assert permuted.item() == pytest.approx(loss.item(), rel=1e-6)


def test_predicted_discounts_use_the_models_order():
    """s = (1, 0.25, 0, 2.25) with phi = (1, 2/3, 1/3, 0): the model orders the images 2, 1, 0, 3, so the predicted
    ranks are (3, 2, 1, 4) and the weights differ from the true-rank ones; both match the loop formula."""
    policy = torch.tensor([1.0, 0.5, 0.0, 1.5]).view(1, 4, 1, 1, 1)
    zeros = torch.zeros_like(policy)
    phi = torch.tensor([[1.0, 2 / 3, 1 / 3, 0.0]])
    s = [1.0, 0.25, 0.0, 2.25]
    true, _ = rankdpo_loss(policy, zeros, zeros, beta=2.0, phi=phi)
    predicted, _ = rankdpo_loss(policy, zeros, zeros, beta=2.0, phi=phi, discounts="predicted")
    assert true.item() == pytest.approx(_loop_loss(s, phi[0].tolist(), 2.0, "true"), rel=1e-6)
    assert predicted.item() == pytest.approx(_loop_loss(s, phi[0].tolist(), 2.0, "predicted"), rel=1e-6)
    assert abs(true.item() - predicted.item()) > 1e-3


def test_bad_input_is_refused_with_the_fix():
    policy, ref, target, phi = _groups(2, 3)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        rankdpo_loss(policy, ref, target, beta=1.0, phi=phi * 20)
    with pytest.raises(ValueError, match=r"phi must be \[B, K\]"):
        rankdpo_loss(policy, ref, target, beta=1.0, phi=phi[:, :2])
    with pytest.raises(ValueError, match=r"K >= 2"):
        rankdpo_loss(policy[:, :1], ref[:, :1], target[:, :1], beta=1.0, phi=phi[:, :1])
    with pytest.raises(ValueError, match="at least 2 real images"):
        rankdpo_loss(policy, ref, target, beta=1.0, phi=phi, mask=torch.tensor([[True, False, False]] * 2))


# --------------------------------------------------------------------------------------------- noise sharing
def test_noise_option_sets_forward_share_noise_and_contradictions_are_refused():
    from samplers.noising import ForwardNoising, noising_config
    from trainers import OBJECTIVES
    from trainers.rankdpo import RankDPOConfig

    spec = OBJECTIVES.get("rankdpo")
    assert spec.noising_options is not None

    def resolved(cfg: RankDPOConfig, explicit: ForwardNoising | None = None) -> ForwardNoising:
        out = noising_config(spec.noising, spec.noising_options(cfg), explicit)  # type: ignore[misc]
        assert isinstance(out, ForwardNoising)
        return out

    default = resolved(RankDPOConfig())
    assert (
        default.share_noise is False and default.share_timestep is True
    )  # Algorithm 2: eps^i per image, one t
    assert resolved(RankDPOConfig(noise="shared")).share_noise is True
    kept = resolved(
        RankDPOConfig(), ForwardNoising.model_validate({"t_min": 100})
    )  # an explicit section fills in what it leaves unset
    assert kept.t_min == 100 and kept.share_noise is False
    with pytest.raises(ValueError, match=r"noising\.share_noise: True contradicts"):
        resolved(RankDPOConfig(), ForwardNoising.model_validate({"share_noise": True}))


# ------------------------------------------------------------------------------------------ training, end to end
def _ranking_data(folder: Path) -> Path:
    """Four prompts, K = 3 and 4 (mixed), Syn-Pic-style phi best-first, solid-colour 32 px PNGs."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for p, k in enumerate([3, 4, 3, 4]):
        names = []
        for i in range(k):
            name = f"p{p}_{i}.png"
            Image.new("RGB", (32, 32), (60 * i, 200 - 40 * p, 90)).save(folder / name)
            names.append(name)
        phi = [(k - 1 - i) / (k - 1) for i in range(k)]
        lines.append(json.dumps({"prompt": f"a red square {p}", "images": names, "scores": phi}))
    path = folder / "rankings.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rankdpo_trains_two_steps_on_mixed_k_rankings(workdir: Path):
    """Fresh LoRA (policy == reference): the first loss is ln 2 x the mean over the 4 groups of their weight sums."""
    from trainers.rankdpo import pair_weights
    from workbench.config import load_config
    from workbench.train import Trainer

    data = _ranking_data(workdir / "rank_data")
    cfg = load_config(
        ROOT / "configs/tiny/sdxl_dpo_lora.yaml",
        [
            "logging.tensorboard=false",
            "run.name=two_rankdpo",
            "objective={name: rankdpo, beta: 5000}",
            f"data.sources=[{{format: ranking_jsonl, path: {json.dumps(str(data))}}}]",
            "train.max_steps=2",
            "validation.prompts=[]",
        ],
    )
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    run_dir = trainer.train()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "train/loss" in r]
    assert len(records) == 2 and all(math.isfinite(r["train/loss"]) for r in records)
    sums = []
    for k in (3, 4, 3, 4):
        phi = torch.tensor([[(k - 1 - i) / (k - 1) for i in range(k)]])
        valid = torch.ones(1, k, dtype=torch.bool)
        sums.append(float(pair_weights(phi, average_ranks(phi, valid), valid).sum()))
    assert records[0]["train/loss"] == pytest.approx(math.log(2) * sum(sums) / 4, rel=1e-4)
    assert "rankdpo/pair_acc" in records[0]
    assert (run_dir / "final" / "COMPLETE").is_file()
    assert 0.0 <= trainer.implicit_accuracy(draws=1) <= 1.0


def test_shipped_rankdpo_configs_validate():
    from workbench.config import load_config

    for name in ("configs/toy/rankdpo.yaml", "configs/sdxl/rankdpo.yaml"):
        cfg = load_config(ROOT / name, [])
        assert cfg.objective.name == "rankdpo"


# ------------------------------------------------------------------------------------- Syn-Pic phi in synth
def test_synpic_phi_on_a_hand_made_score_table():
    """3 scorers x 4 samples; wins over (scorer, other sample), a tie counting 1/2, divided by n (K - 1) = 9:

        scorer A (0.9, 0.5, 0.1, 0.3): wins 3, 2, 0, 1
        scorer B (10, 30, 20, 5):      wins 1, 3, 2, 0
        scorer C (1, 1, 0, 0):         wins 2.5, 2.5, 0.5, 0.5   (two ties)
        total                               6.5, 7.5, 2.5, 1.5   -> phi = 13/18, 15/18, 5/18, 3/18  (sum = K/2 x n / n)

    Two samples that split two scorers tie in phi (1/2 each)."""
    from samplers.synth import ranking, synpic_phi

    phi = synpic_phi([[0.9, 0.5, 0.1, 0.3], [10, 30, 20, 5], [1, 1, 0, 0]])
    assert phi == pytest.approx([13 / 18, 15 / 18, 5 / 18, 3 / 18], abs=1e-12)
    assert ranking(phi) == [1, 0, 2, 3]
    assert synpic_phi([[1, 2], [2, 1]]) == [0.5, 0.5]
    assert synpic_phi([[0.2, 0.7, 0.4]]) == [0.0, 1.0, 0.5]  # one scorer: wins / (K - 1)
    with pytest.raises(ValueError, match="K >= 2"):
        synpic_phi([[1.0]])


class _TwoScorers:
    """A stand-in ensemble with two members (brightness, redness) combined by the Syn-Pic win rate."""

    def member_scores(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {
            "bright": images.mean(dim=(1, 2, 3)),
            "red": images[:, 0].mean(dim=(1, 2)) - images.mean(dim=(1, 2, 3)),
        }

    def combine(self, per: dict[str, torch.Tensor], prompts: list[str]) -> torch.Tensor:
        from rewards.ensemble import win_rate

        return win_rate(torch.stack([per["bright"], per["red"]]), prompts)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.combine(self.member_scores(images, prompts), prompts)


@pytest.mark.parametrize("rank_by", ["score", "phi"])
def test_synth_writes_phi_and_every_scorers_scores(
    tiny_fixtures: dict[str, Path], tmp_path: Path, rank_by: str
):
    """rankings.jsonl carries each scorer's raw scores and phi computed from them; with rank_by=phi the ranking's
    scores are phi (what rankdpo reads), best-first, and the trainer's reader reads them."""
    from samplers import Checkpoint, SamplingConfig, load_pipeline_for
    from samplers.synth import SynthPlan, run_synth, synpic_phi
    from workbench.data import read_records

    base = str(tiny_fixtures["sdxl"])
    pipe = load_pipeline_for(base, Checkpoint("base"))
    plan = SynthPlan(
        base=base,
        checkpoints=[Checkpoint("base")],
        prompts=["a red circle", "a blue square"],
        k=4,
        sampling=SamplingConfig(steps=1),
        scorer="ensemble[winrate](bright,red)",
        out_dir=tmp_path / "syn",
        shard_size=2,
        batch_size=8,
        rank_by=rank_by,  # type: ignore[arg-type]
    )
    run_synth(plan, _TwoScorers(), lambda c: pipe)
    lines = [json.loads(x) for x in (plan.out_dir / "rankings.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        table = line["scorer_scores"]
        assert sorted(table) == ["bright", "red"] and all(len(v) == 4 for v in table.values())
        assert line["phi"] == pytest.approx(synpic_phi([table["bright"], table["red"]]))
        if rank_by == "phi":
            assert line["scores"] == line["phi"] == sorted(line["phi"], reverse=True)
        else:  # the ensemble's own value (here also a win rate) ranks; phi rides along
            assert line["scores"] == sorted(line["scores"], reverse=True)
    records, report = read_records(
        [{"format": "ranking_jsonl", "path": str(plan.out_dir / "rankings.jsonl")}], group="ranking"
    )
    assert len(records) + report.ties_dropped == 2 and not report.skipped
    identity = json.loads((plan.out_dir / "synth.json").read_text())["identity"]
    assert ("rank_by" in identity) == (rank_by == "phi")  # folders written before the option still resume
