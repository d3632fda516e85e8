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
  ensemble's agreement on the same pairs, each with a 95% Wilson interval in which a vote counts once (the pairs of a
  K-wise vote weigh 1 / (K - 1) each, as the export does).
* :func:`next_teaching_pair`: renders a pool of seeds and shows the pair whose answer is expected to teach the
  current fit the most (BALD under the Laplace posterior, :func:`rewards.personal.pair_information`); before
  :data:`MIN_VOTES` usable votes, a random pair of the pool.
* :func:`new_blind_round` / :func:`new_baseline_round` / :func:`blind_win_rate`: checkpoint A against B on one seed
  (identical initial noise), or best-of-N reranking by the personal scorer against a plain sample, names hidden until
  the vote; the win rate of A over B with a 95% Wilson interval (ties, both-bad and skips counted, left out).
"""

from __future__ import annotations

import math
import re
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apps.handlers import (
    AppContext,
    InputError,
)
from apps.store import Vote
from rewards.personal import (
    PersonalScorer,
    leave_one_group_out,
)
from samplers import from_uint8, load_image
from workbench.stats import Interval, wilson_interval

MIN_VOTES = 4  # usable votes before a scorer is fitted (and before active selection replaces random pairs)
SCORER_FILE = "scorer.json"
TEACH_SOURCE = "personalise"  # rounds shown to teach the personal scorer
EVAL_SOURCE = "beforeafter"  # blind before/after rounds: the evaluation set, never fitted on
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
    choices: list[tuple[int, list[int]]] = field(
        default_factory=list
    )  # (chosen, [rejected, ...]) item indices
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
        lines = [
            f"**{self.user}**: personal scorer fitted on **{self.votes_used} votes** ({self.pairs} pairs); "
            f"not used: {excluded}",
            "",
            "| | agreement with your votes (95% interval) |",
            "|---|---|",
            f"| personal scorer (leave-one-vote-out) | {self.agreement.fmt()} |",
            f"| population scorers (equal-weight z-score ensemble) | {self.population.fmt()} |",
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
    :func:`scorer_path`. ``embedder``: a scorer spec with ``encode_images`` (a CLIP-family scorer) whose top
    ``embed_dims`` principal components join the features at prior weight 0. Refuses (``InputError``) below
    ``min_votes`` usable votes."""
    path = scorer_path(ctx, user)
    data = user_choices(ctx, user)
    if data.n_votes < max(min_votes, 2):
        excluded = ", ".join(f"{k} {v}" for k, v in sorted(data.excluded.items()))
        raise InputError(
            f"{user} has {data.n_votes} usable vote(s); the personal scorer needs at least {max(min_votes, 2)} "
            "(best-of-K or ranking votes; ties, both-bad and skips carry no preference"
            + (f"; not used: {excluded}" if excluded else "")
            + "). Vote on a few more pairs first."
        )
    members, specs = _members(ctx)
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
    return UserScorerFit(
        user, path, scorer, data.n_votes, len(pairs), data.excluded, agreement, population, prior.tolist()
    )


def _agreement(margins: torch.Tensor, weights: Sequence[float]) -> Interval:
    """Weighted share of pairs whose margin favours the user's choice (a zero margin counts 1/2), with a Wilson
    interval over the weighted count (one vote = one trial)."""
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
