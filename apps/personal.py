"""The Personalise tab's handlers: one user's votes -> their personal scorer; how it ranks fresh samples; the next
pair to vote on (the most informative one); blind before/after rounds and their win rates.

Plain typed functions over :class:`apps.handlers.AppContext` (no Gradio above :func:`build_personal_tab`); the math
(Bradley-Terry fit, leave-one-out, Laplace posterior, expected information) is in :mod:`rewards.personal`.

* :func:`fit_user_scorer`: the user's active votes (arena, curate and Personalise rounds; the blind before/after
  rounds are the evaluation set and are left out) -> :class:`rewards.personal.PersonalScorer` over the app's
  configured scorers (the population scorers; in the toy world the ``toy/*`` rewards), optionally plus the top
  principal components of an image embedding, anchored to the population (prior = the equal-weight z-score
  ensemble). A best-of-K vote is K - 1 wins of the chosen image, a full ranking all K (K - 1) / 2 pairs; ties,
  both-bad and skips carry no preference and are counted, not used. It is saved to
  ``<store dir>/users/<user>/scorer.json`` (:func:`scorer_path`; the personal fine-tune job reads that file).
* Agreement is leave-one-*vote*-out (the pairs of one vote are held out together), beside the population
  ensemble's agreement on the same pairs, each with a 95% Wilson interval over weighted pairs: each pair of a K-image
  vote weighs 1 / (K - 1), as the export does, so a pairwise or best-of-K vote is one trial and a full ranking K / 2.
* :func:`next_teaching_pair`: renders a pool of seeds and shows the pair whose answer is expected to teach the
  current fit the most (BALD under the Laplace posterior, :func:`rewards.personal.pair_information`); before
  :data:`MIN_VOTES` usable votes, a random pair of the pool.
* :func:`new_blind_round` / :func:`new_baseline_round` / :func:`blind_win_rate`: checkpoint A against B on one seed
  (identical initial noise), or best-of-N reranking by the personal scorer against a plain sample, names hidden until
  the vote; the win rate of A over B with a 95% Wilson interval (ties, both-bad and skips counted, left out).
"""

import itertools
import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apps.handlers import (
    AppContext,
    ArenaState,
    InputError,
    ProgressFn,
    RoundView,
    check_prompt,
    check_seeds,
    generation_params,
    round_view,
    sampling,
)
from apps.store import EVAL_SOURCE, Vote  # EVAL_SOURCE: blind before/after rounds, never fitted on
from rewards.personal import (
    PersonalScorer,
    fit_bradley_terry,
    laplace_covariance,
    leave_one_group_out,
    pair_information,
    standardise,
)
from samplers import from_uint8, load_image, png_bytes
from workbench.stats import Interval, wilson_interval

MIN_VOTES = 4  # usable votes before a scorer is fitted (and before active selection replaces random pairs)
SCORER_FILE = "scorer.json"
TEACH_SOURCE = "personalise"  # rounds shown to teach the personal scorer
NO_PREFERENCE = ("tie", "both_bad", "skip")
_SAFE_USER = re.compile(r"^[A-Za-z0-9_.@+ -]{1,64}$")


# --------------------------------------------------------------------------------------------------------- paths
def user_dir(ctx: AppContext | str | Path, user: str) -> Path:
    """``<store dir>/users/<user>``: the user's scorer (``scorer.json``) and jobs. ``ctx``: the app context or the
    database path. The name becomes a folder name, so it must be a plain name (letters, digits, ``_ . @ + -`` and
    spaces, not only dots)."""
    if not _SAFE_USER.match(user) or user.strip(" .") == "":
        raise InputError(
            f"user name {user!r} cannot name a folder; use letters, digits, '_', '.', '@', '+', '-' or spaces"
        )
    db = ctx.settings.db if isinstance(ctx, AppContext) else ctx
    return Path(db).parent / "users" / user


def scorer_path(ctx: AppContext | str | Path, user: str) -> Path:
    """``<store dir>/users/<user>/scorer.json``: the user's personal scorer, written by :func:`fit_user_scorer`."""
    return user_dir(ctx, user) / SCORER_FILE


# ------------------------------------------------------------------------------------------------ votes -> choices
@dataclass
class UserChoices:
    """One user's usable votes as choices over distinct (image, prompt) items."""

    items: list[tuple[str, str, Path]] = field(default_factory=list)  # (sha256, prompt, file)
    # (chosen, [rejected, ...]) as item indices
    choices: list[tuple[int, list[int]]] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)  # per choice: index of its vote among the used votes
    vote_ids: list[int] = field(default_factory=list)  # the used votes
    ks: list[int] = field(default_factory=list)  # K of each used vote
    excluded: dict[str, int] = field(default_factory=dict)  # tie / both_bad / skip / evaluation -> votes

    @property
    def n_votes(self) -> int:
        return len(self.vote_ids)

    def pairs(self) -> tuple[list[tuple[int, int]], list[int], list[float]]:
        """(winner, loser) item pairs, the vote (group) of each, and each pair's weight 1 / (K - 1)."""
        pairs, groups, weights = [], [], []
        for (win, losers), g in zip(self.choices, self.groups):
            for loser in losers:
                pairs.append((win, loser))
                groups.append(g)
                weights.append(1.0 / (self.ks[g] - 1))
        return pairs, groups, weights


