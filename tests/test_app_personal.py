"""The Personalise tab: a simulated user's votes -> personal scorer; active selection; blind before/after win rates."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from app_fixtures import FakeRenderer

from apps.handlers import AppContext, AppSettings, ArenaState, InputError, act, new_round
from apps.personal import (
    CurrentFit,
    baseline_arm,
    before_after_report,
    blind_win_rate,
    fit_user_scorer,
    load_user_scorer,
    most_informative_pair,
    new_baseline_round,
    new_blind_round,
    next_teaching_pair,
    rank_fresh,
    scorer_path,
    user_choices,
)
from rewards import build_scorer
from rewards.personal import (
    fit_bradley_terry,
    laplace_covariance,
    leave_one_group_out,
    loo_accuracy,
    pair_information,
)
from samplers import from_uint8, load_image

FEATURES = ["toy/fidelity", "toy/centering", "toy/saturation", "toy/clean_background"]


class WorldRenderer:
    """Toy-world scenes drawn directly (no diffusion, milliseconds): the prompt's scene at a seeded position and size,
    with the colour or background sometimes wrong, so that fidelity, centring and saturation all vary."""

    def __init__(self, names: Sequence[str] = ("base",)) -> None:
        self._names = list(names)

    def names(self) -> list[str]:
        return list(self._names)

    def identity(self, name: str) -> dict[str, Any]:
        return {"checkpoint": name, "checkpoint_path": None, "checkpoint_hash": f"world-{name}"}

    def render(
        self, name: str, prompts: Sequence[str], seeds: Sequence[int], cfg: Any, progress: Any = None
    ) -> list[np.ndarray]:
        from workbench.toy.world import BACKGROUNDS, COLOURS, Scene, render_scene, sample_scene

        out = []
        for prompt, seed in zip(prompts, seeds):
            rng = random.Random(f"{name}|{prompt}|{seed}")
            scene = sample_scene(rng.randrange(2**31), prompt).to_dict()
            if rng.random() < 0.4:
                scene["colour"] = rng.choice(list(COLOURS))
            if rng.random() < 0.3:
                scene["background"] = rng.choice(list(BACKGROUNDS))
            out.append(np.asarray(render_scene(Scene(**scene))))  # type: ignore[arg-type]
        return out


def _ctx(tmp_path: Path, renderer: Any, scorers: Sequence[str] = FEATURES) -> AppContext:
    settings = AppSettings(db=str(tmp_path / "votes.sqlite"), runs_dir=None, seed=0, scorers=list(scorers))
    return AppContext(settings, renderer=renderer)


def taste(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """The simulated user's planted taste: centred shapes, and less literal renderings of the prompt (colour or
    background off) half as much. The population prior (equal weights on the four toy rewards) rewards fidelity."""
    return build_scorer("toy/centering")(images, prompts) - 0.5 * build_scorer("toy/fidelity")(
        images, prompts
    )


def simulated_vote(
    ctx: AppContext, state: ArenaState, user: str, rng: random.Random, temperature: float = 0.1
):
    """The user picks a displayed image by Bradley-Terry on :func:`taste` (noisy choices)."""
    rnd = ctx.store.get_round(state.round_id or "")
    x = from_uint8([load_image(i.path) for i in rnd.shown()])
    u = taste(x, [rnd.prompt] * rnd.k)
    p_first = float(torch.sigmoid((u[0] - u[1]) / temperature))
    return act(ctx, state, user=user, key="1" if rng.random() < p_first else "2")


# ------------------------------------------------------------------------------------------ simulated user -> fit
def test_simulated_user_votes_give_a_scorer_that_agrees_above_chance(tmp_path: Path):
    """12 teaching votes (4 random pairs, then the most informative pair of 6 candidates each) of a user whose choices
    follow :func:`taste`, cast through the handlers, plus a tie and a skip (counted, not used)."""
    ctx = _ctx(tmp_path, WorldRenderer())
    rng = random.Random(3)
    selections = []
    for _ in range(12):
        state, _ = next_teaching_pair(ctx, user="sim", checkpoint="base", prompt=None, prompt_set="toy:train")
        selections.append(ctx.store.get_round(state.round_id or "").items[0].params["selection"])
        simulated_vote(ctx, state, "sim", rng)
    for key in ("t", "s"):
        state, _ = next_teaching_pair(ctx, user="sim", checkpoint="base", prompt=None, prompt_set="toy:train")
        act(ctx, state, user="sim", key=key)
    assert selections == ["random"] * 4 + ["bald"] * 8

    fit = fit_user_scorer(ctx, "sim")
    assert fit.votes_used == 12 and fit.pairs == 12 and fit.excluded == {"tie": 1, "skip": 1}
    assert fit.path == tmp_path / "users" / "sim" / "scorer.json" == scorer_path(ctx, "sim")
    print(f"\n12 votes: personal {fit.agreement.fmt()}  population {fit.population.fmt()}")
    assert fit.agreement.estimate > 0.5  # leave-one-vote-out agreement beats chance
    assert fit.agreement.estimate > fit.population.estimate  # and the population ensemble, on the same pairs
    w = dict(zip(fit.scorer.feature_names, fit.scorer.weights.tolist()))
    assert (
        w["toy/centering"] > 0.25 > 0 > w["toy/fidelity"]
    )  # moved from the prior (1/4 each) toward the taste
    assert "12 votes" in fit.summary() and "leave-one-vote-out" in fit.summary()

    loaded = load_user_scorer(
        ctx, "sim"
    )  # the saved file (what the fine-tune job reads) rebuilds the same scorer
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(loaded(x, ["a red circle"] * 3), fit.scorer(x, ["a red circle"] * 3), atol=1e-5)
    assert loaded.info["user"] == "sim" and loaded.info["votes"] == 12


def test_fit_refuses_below_four_usable_votes_and_bad_user_names(tmp_path: Path):
    ctx = _ctx(tmp_path, WorldRenderer())
    for key in ("1", "2", "t", "2", "b"):  # 3 usable, a tie and a both-bad
        state, _ = new_round(
            ctx,
            ArenaState(),
            user="u",
            prompt=None,
            prompt_set="toy:train",
            k=2,
            source="seeds",
            checkpoints=["base"],
        )
        act(ctx, state, user="u", key=key)
    with pytest.raises(InputError, match=r"3 usable vote.*at least 4.*both_bad 1, tie 1"):
        fit_user_scorer(ctx, "u")
    assert not scorer_path(ctx, "u").exists()
    with pytest.raises(InputError, match="cannot name a folder"):
        scorer_path(ctx, "../evil")
    with pytest.raises(InputError, match="selection must be"):
        next_teaching_pair(ctx, user="u", checkpoint="base", prompt="x", prompt_set=None, selection="greedy")
    with pytest.raises(InputError, match="and none are configured"):
        fit_user_scorer(_ctx(tmp_path / "x", WorldRenderer(), scorers=[]), "u", min_votes=1)


def test_k_wise_votes_expand_to_pairs_grouped_by_vote(tmp_path: Path):
    """best-of-4 -> 3 pairs (chosen over each other image), a full ranking of 4 -> 6 pairs, both in one group each;
    each pair weighs 1/(K-1) = 1/3, so a best-of-4 vote counts once in the agreement interval."""
    ctx = _ctx(tmp_path, WorldRenderer())
    args: dict[str, Any] = dict(
        user="u", prompt="a small red circle on a white background", prompt_set=None, k=4, source="seeds"
    )
    state, _ = new_round(ctx, ArenaState(), checkpoints=["base"], **args)
    act(ctx, state, user="u", key="2")
    state, _ = new_round(ctx, ArenaState(), checkpoints=["base"], mode="rank", **args)
    for key in ("3", "1", "4"):
        state, _ = act(ctx, state, user="u", key=key)
    data = user_choices(ctx, "u")
    pairs, groups, weights = data.pairs()
    assert data.n_votes == 2 and len(pairs) == 3 + 6 and groups == [0] * 3 + [1] * 6
    assert weights == pytest.approx([1 / 3] * 9)
    best, rank = ctx.store.votes()
    shown = best.round.display_order
    chosen = data.items[pairs[0][0]][0]
    assert chosen == best.round.items[shown[1]].sha256  # the image shown second was chosen
    order = [rank.round.items[s].sha256 for s in rank.ranking]
    ranked_pairs = [(data.items[a][0], data.items[b][0]) for a, b in pairs[3:]]
    assert ranked_pairs == [(order[i], order[j]) for i in range(4) for j in range(i + 1, 4)]


# ------------------------------------------------------------------------------------------ math of the selection
def test_leave_one_group_out_with_singleton_groups_is_leave_one_out():
    g = torch.Generator().manual_seed(0)
    diff = torch.randn(9, 3, generator=g) + torch.tensor([1.0, 0.0, -0.5])
    prior = torch.full((3,), 1 / 3)
    margins = leave_one_group_out(diff, list(range(9)), prior)
    hits = (margins > 0).float() + 0.5 * (margins == 0).float()
    assert float(hits.mean()) == pytest.approx(loo_accuracy(diff, prior))
    with pytest.raises(ValueError, match="at least 2 groups"):
        leave_one_group_out(diff, [0] * 9, prior)


def test_laplace_covariance_is_the_prior_without_data_and_shrinks_along_seen_directions():
    w = torch.tensor([0.5, 0.5])
    assert torch.allclose(
        laplace_covariance(torch.zeros(0, 2), w, l2=2.0), torch.eye(2, dtype=torch.float64) / 2
    )
    diff = torch.tensor([[1.0, 0.0]] * 20)
    cov = laplace_covariance(diff, fit_bradley_terry(diff, w), 1.0)
    assert cov[0, 0] < 0.5 * cov[1, 1] and float(cov[1, 1]) == pytest.approx(1.0)  # feature 1 never seen


def test_pair_information_is_zero_without_uncertainty_and_one_bit_at_most():
    """BALD = H(E p) - E H(p): 0 when the margin is known (var = 0) whatever P is; -> 1 bit when the margin is
    N(0, large); P(a > b) = 1/2 at mu = 0 by symmetry."""
    dphi = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    w = torch.tensor([0.0, 0.0])
    cov = torch.diag(torch.tensor([0.0, 1e4]))
    p, bits = pair_information(dphi, w, cov)
    assert float(bits[0]) == pytest.approx(0.0, abs=1e-6) and float(p[0]) == pytest.approx(0.5)
    assert 0.9 < float(bits[1]) <= 1.0 and float(p[1]) == pytest.approx(0.5, abs=1e-6)


def test_active_selection_picks_the_most_uncertain_pair_not_the_closest_call():
    """Hand-made fit: feature 0 is learnt (w0 = 2, var 0.01), feature 1 barely (w1 = 0.3, var 4). Candidates
    c0 = (0, 0), c1 = (1, 0), c2 = (0, 1), c3 = (1.01, 0). Pair (c0, c2) has mu = -0.3 and var = 4: the most
    informative (the other pairs have |mu| >= 1.7). Pair (c1, c3) has P closest to 1/2 (mu = -0.02) but var 1e-4: a
    coin flip that teaches nothing, which |P - 1/2| would pick."""
    fit = CurrentFit(
        weights=torch.tensor([2.0, 0.3]),
        cov=torch.diag(torch.tensor([0.01, 4.0])),
        mean=torch.zeros(2),
        std=torch.ones(2),
        votes=10,
    )
    pool = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.01, 0.0]])
    i, j, p, bits = most_informative_pair(fit, pool)
    assert (i, j) == (0, 2) and p < 0.5 and bits > 0.3
    dphi = torch.stack([pool[1] - pool[3], pool[1] - pool[2]])
    assert (pair_information(dphi, fit.weights, fit.cov)[1] < bits).all()
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    closest = min(
        pairs, key=lambda ab: abs(float(torch.sigmoid((pool[ab[0]] - pool[ab[1]]) @ fit.weights)) - 0.5)
    )
    assert closest == (1, 3)


# ------------------------------------------------------------------------------------- fresh samples, before/after
def _fit_some_user(ctx: AppContext, user: str = "sim", votes: int = 6) -> None:
    rng = random.Random(0)
    for _ in range(votes):
        state, _ = new_round(
            ctx,
            ArenaState(),
            user=user,
            prompt=None,
            prompt_set="toy:train",
            k=2,
            source="seeds",
            checkpoints=["base"],
        )
        simulated_vote(ctx, state, user, rng)
    fit_user_scorer(ctx, user)


def test_rank_fresh_orders_fixed_seeds_by_the_personal_scorer(tmp_path: Path):
    ctx = _ctx(tmp_path, WorldRenderer())
    _fit_some_user(ctx)
    prompt = "a large red circle on a white background"
    text, rows = rank_fresh(ctx, "sim", checkpoint="base", prompt=prompt, seeds="0-5")
    assert text == prompt and sorted(r.seed for r in rows) == list(range(6))
    assert [r.personal for r in rows] == sorted((r.personal for r in rows), reverse=True)
    scorer = load_user_scorer(ctx, "sim")
    again = ctx.renderer.render("base", [prompt] * 6, [r.seed for r in rows], None)
    assert torch.allclose(scorer(from_uint8(again), [prompt] * 6), torch.tensor([r.personal for r in rows]))
    phi = (torch.tensor([list(r.features.values()) for r in rows]) - scorer.mean) / scorer.std
    assert torch.allclose(phi @ torch.full((4,), 0.25), torch.tensor([r.population for r in rows]), atol=1e-5)
    assert rows[0].caption(1).startswith("#1 · seed")
    with pytest.raises(InputError, match="no personal scorer yet"):
        rank_fresh(ctx, "nobody", checkpoint="base", prompt=prompt)


def test_blind_rounds_hide_names_share_the_seed_and_use_unseen_prompts(tmp_path: Path):
    ctx = _ctx(tmp_path, WorldRenderer(["base", "personal-lora"]))
    _fit_some_user(ctx)
    seen = {v.round.prompt for v in ctx.store.votes(user_id="sim")}
    state, view = new_blind_round(
        ctx, user="sim", a="personal-lora", b="base", prompt=None, prompt_set="toy:train"
    )
    rnd = ctx.store.get_round(state.round_id or "")
    assert rnd.blind and rnd.source == "beforeafter" and rnd.prompt not in seen
    assert len({i.params["seed"] for i in rnd.items}) == 1  # identical initial noise
    assert all("hidden" in label for label in view.labels)
    _, view = act(ctx, state, user="sim", key="1")
    assert view is not None
    assert "personal-lora" in view.reveal and "base" in view.reveal

    state, view = new_baseline_round(
        ctx, user="sim", checkpoint="base", n=4, prompt=None, prompt_set="toy:train"
    )
    rnd = ctx.store.get_round(state.round_id or "")
    arms = {i.params["arm"]: i for i in rnd.items}
    assert set(arms) == {"best-of-4:base", "base"} and all("hidden" in label for label in view.labels)
    best = arms["best-of-4:base"]
    assert best.params["seed"] != arms["base"].params["seed"]
    scorer = load_user_scorer(ctx, "sim")
    assert float(scorer(from_uint8([load_image(best.path)]), [rnd.prompt])) == pytest.approx(
        best.params["personal_score"], abs=1e-5
    )
    _, view = act(ctx, state, user="sim", key="2")
    assert view is not None and "best-of-4:base" in view.reveal
    assert user_choices(ctx, "sim").excluded == {
        "evaluation": 2
    }  # the evaluation votes never train the scorer


def test_blind_win_rate_counts_ties_apart_with_a_wilson_interval(tmp_path: Path):
    """7 votes for A, 2 for B, 1 tie, 1 skip: rate 7/9 = 0.778; Wilson 95% (z = 1.95996, n = 9): centre
    (7/9 + z^2/18) / (1 + z^2/9) = 0.6947, half-width z sqrt(7/9 * 2/9 / 9 + z^2/324) / (1 + z^2/9) = 0.2421,
    so [0.4526, 0.9368]."""
    ctx = _ctx(tmp_path, FakeRenderer(["base", "lora"]))
    for outcome in ["a"] * 7 + ["b"] * 2 + ["t", "s"]:
        state, _ = new_blind_round(ctx, user="v", a="lora", b="base", prompt="a red circle", prompt_set=None)
        rnd = ctx.store.get_round(state.round_id or "")
        pos_a = [i.params["arm"] for i in rnd.shown()].index("lora")
        key = {"a": str(pos_a + 1), "b": str(2 - pos_a), "t": "t", "s": "s"}[outcome]
        act(ctx, state, user="v", key=key)
    r = blind_win_rate(ctx, "lora", "base")
    assert (r.wins, r.losses, r.ties, r.no_preference) == (7, 2, 1, 1)
    assert r.rate.estimate == pytest.approx(7 / 9)
    assert r.rate.low == pytest.approx(0.4526, abs=1e-4) and r.rate.high == pytest.approx(0.9368, abs=1e-4)
    flipped = blind_win_rate(ctx, "base", "lora")
    assert (flipped.wins, flipped.losses) == (2, 7)
    assert blind_win_rate(ctx, "lora", "base", user="someone else").wins == 0
    text, (lora, baseline) = before_after_report(ctx, a="lora", b="base", baseline_n=8, user="v")
    assert lora.wins == 7 and baseline.a == baseline_arm("base", 8) and baseline.wins + baseline.losses == 0
    assert "0.778 [0.453, 0.937]" in text and not math.isnan(lora.rate.low)
    # the evaluation set never becomes training data: not in exports, not in an app_votes source
    from apps.store import export_votes
    from workbench.data import ReadReport, read_app_votes

    exported = export_votes(ctx.store, tmp_path / "export", formats=["pairs"])
    assert exported.votes == 0 and exported.pairs == 0
    assert exported.skipped["blind before/after (evaluation, never exported)"] == 11
    assert list(read_app_votes(ctx.store.path, ReadReport())) == []


# ---------------------------------------------------------------------------------------------------- the tab
def test_the_tab_teaches_fits_ranks_and_reports_through_gradio(tmp_path: Path):
    pytest.importorskip("gradio", reason="the app needs the 'app' extra: pip install -e '.[app]'")
    from gradio_client import Client

    from apps.app import launch

    ctx = _ctx(tmp_path, WorldRenderer(["base", "lora"]))
    demo, url = launch(ctx, block=False)
    try:
        client = Client(url, verbose=False)

        def nxt(kind: str) -> tuple[Any, ...]:
            return client.predict(
                "ann", kind, "lora", "base", "", "toy:train", "toy:heldout", 6, 4, api_name="/personal_next"
            )

        for i in range(5):
            out = nxt("teach")
            assert "random pair" in out[-3] if i < 4 else "most informative" in out[-3]
            assert "stored vote" in client.predict("ann", api_name=f"/personal_{1 + i % 2}")[-3]
        fit = client.predict("ann", api_name="/personal_fit")
        assert "fitted on **5 votes**" in fit and "population scorers" in fit
        assert (tmp_path / "users" / "ann" / "scorer.json").is_file()
        used, gallery = client.predict(
            "ann",
            "base",
            "a large red circle on a white background",
            "toy:train",
            "0-3",
            api_name="/personal_fresh",
        )
        assert (
            "large red circle" in used and len(gallery) == 4 and gallery[0]["caption"].startswith("#1 · seed")
        )
        out = nxt("blind")
        assert all("hidden" in image["label"] for image in out[:2]) and "blind" in out[-3]
        reveal = client.predict("ann", api_name="/personal_1")[-2]
        assert "lora" in reveal and "base" in reveal
        nxt("baseline")
        client.predict("ann", api_name="/personal_tie")
        report = client.predict("ann", "lora", "base", 4, api_name="/personal_results")
        assert "| lora vs base |" in report and "| best-of-4:base vs base |" in report
        with pytest.raises(Exception, match="usable vote"):
            client.predict("bob", api_name="/personal_fit")
    finally:
        demo.close()


class _PixelEmbedder(torch.nn.Module):
    """A stand-in image embedder (CLIP-family scorers have ``encode_images``): mean colour and its spread, 6-d."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1)


