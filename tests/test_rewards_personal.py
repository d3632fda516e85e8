"""The personal Bradley-Terry scorer recovers a planted preference from 12 choices."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from rewards_fixtures import workdir

import rewards
from rewards.base import Scorer
from rewards.personal import PersonalScorer, fit_bradley_terry, loo_accuracy


class _Mean(Scorer):
    """A stand-in population scorer: mean of one channel minus the mean of the others (or brightness)."""

    needs_prompt = False

    def __init__(self, channel: int | None) -> None:
        super().__init__()
        self.channel = channel

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if self.channel is None:
            return images.mean((1, 2, 3))
        others = [c for c in range(3) if c != self.channel]
        return images[:, self.channel].mean((1, 2)) - images[:, others].mean((1, 2, 3))


MEMBERS = {"brightness": _Mean(None), "redness": _Mean(0), "greenness": _Mean(1), "blueness": _Mean(2)}


def _pool(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=g)
    return (colour + 0.05 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1)


def _utility(x: torch.Tensor) -> torch.Tensor:
    """The planted taste: this person likes blue and dislikes bright images (the population prior is indifferent)."""
    return 2.0 * MEMBERS["blueness"](x, "").float() - 1.0 * MEMBERS["brightness"](x, "").float()


def _pairwise_accuracy(score: torch.Tensor, truth: torch.Tensor) -> float:
    i, j = torch.triu_indices(len(truth), len(truth), 1)
    agree = torch.sign(score[i] - score[j]) == torch.sign(truth[i] - truth[j])
    return float(agree.float().mean())


def test_recovers_a_planted_preference_from_12_choices():
    x = _pool(24, seed=0)
    g = torch.Generator().manual_seed(1)
    u = _utility(x)
    choices = []
    for _ in range(12):
        a, b = torch.randperm(24, generator=g)[:2].tolist()
        # the person chooses by Bradley-Terry on their utility (noisy, temperature 0.05)
        p_a = torch.sigmoid((u[a] - u[b]) / 0.05)
        choices.append((a, b) if torch.rand(1, generator=g) < p_a else (b, a))
    personal = PersonalScorer.fit(MEMBERS, x, [""] * 24, choices)
    held_out = _pool(60, seed=2)
    truth = _utility(held_out)
    acc = _pairwise_accuracy(personal(held_out, ""), truth)
    population = sum(m(held_out, "").float() for m in MEMBERS.values()) / 4
    assert acc > 0.75, acc
    assert acc > _pairwise_accuracy(population, truth) + 0.2
    loo = personal.loo_accuracy()
    assert loo is not None and loo > 0.5
    assert personal.info["n_choices"] == 12


def test_no_information_keeps_the_population_prior():
    """No choices: the objective is the prior term alone, so w = prior. Two contradicting choices (a > b and b > a)
    say "indifferent along d": the fit reaches w . d = 0 and moves only along d (the gradient lives in span(d))."""
    diff = torch.tensor([[1.0, -2.0], [-1.0, 2.0]])
    prior = torch.tensor([0.5, 0.5])
    torch.testing.assert_close(fit_bradley_terry(diff[:0], prior, l2=1.0), prior)
    w = fit_bradley_terry(diff, prior, l2=1.0)
    assert abs(float(diff[0] @ w)) < float(diff[0] @ prior).__abs__()
    moved = w - prior
    assert abs(float(moved[0] * diff[0, 1] - moved[1] * diff[0, 0])) < 1e-6  # moved is parallel to d
    # one choice moves w along its difference vector; more regularisation moves it less
    w_weak = fit_bradley_terry(diff[:1], prior, l2=0.1)
    w_strong = fit_bradley_terry(diff[:1], prior, l2=10.0)
    assert float(diff[0] @ w_weak) > float(diff[0] @ w_strong) > float(diff[0] @ prior)


def test_loo_accuracy_and_bad_input():
    diff = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.8, -0.1], [0.9, 0.1]])
    assert loo_accuracy(diff, torch.zeros(2)) == 1.0
    with pytest.raises(ValueError, match="l2=0"):
        fit_bradley_terry(diff, torch.zeros(2), l2=0)
    with pytest.raises(ValueError, match="choice 0"):
        PersonalScorer.fit_features(MEMBERS, torch.zeros(3, 4), [(0, 0)])
    with pytest.raises(ValueError, match="anchor='aesthetic' is not a member"):
        PersonalScorer.fit_features(MEMBERS, torch.rand(3, 4), [(0, 1)], anchor="aesthetic")


def test_best_of_k_save_and_load_roundtrip():
    specs = [{"name": "jpeg_incompressibility"}, {"name": "jpeg_compressibility", "as": "q50", "quality": 50}]
    members = {"jpeg_incompressibility": rewards.build_scorer("jpeg_incompressibility")}
    members["q50"] = rewards.build_scorer("jpeg_compressibility", quality=50)
    x = _pool(6, seed=3)
    personal = PersonalScorer.fit(members, x, [""] * 6, [(0, [1, 2, 3]), (4, 5)], specs=specs, anchor="q50")
    assert personal.info["n_pairs"] == 4
    path = personal.save(workdir() / "personal.json")
    loaded = rewards.build_scorer("personal", path=str(path))
    torch.testing.assert_close(loaded(x, ""), personal(x, ""))
    with pytest.raises(ValueError, match="specs="):
        PersonalScorer.fit(MEMBERS, x, [""] * 6, [(0, 1)]).save(workdir() / "x.json")
    with pytest.raises(ValueError, match="personal scorer file not found"):
        rewards.build_scorer("personal", path="/nowhere.json")


class _ChannelEmbedder(torch.nn.Module):
    """A stand-in image embedder: the mean colour plus a few texture statistics (8-d)."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.mean((2, 3))
        std = images.std((2, 3))
        return torch.cat([mean, std, mean[:, :2] * mean[:, 2:]], dim=1)