def user_choices(ctx: AppContext, user: str, *, include_evaluation: bool = False) -> UserChoices:
    """The user's active votes as choices: ``best`` -> (chosen, the K - 1 others); ``rank`` -> each image over all
    below it; ``tie`` / ``both_bad`` / ``skip`` counted in ``excluded``; blind before/after rounds
    (:data:`EVAL_SOURCE`) left out (counted as ``evaluation``) unless ``include_evaluation``."""
    out = UserChoices()
    index: dict[tuple[str, str], int] = {}

    def item(vote: Vote, slot: int) -> int:
        it = vote.round.items[slot]
        key = (it.sha256, vote.round.prompt)
        if key not in index:
            index[key] = len(out.items)
            out.items.append((it.sha256, vote.round.prompt, it.path))
        return index[key]

    for vote in ctx.store.votes(user_id=user):
        if vote.round.source == EVAL_SOURCE and not include_evaluation:
            out.excluded["evaluation"] = out.excluded.get("evaluation", 0) + 1
            continue
        if vote.outcome in NO_PREFERENCE:
            out.excluded[vote.outcome] = out.excluded.get(vote.outcome, 0) + 1
            continue
        k = vote.round.k
        order = vote.ranking if vote.outcome == "rank" else vote.ranking[:1]
        rest = [s for s in range(k) if s not in order]  # best-of-K: the unordered losers
        g = len(out.vote_ids)
        for place, slot in enumerate(order):
            below = [*order[place + 1 :], *rest] if vote.outcome == "rank" else rest
            if below:
                out.choices.append((item(vote, slot), [item(vote, s) for s in below]))
                out.groups.append(g)
        out.vote_ids.append(vote.vote_id)
        out.ks.append(k)
    return out


# ----------------------------------------------------------------------------------------------------- features
_FEATURE_CACHE: weakref.WeakKeyDictionary[AppContext, dict[tuple[str, str, str], float]] = (
    weakref.WeakKeyDictionary()
)
_CACHE_LOCK = threading.Lock()