def test_embedding_components_join_the_features_at_prior_weight_zero(tmp_path: Path):
    ctx = _ctx(tmp_path, WorldRenderer(), scorers=["toy/fidelity", "toy/centering"])
    ctx._scorers["pixels"] = (
        _PixelEmbedder()
    )  # what ctx.scorer("pixels") returns (built scorers are cached there)
    _fit_some_user(ctx, votes=6)
    fit = fit_user_scorer(ctx, "sim", embedder="pixels", embed_dims=3)
    assert fit.scorer.feature_names == [
        "toy/fidelity",
        "toy/centering",
        "embedding/pc0",
        "embedding/pc1",
        "embedding/pc2",
    ]
    assert fit.prior == pytest.approx([0.5, 0.5, 0.0, 0.0, 0.0])
    saved = json.loads(fit.path.read_text())
    assert saved["embedder"] == {"name": "pixels"} and len(saved["basis"]) == 3


def test_a_refit_replaces_the_personal_scorer_that_compare_built(tmp_path: Path):
    ctx = _ctx(tmp_path, WorldRenderer())
    _fit_some_user(ctx, votes=5)
    spec = f"personal:path={scorer_path(ctx, 'sim')}"
    before = ctx.scorer(spec)  # as Compare builds it (cached by spec)
    _fit_some_user(ctx, votes=3)  # more votes, refit
    after = ctx.scorer(spec)
    assert after is not before and after.info["votes"] == 8 and before.info["votes"] == 5