def test_embedding_features_capture_a_taste_the_population_scorers_miss():
    """The only population scorer is brightness; the person likes blue. Embedding components (weight 0 a priori) let
    12 choices recover it; the fit without them cannot."""
    members = {"brightness": MEMBERS["brightness"]}
    x = _pool(24, seed=0)
    g = torch.Generator().manual_seed(1)
    u = MEMBERS["blueness"](x, "").float()
    choices = []
    for _ in range(12):
        a, b = torch.randperm(24, generator=g)[:2].tolist()
        choices.append((a, b) if u[a] > u[b] else (b, a))
    with_emb = PersonalScorer.fit(members, x, [""] * 24, choices, embedder=_ChannelEmbedder(), embed_dims=4)
    without = PersonalScorer.fit(members, x, [""] * 24, choices)
    held_out = _pool(60, seed=2)
    truth = MEMBERS["blueness"](held_out, "").float()
    assert with_emb.feature_names == [
        "brightness",
        "embedding/pc0",
        "embedding/pc1",
        "embedding/pc2",
        "embedding/pc3",
    ]
    acc = _pairwise_accuracy(with_emb(held_out, ""), truth)
    assert acc > 0.75, acc
    assert acc > _pairwise_accuracy(without(held_out, ""), truth) + 0.15


def test_embedding_scorer_save_and_load_roundtrip():
    from rewards_fixtures import open_clip_folder

    clip_spec = {"name": "clipscore", "arch": f"local-dir:{open_clip_folder()}", "pretrained": None}
    spec = {"name": "jpeg_incompressibility"}
    embedder = rewards.build_scorer(**clip_spec)
    members = {"jpeg_incompressibility": rewards.build_scorer("jpeg_incompressibility")}
    x = _pool(6, seed=3)
    personal = PersonalScorer.fit(
        members, x, [""] * 6, [(0, 1), (2, 3), (4, 5)], embedder=embedder, embed_dims=2, specs=[spec],
        embedder_spec=clip_spec,
    )  # fmt: skip
    loaded = rewards.build_scorer("personal", path=str(personal.save(workdir() / "personal-emb.json")))
    torch.testing.assert_close(loaded(x, ""), personal(x, ""))
    assert len(loaded.feature_names) == 3