def _members(ctx: AppContext) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The population scorers (the app's configured scorers) keyed by their spec, and the specs to rebuild them."""
    from rewards import parse_scorer_spec

    specs = list(ctx.settings.scorers)
    if not specs:
        raise InputError(
            "the personal scorer is fitted over the app's scorers, and none are configured (AppSettings.scorers, "
            "e.g. toy/fidelity,toy/centering or pickscore,hpsv2.1)"
        )
    members, rebuild = {}, []
    for spec in specs:
        name, options = parse_scorer_spec(spec)
        members[spec] = ctx.scorer(spec)
        rebuild.append({"name": name, **options, "as": spec})
    return members, rebuild


def member_features(
    ctx: AppContext, images: Sequence[np.ndarray], prompts: Sequence[str], keys: Sequence[str] | None = None
) -> torch.Tensor:
    """``[M, S]`` population scores of ``images`` (uint8 ``H x W x 3``), batched per image size; cached per context
    by ``keys`` (e.g. the images' sha256) when given."""
    members, _ = _members(ctx)
    out = torch.full((len(images), len(members)), math.nan)
    with _CACHE_LOCK:
        cache = _FEATURE_CACHE.setdefault(ctx, {})
    todo: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        hit = [cache.get((keys[i], prompts[i], s)) for s in members] if keys is not None else [None]
        if keys is not None and all(h is not None for h in hit):
            out[i] = torch.tensor(hit)
        else:
            todo.setdefault(tuple(image.shape), []).append(i)
    for idx in todo.values():
        x = from_uint8([images[i] for i in idx])
        ps = [prompts[i] for i in idx]
        for j, (spec, scorer) in enumerate(members.items()):
            with torch.no_grad():
                values = scorer(x, ps).float().cpu()
            out[idx, j] = values
            if keys is not None:
                with _CACHE_LOCK:
                    cache.update({(keys[i], prompts[i], spec): float(v) for i, v in zip(idx, values)})
    return out


def _embed_images(embedder: Any, images: Sequence[np.ndarray]) -> torch.Tensor:
    from rewards.personal import _embed

    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(i)
    rows: dict[int, torch.Tensor] = {}
    for idx in by_size.values():
        emb = _embed(embedder, from_uint8([images[i] for i in idx]))
        rows.update(zip(idx, emb))
    return torch.stack([rows[i] for i in range(len(images))])


# ---------------------------------------------------------------------------------------------------------- fit
@dataclass
class UserScorerFit:
    """What :func:`fit_user_scorer` returns: the saved scorer and how well it agrees with the user's votes."""

    user: str
    path: Path
    scorer: PersonalScorer
    votes_used: int
    pairs: int
    excluded: dict[str, int]
    agreement: Interval  # leave-one-vote-out agreement of the personal scorer
    population: Interval  # the population ensemble (the prior) on the same pairs
    prior: list[float]

    def summary(self) -> str:
        names = self.scorer.feature_names
        excluded = ", ".join(f"{k} {v}" for k, v in sorted(self.excluded.items())) or "none"
        anchor = self.scorer.info.get("anchor")
        population = (
            "population scorers (equal-weight z-score ensemble)"
            if anchor is None
            else f"population scorer {anchor}"
        )
        lines = [
            f"**{self.user}**: personal scorer fitted on **{self.votes_used} votes** ({self.pairs} pairs); "
            f"not used: {excluded}",
            "",
            "| | agreement with your votes (95% interval) |",
            "|---|---|",
            f"| personal scorer (leave-one-vote-out) | {self.agreement.fmt()} |",
            f"| {population} | {self.population.fmt()} |",
            "",
            "| feature | population weight | your weight |",
            "|---|---|---|",
            *(
                f"| {n} | {p:+.3f} | {w:+.3f} |"
                for n, p, w in zip(names, self.prior, self.scorer.weights.tolist())
            ),
            "",
            f"saved to `{self.path}`",
        ]
        return "\n".join(lines)


def fit_user_scorer(
    ctx: AppContext,
    user: str,
    *,
    l2: float = 1.0,
    anchor: str | None = None,
    embedder: str | None = None,
    embed_dims: int = 4,
    min_votes: int = MIN_VOTES,
    save: bool = True,
) -> UserScorerFit:
    """Fit ``user``'s personal scorer from their active votes (module docstring) and save it to
    :func:`scorer_path`. ``embedder`` (default ``AppSettings.personal_embedder``): a scorer spec with
    ``encode_images`` (a CLIP-family scorer) whose top ``embed_dims`` principal components of the voted images join
    the features at prior weight 0 (``""``: none). Refuses (``InputError``) below
    ``min_votes`` usable votes."""
    path = scorer_path(ctx, user)
    embedder = embedder if embedder is not None else ctx.settings.personal_embedder
    members, specs = _members(ctx)
    data = user_choices(ctx, user)
    if data.n_votes < max(min_votes, 2):
        excluded = ", ".join(f"{k} {v}" for k, v in sorted(data.excluded.items()))
        raise InputError(
            f"{user} has {data.n_votes} usable vote(s); the personal scorer needs at least {max(min_votes, 2)} "
            "(best-of-K or ranking votes; ties, both-bad and skips carry no preference"
            + (f"; not used: {excluded}" if excluded else "")
            + "). Vote on a few more pairs first."
        )
    images = [load_image(p) for _, _, p in data.items]
    prompts = [prompt for _, prompt, _ in data.items]
    features = member_features(ctx, images, prompts, keys=[sha for sha, _, _ in data.items])
    embedding: dict[str, Any] = {}
    if embedder:
        from rewards import parse_scorer_spec

        model = ctx.scorer(embedder)
        emb = _embed_images(model, images)
        center = emb.mean(0)
        k = max(1, min(int(embed_dims), emb.shape[0] - 1, emb.shape[1]))
        basis = torch.linalg.svd(emb - center, full_matrices=False).Vh[:k]  # principal axes [k, D]
        features = torch.cat([features, (emb - center) @ basis.T], dim=1)
        name, options = parse_scorer_spec(embedder)
        embedding = {
            "embedder": model,
            "basis": basis,
            "center": center,
            "embedder_spec": {"name": name, **options},
        }
    scorer = PersonalScorer.fit_features(
        members, features, data.choices, anchor=anchor, l2=l2, specs=specs, **embedding
    )
    pairs, groups, weights = data.pairs()
    phi = (features - scorer.mean) / scorer.std
    diff = phi[[a for a, _ in pairs]] - phi[[b for _, b in pairs]]
    prior = PersonalScorer.prior(list(members), anchor, extra=features.shape[1] - len(members))
    agreement = _agreement(leave_one_group_out(diff, groups, prior, l2), weights)
    population = _agreement(diff @ prior, weights)
    scorer.info.update(
        {
            "user": user,
            "votes": data.n_votes,
            "vote_ids": data.vote_ids,
            "excluded": data.excluded,
            "prior": prior.tolist(),
            "agreement": _interval_dict(agreement),
            "population_agreement": _interval_dict(population),
            "fitted_at": time.time(),
        }
    )
    if save:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        scorer.save(tmp)
        tmp.replace(path)  # atomic: a job reading scorer.json never sees half a file
    _LOADED.pop(str(path), None)
    _forget_built(ctx, path)
    return UserScorerFit(
        user, path, scorer, data.n_votes, len(pairs), data.excluded, agreement, population, prior.tolist()
    )


def _forget_built(ctx: AppContext, path: Path) -> None:
    """Drop scorers the context built from this file (Compare's ``personal:path=<file>``; ``AppContext.scorer`` keeps
    what it builds), so that the next use reads the refitted weights."""
    with ctx._lock:
        for spec in [k for k in ctx._scorers if k.startswith("personal:") and str(path) in k]:
            del ctx._scorers[spec]


def _agreement(margins: torch.Tensor, weights: Sequence[float]) -> Interval:
    """Weighted share of pairs whose margin favours the user's choice (a zero margin counts 1/2), with a Wilson
    interval over the weighted count (a pairwise or best-of-K vote = one trial)."""
    w = torch.tensor(list(weights), dtype=torch.float64)
    hit = (margins.double() > 0).double() + 0.5 * (margins.double() == 0).double()
    return wilson_interval(float((w * hit).sum()), float(w.sum()))


def _interval_dict(ci: Interval) -> dict[str, float]:
    return {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "level": ci.level}


_LOADED: dict[str, tuple[int, PersonalScorer]] = {}


def load_user_scorer(ctx: AppContext, user: str) -> PersonalScorer:
    """The user's saved personal scorer (reloaded when the file changes)."""
    path = scorer_path(ctx, user)
    if not path.is_file():
        raise InputError(f"{user} has no personal scorer yet: vote on {MIN_VOTES}+ pairs, then press 'Fit'")
    stamp = path.stat().st_mtime_ns
    hit = _LOADED.get(str(path))
    if hit is None or hit[0] != stamp:
        hit = (stamp, PersonalScorer.from_pretrained(str(path)))
        _LOADED[str(path)] = hit
    return hit[1]


# ------------------------------------------------------------------------------------------------ fresh samples
@dataclass
class RankedSample:
    seed: int
    image: np.ndarray
    personal: float  # the user's scorer (log-odds units: a difference d means P(prefer) = sigmoid(d))
    population: float  # the population ensemble (the prior weights) on the same standardised features
    features: dict[str, float]

    def caption(self, rank: int) -> str:
        return (
            f"#{rank} · seed {self.seed} · personal {self.personal:+.2f} · population {self.population:+.2f}"
        )


def population_score(scorer: PersonalScorer, features: torch.Tensor) -> torch.Tensor:
    """The prior (population ensemble) on the scorer's standardised features ``[M, S (+ k)]``."""
    prior = scorer.info.get("prior")
    if prior is None:
        prior = PersonalScorer.prior(
            scorer.member_names,
            scorer.info.get("anchor"),
            extra=len(scorer.weights) - len(scorer.member_names),
        ).tolist()
    phi = (features - scorer.mean.cpu()) / scorer.std.cpu()
    return phi @ torch.tensor(prior, dtype=phi.dtype)


def rank_fresh(
    ctx: AppContext,
    user: str,
    *,
    checkpoint: str,
    prompt: str | None,
    prompt_set: str | None = None,
    seeds: str = "0-7",
    sampler: str | None = None,
    steps: Any = None,
    guidance: Any = None,
    progress: ProgressFn | None = None,
) -> tuple[str, list[RankedSample]]:
    """Render ``seeds`` of ``checkpoint`` for a prompt (fixed seeds: the same images every time) and order them by
    the user's personal scorer, best first, with the population ensemble's score beside it."""
    scorer = load_user_scorer(ctx, user)
    text = check_prompt(ctx, prompt, prompt_set)
    seed_list = check_seeds(ctx, seeds)
    cfg = sampling(ctx, sampler, steps, guidance)
    images = ctx.renderer.render(checkpoint, [text] * len(seed_list), seed_list, cfg, progress)
    x = from_uint8(images)
    with torch.no_grad():
        feats = scorer.features(x, [text] * len(images))
        personal = scorer.score(x, [text] * len(images)).float().cpu()
    population = population_score(scorer, feats)
    rows = [
        RankedSample(s, img, float(p), float(q), dict(zip(scorer.feature_names, f.tolist())))
        for s, img, p, q, f in zip(seed_list, images, personal, population, feats)
    ]
    return text, sorted(rows, key=lambda r: -r.personal)


# --------------------------------------------------------------------------------------------- active selection
@dataclass
class CurrentFit:
    """The BT fit of the user's votes as they are now (not saved): weights, Laplace covariance, standardisation."""

    weights: torch.Tensor
    cov: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    votes: int


def current_fit(ctx: AppContext, user: str, *, l2: float = 1.0) -> CurrentFit | None:
    """Refit the user's population-feature BT model on their votes now; None below :data:`MIN_VOTES` votes."""
    data = user_choices(ctx, user)
    if data.n_votes < MIN_VOTES:
        return None
    members, _ = _members(ctx)
    images = [load_image(p) for _, _, p in data.items]
    features = member_features(ctx, images, [p for _, p, _ in data.items], keys=[s for s, _, _ in data.items])
    mean, std = standardise(features)
    phi = (features - mean) / std
    pairs, _, _ = data.pairs()
    diff = phi[[a for a, _ in pairs]] - phi[[b for _, b in pairs]]
    w = fit_bradley_terry(diff, PersonalScorer.prior(list(members)), l2)
    return CurrentFit(w, laplace_covariance(diff, w, l2), mean, std, data.n_votes)


def most_informative_pair(fit: CurrentFit, features: torch.Tensor) -> tuple[int, int, float, float]:
    """Among all pairs of a candidate pool ``features[P, S]``, the one whose answer is expected to teach the fit the
    most (BALD, :func:`rewards.personal.pair_information`); returns ``(i, j, P(i > j), bits)``."""
    if features.shape[0] < 2:
        raise InputError("the candidate pool needs at least 2 images")
    phi = (features - fit.mean) / fit.std
    pairs = list(itertools.combinations(range(features.shape[0]), 2))
    dphi = torch.stack([phi[i] - phi[j] for i, j in pairs])
    p, info = pair_information(dphi, fit.weights, fit.cov)
    best = int(torch.argmax(info))
    i, j = pairs[best]
    return i, j, float(p[best]), float(info[best])


def next_teaching_pair(
    ctx: AppContext,
    *,
    user: str,
    checkpoint: str,
    prompt: str | None,
    prompt_set: str | None,
    pool: int = 6,
    selection: str = "bald",
    sampler: str | None = None,
    steps: Any = None,
    guidance: Any = None,
    session_id: str | None = None,
    progress: ProgressFn | None = None,
) -> tuple[ArenaState, RoundView]:
    """A best-of-2 round to teach the personal scorer: ``pool`` seeds of ``checkpoint`` for one prompt, and of those
    the most informative pair under the current fit (a random pair before :data:`MIN_VOTES` usable votes, or always
    with ``selection="random"``, the comparison arm of ``benchmarks/personal_selection.py``). Vote on
    it with :func:`apps.handlers.act` (the arena's keys); the round is stored with source :data:`TEACH_SOURCE`."""
    pool = int(pool)
    if not 2 <= pool <= ctx.settings.max_seeds:
        raise InputError(f"candidate pool: between 2 and {ctx.settings.max_seeds} images, got {pool}")
    if selection not in ("bald", "random"):
        raise InputError(f"selection must be 'bald' or 'random', got {selection!r}")
    _check_loaded(ctx, checkpoint)
    text = check_prompt(ctx, prompt, prompt_set)
    cfg = sampling(ctx, sampler, steps, guidance)
    seeds = ctx.draw(lambda r: r.sample(range(2**31), pool))
    images = ctx.renderer.render(checkpoint, [text] * pool, seeds, cfg, progress)
    fit = current_fit(ctx, user) if selection == "bald" else None
    if fit is None:
        i, j = ctx.draw(lambda r: r.sample(range(pool), 2))
        how: dict[str, Any] = {"selection": "random", "votes_before": len(user_choices(ctx, user).vote_ids)}
        note = (
            "random pair"
            if selection == "random"
            else f"random pair (active selection starts after {MIN_VOTES} usable votes)"
        )
    else:
        feats = member_features(ctx, images, [text] * pool)
        i, j, p, bits = most_informative_pair(fit, feats)
        how = {"selection": "bald", "p_first": p, "info_bits": bits, "votes_before": fit.votes, "pool": pool}
        note = f"most informative of {pool * (pool - 1) // 2} pairs: P(first) = {p:.2f}, {bits:.2f} bits expected"
    arms = [(None, checkpoint, seeds[idx], images[idx], how) for idx in (i, j)]
    return _record_round(
        ctx,
        user=user,
        text=text,
        arms=arms,
        cfg=cfg,
        source=TEACH_SOURCE,
        blind=False,
        message=f"{note}. Press 1 or 2 (t tie, s skip, u undo)",
        session_id=session_id,
    )


def _check_loaded(ctx: AppContext, *checkpoints: str) -> None:
    names = ctx.renderer.names()
    for name in checkpoints:
        if name not in names:
            raise InputError(f"checkpoint {name!r} is not loaded; choose one of {', '.join(names)}")


def _record_round(
    ctx: AppContext,
    *,
    user: str,
    text: str,
    arms: Sequence[
        tuple[str | None, str, int, np.ndarray, dict[str, Any]]
    ],  # (arm, checkpoint, seed, image, extra)
    cfg: Any,
    source: str,
    blind: bool,
    message: str,
    session_id: str | None,
) -> tuple[ArenaState, RoundView]:
    """Store the images and a round of the Personalise tab (teaching or blind before/after), in a shuffled display
    order; ``arm`` (when given) names the slot's identity, revealed after the vote."""
    items = []
    for arm, checkpoint, seed, image, extra in arms:
        params = {**generation_params(ctx, checkpoint, text, seed, cfg, image), **extra}
        if arm is not None:
            params["arm"] = arm
        items.append((ctx.store.add_image(png_bytes(image), {**params, "prompt": text}), params))
    order = ctx.draw(lambda r: r.sample(range(len(items)), len(items)))
    rnd = ctx.store.new_round(
        user_id=user,
        prompt=text,
        items=items,
        display_order=order,
        blind=blind,
        source=source,
        session_id=session_id,
    )
    state = ArenaState(round_id=rnd.round_id, shown_at=time.monotonic(), message=message)
    return state, round_view(ctx, rnd, state)


# ------------------------------------------------------------------------------------------- blind before/after
def _heldout_prompt(ctx: AppContext, user: str, prompt: str | None, prompt_set: str | None) -> str:
    """A typed prompt, or one of ``prompt_set`` that the user has not voted on outside before/after rounds."""
    if (prompt or "").strip() or not prompt_set:
        return check_prompt(ctx, prompt, prompt_set)
    seen = {v.round.prompt for v in ctx.store.votes(user_id=user) if v.round.source != EVAL_SOURCE}
    pool = [p for p in ctx.prompts(prompt_set) if p not in seen]
    if not pool:
        raise InputError(
            f"every prompt of {prompt_set!r} appears in your votes; choose a held-out prompt set"
        )
    return check_prompt(ctx, ctx.draw(lambda r: r.choice(pool)))


def _blind(ctx: AppContext, **kwargs: Any) -> tuple[ArenaState, RoundView]:
    return _record_round(
        ctx,
        source=EVAL_SOURCE,
        blind=True,
        message="blind: which do you prefer? press 1 or 2 (t tie, b both bad, s skip); names shown after the vote",
        **kwargs,
    )


def new_blind_round(
    ctx: AppContext,
    *,
    user: str,
    a: str,
    b: str,
    prompt: str | None,
    prompt_set: str | None,
    sampler: str | None = None,
    steps: Any = None,
    guidance: Any = None,
    session_id: str | None = None,
    progress: ProgressFn | None = None,
) -> tuple[ArenaState, RoundView]:
    """Checkpoint ``a`` against ``b`` on one prompt and one seed (identical initial noise), shuffled, names hidden
    until the vote; the prompt is typed or drawn from ``prompt_set`` among those the user never voted on."""
    _check_loaded(ctx, a, b)
    if a == b:
        raise InputError("choose two different checkpoints for a before/after round")
    text = _heldout_prompt(ctx, user, prompt, prompt_set)
    cfg = sampling(ctx, sampler, steps, guidance)
    seed = ctx.draw(lambda r: r.randrange(2**31))
    arms = [(n, n, seed, ctx.renderer.render(n, [text], [seed], cfg, progress)[0], {}) for n in (a, b)]
    return _blind(ctx, user=user, text=text, arms=arms, cfg=cfg, session_id=session_id)


def baseline_arm(checkpoint: str, n: int) -> str:
    """The arm name of best-of-``n`` reranking of ``checkpoint`` by the personal scorer."""
    return f"best-of-{n}:{checkpoint}"


def new_baseline_round(
    ctx: AppContext,
    *,
    user: str,
    checkpoint: str,
    n: int = 8,
    prompt: str | None,
    prompt_set: str | None,
    sampler: str | None = None,
    steps: Any = None,
    guidance: Any = None,
    session_id: str | None = None,
    progress: ProgressFn | None = None,
) -> tuple[ArenaState, RoundView]:
    """The no-training baseline: ``n`` fresh seeds of ``checkpoint`` reranked by the user's personal scorer (its best
    one, arm :func:`baseline_arm`) against a plain sample of ``checkpoint`` on another seed, blind, as
    :func:`new_blind_round` shows a checkpoint pair (best-of-N against one sample, as it would be used)."""
    n = int(n)
    if not 2 <= n <= ctx.settings.max_seeds:
        raise InputError(f"best-of-N: N between 2 and {ctx.settings.max_seeds}, got {n}")
    _check_loaded(ctx, checkpoint)
    scorer = load_user_scorer(ctx, user)
    text = _heldout_prompt(ctx, user, prompt, prompt_set)
    cfg = sampling(ctx, sampler, steps, guidance)
    seeds = ctx.draw(
        lambda r: r.sample(range(2**31), n + 1)
    )  # seeds[0]: the plain sample; the rest: candidates
    images = ctx.renderer.render(checkpoint, [text] * (n + 1), seeds, cfg, progress)
    with torch.no_grad():
        scores = scorer.score(from_uint8(images[1:]), [text] * n).float().cpu()
    best = 1 + int(torch.argmax(scores))
    arms = [
        (
            baseline_arm(checkpoint, n),
            checkpoint,
            seeds[best],
            images[best],
            {"personal_score": float(scores[best - 1])},
        ),
        (checkpoint, checkpoint, seeds[0], images[0], {}),
    ]
    return _blind(ctx, user=user, text=text, arms=arms, cfg=cfg, session_id=session_id)


@dataclass
class BlindResult:
    a: str
    b: str
    wins: int  # votes for a
    losses: int  # votes for b
    ties: int
    no_preference: int  # both bad or skipped
    rate: Interval  # wins / (wins + losses), Wilson 95%

    def row(self) -> str:
        return (
            f"| {self.a} vs {self.b} | {self.rate.fmt()} | {self.wins} | {self.losses} | {self.ties} | "
            f"{self.no_preference} |"
        )


def _arm(params: dict[str, Any]) -> str:
    return str(params.get("arm") or params.get("checkpoint") or "")


def blind_win_rate(ctx: AppContext, a: str, b: str, *, user: str | None = None) -> BlindResult:
    """Win rate of arm ``a`` over arm ``b`` from the active votes on blind two-image rounds that showed exactly these
    two (before/after rounds and the arena's blind checkpoint rounds), of one user or all; ties excluded from the
    rate and counted, both-bad and skips counted. Each vote is one trial of the Wilson interval."""
    wins = losses = ties = other = 0
    for vote in ctx.store.votes(user_id=user):
        rnd = vote.round
        if not rnd.blind or rnd.k != 2:
            continue
        arms = [_arm(i.params) for i in rnd.items]
        if sorted(arms) != sorted([a, b]):
            continue
        if vote.outcome == "best":
            if arms[vote.ranking[0]] == a:
                wins += 1
            else:
                losses += 1
        elif vote.outcome == "tie":
            ties += 1
        else:
            other += 1
    return BlindResult(a, b, wins, losses, ties, other, wilson_interval(wins, wins + losses))


def before_after_report(
    ctx: AppContext, *, a: str, b: str, baseline_n: int = 8, user: str | None = None
) -> tuple[str, list[BlindResult]]:
    """Markdown: ``a`` over ``b`` and, as the baseline to beat, best-of-N reranking of ``b`` by the personal scorer
    over plain ``b`` samples."""
    results = [
        blind_win_rate(ctx, a, b, user=user),
        blind_win_rate(ctx, baseline_arm(b, baseline_n), b, user=user),
    ]
    head = [
        f"Blind votes{' of ' + user if user else ' of all users'} (names hidden until the vote; 95% Wilson interval, "
        "ties left out of the rate):",
        "",
        "| comparison | win rate of the first | wins | losses | ties | both bad / skipped |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join([*head, *(r.row() for r in results)]), results


# ---------------------------------------------------------------------------------------------------------- UI
def build_personal_tab(ctx: AppContext, user: Any, extras: Sequence[Callable[[list[Any]], Any]] = ()) -> Any:
    """The Personalise tab (call inside ``gr.Tabs()``; ``user`` is the app's user textbox): a vote panel whose
    rounds teach the scorer or measure it blind, Fit, fresh samples ranked, before/after results. Each of ``extras``
    is called inside the tab after these with the tab's checkpoint dropdowns ``[A, B]`` (e.g. the personal
    fine-tune's panel, which offers its finished LoRA in them). Returns the tab."""
    import gradio as gr

    from apps.app import BUTTONS, _button_updates, _guard, _image_updates, _session, _user, _vote_panel
    from apps.handlers import act

    s = ctx.settings
    names = ctx.renderer.names()
    with gr.Tab("Personalise", id="personal") as tab:
        gr.Markdown(
            f"Vote on a few pairs; from {MIN_VOTES} votes on, **Fit** learns your taste as weights over the "
            "population scorers (anchored to their equal-weight ensemble) and each next pair is the one your answer "
            "is expected to teach the most. **Blind** rounds on prompts you have not voted on measure a checkpoint "
            "(e.g. your personal LoRA) against another, and best-of-N reranking by your scorer as the no-training "
            "baseline."
        )
        with gr.Row():
            kind = gr.Radio(
                [
                    ("teach my scorer", "teach"),
                    ("blind: A vs B", "blind"),
                    ("blind: best-of-N by my scorer vs B", "baseline"),
                ],
                value="teach",
                label="next round",
                elem_id="personal-kind",
            )
            ckpt_b = gr.Dropdown(names, value=names[0], label="B (and the model to teach on)", scale=1)
            ckpt_a = gr.Dropdown(names, value=names[-1], label="A (blind rounds)", scale=1)
            refresh = gr.Button("↻ checkpoints", size="sm", scale=0)
        with gr.Row():
            prompt = gr.Textbox(
                label="prompt (empty: draw; blind rounds draw prompts you have not voted on)",
                max_lines=2,
                scale=3,
                elem_id="personal-prompt",
            )
            teach_default = next((p for p in s.prompt_sets if "heldout" not in p), s.prompt_sets[0])
            eval_default = next((p for p in s.prompt_sets if "heldout" in p), s.prompt_sets[0])
            pset = gr.Dropdown(s.prompt_sets, value=teach_default, label="prompt set (teach)", scale=1)
            eval_set = gr.Dropdown(
                s.prompt_sets, value=eval_default, label="held-out prompt set (blind rounds)", scale=1
            )
            pool = gr.Number(value=6, precision=0, label="candidates per pair (teach)", minimum=2)
            best_n = gr.Number(value=8, precision=0, label="N (best-of-N)", minimum=2)
        images, buttons, nxt, status, reveal, shown = _vote_panel("personal")
        state = gr.State(ArenaState())
        with gr.Row():
            fit_btn = gr.Button("Fit my scorer", variant="primary", elem_id="personal-fit")
            results_btn = gr.Button("Before/after results (A vs B)", elem_id="personal-results")
        fit_md = gr.Markdown(elem_id="personal-fit-summary")
        results_md = gr.Markdown(elem_id="personal-results-summary")
        with gr.Row():
            fresh_seeds = gr.Textbox(value="0-7", label="fresh samples: seeds of B", max_lines=1, scale=1)
            fresh_btn = gr.Button("Rank fresh samples with my scorer", elem_id="personal-fresh", scale=1)
        fresh_used = gr.Markdown()
        gallery = gr.Gallery(label="fresh samples, best first", columns=4, height="auto", format="png")
        for extra in extras:
            extra([ckpt_a, ckpt_b])

    outputs = [state, *images, *buttons[2:4], status, reveal, shown]

    def out(st: ArenaState, view: RoundView | None) -> list[Any]:
        return [
            st,
            *_image_updates(view),
            *_button_updates(view),
            st.message,
            view.reveal if view else "",
            f"**prompt:** {view.prompt}" if view else gr.update(),
        ]

    def progress_fn(progress: Any) -> ProgressFn:
        return lambda fraction, desc: progress(fraction, desc=desc)

    @_guard
    def on_next(
        name,
        kind_,
        a,
        b,
        text,
        teach_set,
        heldout_set,
        pool_,
        n_,
        request: gr.Request,
        progress=gr.Progress(),  # noqa: B008
    ):
        who, session = _user(name, request), _session(request)
        prompt_set = teach_set if kind_ == "teach" else heldout_set
        common: dict[str, Any] = dict(
            prompt=text, prompt_set=prompt_set, session_id=session, progress=progress_fn(progress)
        )
        if kind_ == "teach":
            st, view = next_teaching_pair(ctx, user=who, checkpoint=b, pool=int(pool_ or 6), **common)
        elif kind_ == "blind":
            st, view = new_blind_round(ctx, user=who, a=a, b=b, **common)
        elif kind_ == "baseline":
            st, view = new_baseline_round(ctx, user=who, checkpoint=b, n=int(n_ or 8), **common)
        else:
            raise InputError(f"round kind must be teach, blind or baseline, got {kind_!r}")
        return out(st, view)

    nxt.click(
        on_next,
        [user, kind, ckpt_a, ckpt_b, prompt, pset, eval_set, pool, best_n],
        outputs,
        api_name="personal_next",
        concurrency_id="generate",
        concurrency_limit=1,
    )

    def key_handler(key: str) -> Callable[..., Any]:
        @_guard
        def handler(name, st: ArenaState, request: gr.Request):
            return out(*act(ctx, st, user=_user(name, request), key=key, session_id=_session(request)))

        return handler

    for (suffix, key, _), btn in zip(BUTTONS, buttons):
        btn.click(key_handler(key), [user, state], outputs, api_name=f"personal_{suffix}")

    @_guard
    def on_fit(name, request: gr.Request):
        return fit_user_scorer(ctx, _user(name, request)).summary()

    fit_btn.click(on_fit, [user], fit_md, api_name="personal_fit")

    @_guard
    def on_results(name, a, b, n_, request: gr.Request):
        return before_after_report(ctx, a=a, b=b, baseline_n=int(n_ or 8), user=_user(name, request))[0]

    results_btn.click(on_results, [user, ckpt_a, ckpt_b, best_n], results_md, api_name="personal_results")

    @_guard
    def on_fresh(name, b, text, prompt_set, seeds, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        used, rows = rank_fresh(
            ctx,
            _user(name, request),
            checkpoint=b,
            prompt=text,
            prompt_set=prompt_set,
            seeds=seeds,
            progress=progress_fn(progress),
        )
        from apps.handlers import for_display

        return f"**prompt:** {used}", [(for_display(r.image), r.caption(i + 1)) for i, r in enumerate(rows)]

    fresh_btn.click(
        on_fresh,
        [user, ckpt_b, prompt, eval_set, fresh_seeds],
        [fresh_used, gallery],
        api_name="personal_fresh",
        concurrency_id="generate",
        concurrency_limit=1,
    )

    def on_refresh(a, b):
        choices = ctx.renderer.names()
        return gr.update(choices=choices, value=a), gr.update(choices=choices, value=b)

    refresh.click(on_refresh, [ckpt_a, ckpt_b], [ckpt_a, ckpt_b], api_name="personal_refresh")
    return tab
