"""Ensembles: hand-derived values for z-score average, rank average and the Syn-Pic win rate."""

from __future__ import annotations

import pytest
import torch
from rewards_fixtures import images

import rewards
from rewards.ensemble import EnsembleScorer, rank_average, softmax_by_group, win_rate, zscore_average

# two scorers, three candidates of one prompt
S = torch.tensor([[1.0, 2.0, 3.0], [30.0, 10.0, 20.0]])
ONE = ["p", "p", "p"]


def test_zscore_average():
    """s1: mean 2, std 1 -> z = [-1, 0, 1]; s2: mean 20, std 10 -> z = [1, -1, 0]; mean -> [0, -0.5, 0.5]."""
    torch.testing.assert_close(zscore_average(S), torch.tensor([0.0, -0.5, 0.5]))
    # fixed reference statistics instead of the batch's own: s1 (0, 1) -> [1, 2, 3], s2 (0, 10) -> [3, 1, 2]
    torch.testing.assert_close(zscore_average(S, mean=[0, 0], std=[1, 10]), torch.tensor([2.0, 1.5, 2.5]))
    # a scorer without spread contributes 0
    torch.testing.assert_close(zscore_average(torch.ones(1, 3)), torch.zeros(3))


def test_win_rate_is_wins_over_scorers_times_k_minus_1():
    """phi_0 = (0 + 2) / 4, phi_1 = (1 + 0) / 4, phi_2 = (2 + 1) / 4; the phis of a group sum to K / 2."""
    phi = win_rate(S, ONE)
    torch.testing.assert_close(phi, torch.tensor([0.5, 0.25, 0.75]))
    # ties count one half; candidates of other prompts are never compared; a lone candidate gets 0.5
    phi2 = win_rate(torch.tensor([[1.0, 1.0, 5.0, 0.0]]), ["a", "a", "b", "c"])
    torch.testing.assert_close(phi2, torch.tensor([0.5, 0.5, 0.5, 0.5]))
    phi3 = win_rate(torch.tensor([[1.0, 2.0, 9.0, 0.0]]), ["a", "a", "b", "b"])
    torch.testing.assert_close(phi3, torch.tensor([0.0, 1.0, 1.0, 0.0]))


def test_rank_average_with_weights():
    """ranks in [0, 1]: s1 [0, .5, 1], s2 [1, 0, .5]; weights 3:1 -> [.25, .375, .875]."""
    torch.testing.assert_close(rank_average(S, ONE), torch.tensor([0.5, 0.25, 0.75]))
    torch.testing.assert_close(rank_average(S, ONE, weights=[3, 1]), torch.tensor([0.25, 0.375, 0.875]))


def test_softmax_by_group():
    p = softmax_by_group(torch.tensor([0.0, 1.0, 5.0, 0.0, 0.0]), ["a", "b", "a", "b", "c"])
    torch.testing.assert_close(p[[0, 2]].sum(), torch.tensor(1.0))
    torch.testing.assert_close(p[[1, 3]].sum(), torch.tensor(1.0))
    assert float(p[4]) == 1.0


def test_ensemble_scorer_from_specs_combines_member_scores():
    ens = rewards.build_ensemble(
        ["jpeg_incompressibility", {"name": "jpeg_compressibility", "as": "small", "quality": 50}],
        method="rank",
    )
    assert isinstance(ens, EnsembleScorer) and list(ens.members) == ["jpeg_incompressibility", "small"]
    x = images(4, 32, 32)
    x[0] = 0.5  # flat image: smallest JPEG
    out = ens(x, "p")
    per = ens.member_scores(x, ["p"] * 4)
    torch.testing.assert_close(out, rank_average(torch.stack(list(per.values())), ["p"] * 4))
    assert not ens.needs_prompt
    # the same through the registry, as YAML would say it
    ens2 = rewards.build_scorer("ensemble", members=["jpeg_incompressibility"], method="winrate")
    assert ens2(x, "p").argmin() == 0


def test_ensemble_errors_name_the_field():
    with pytest.raises(ValueError, match="method='median' is unknown"):
        rewards.build_ensemble(["jpeg_compressibility"], method="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="appears twice"):
        rewards.build_ensemble(["jpeg_compressibility", "jpeg_compressibility"])
    with pytest.raises(ValueError, match="weights has 1 entries for 2 members"):
        rewards.build_ensemble(["jpeg_compressibility", "jpeg_incompressibility"], weights=[1.0])
    with pytest.raises(ValueError, match="every member"):
        rewards.build_ensemble(
            ["jpeg_compressibility", "jpeg_incompressibility"], stats={"jpeg_compressibility": [0, 1]}
        )
    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        rewards.build_ensemble(["nope"])
