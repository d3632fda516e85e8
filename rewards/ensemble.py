"""Combining scorers whose raw scales differ by orders of magnitude (HPS ~0.3, PickScore ~20, aesthetic ~6).

Pure functions over a score matrix ``scores[S, B]`` (S scorers, B images) and the prompt of each image; images with
the same prompt form a group of K candidates. Never average raw scores.

- :func:`zscore_average`: ``mean_s w_s (r_s - mu_s) / sigma_s``. ``mu_s``/``sigma_s`` are fixed reference statistics
  when given (e.g. base-model samples on the training prompts, stored with the run), else the batch's own.
- :func:`rank_average`: within each prompt group, each scorer's rank scaled to [0, 1] (best = 1, ties share the mean
  rank), averaged over scorers (Borda-style; robust, discards margins).
- :func:`win_rate`: the Syn-Pic aggregation (Karthik et al. 2024, "Scalable Ranked Preference Optimization for
  Text-to-Image Generation" (RankDPO), arXiv 2410.18013): ``phi_i = wins_i / (S (K - 1))``, where ``wins_i`` counts,
  over scorers s and the other K - 1 candidates j of i's prompt, the pairs with ``r_s(i) > r_s(j)`` (a tie counts 1/2).
  ``phi`` lies in [0, 1]; ranking candidates by ``phi`` gives the Syn-Pic ranking.

Symbols: ``r_s(i)`` score of image i by scorer s; ``K`` candidates per prompt; ``S`` scorers; ``w_s`` weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch

from rewards.base import SCORERS, Scorer

Method = Literal["zscore", "rank", "winrate"]
METHODS: tuple[str, ...] = ("zscore", "rank", "winrate")


def group_ids(prompts: Sequence[str]) -> torch.Tensor:
    """Prompt -> group index in first-appearance order, ``[B]`` long."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(p, len(index)) for p in prompts], dtype=torch.long)


def softmax_by_group(scores: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Softmax of ``scores[B]`` within each prompt group (the PickScore preference probability)."""
    groups = group_ids(prompts).to(scores.device)
    out = torch.empty_like(scores)
    for g in groups.unique():
        m = groups == g
        out[m] = torch.softmax(scores[m], dim=0)
    return out


def _weights(weights: Sequence[float] | torch.Tensor | None, s: int, ref: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.full((s,), 1.0 / s, dtype=ref.dtype, device=ref.device)
    w = torch.as_tensor(weights, dtype=ref.dtype, device=ref.device)
    if w.shape != (s,) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be {s} non-negative numbers with a positive sum, got {w.tolist()}")
    return w / w.sum()


def zscore_average(
    scores: torch.Tensor,
    weights: Sequence[float] | torch.Tensor | None = None,
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """``scores[S, B]`` -> ``[B]``: weighted mean of per-scorer z-scores (zero where a scorer has no spread)."""
    s = scores.shape[0]
    mu = (
        scores.mean(1, keepdim=True) if mean is None else torch.as_tensor(mean, dtype=scores.dtype).view(s, 1)
    )
    if std is None:
        sigma = scores.std(1, keepdim=True) if scores.shape[1] > 1 else torch.zeros_like(scores[:, :1])
    else:
        sigma = torch.as_tensor(std, dtype=scores.dtype).view(s, 1)
    mu, sigma = mu.to(scores.device), sigma.to(scores.device)
    z = torch.where(sigma > 0, (scores - mu) / sigma.clamp_min(1e-12), torch.zeros_like(scores))
    return (_weights(weights, s, scores)[:, None] * z).sum(0)


def _pairwise_wins(scores: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scorer and image: wins against same-group candidates (ties 1/2) ``[S, B]``, and K - 1 per image ``[B]``."""
    same = groups[:, None] == groups[None, :]
    same.fill_diagonal_(False)
    diff = scores[:, :, None] - scores[:, None, :]  # [S, B, B]: r_s(i) - r_s(j)
    wins = ((diff > 0).to(scores.dtype) + 0.5 * (diff == 0).to(scores.dtype)) * same
    return wins.sum(-1), same.sum(-1).to(scores.dtype)


def rank_average(
    scores: torch.Tensor, prompts: Sequence[str], weights: Sequence[float] | torch.Tensor | None = None
) -> torch.Tensor:
    """``scores[S, B]`` -> ``[B]`` in [0, 1]: mean over scorers of the within-prompt rank, best = 1 (singletons 0.5)."""
    groups = group_ids(prompts).to(scores.device)
    wins, others = _pairwise_wins(scores, groups)
    rank01 = torch.where(others > 0, wins / others.clamp_min(1), torch.full_like(wins, 0.5))
    return (_weights(weights, scores.shape[0], scores)[:, None] * rank01).sum(0)


def win_rate(scores: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Syn-Pic ``phi_i = wins_i / (S (K - 1))`` over ``scores[S, B]``; 0.5 for a prompt with a single image."""
    groups = group_ids(prompts).to(scores.device)
    wins, others = _pairwise_wins(scores, groups)
    s = scores.shape[0]
    return torch.where(others > 0, wins.sum(0) / (s * others).clamp_min(1), torch.full_like(others, 0.5))


@SCORERS.register("ensemble")
class EnsembleScorer(Scorer):
    """Several scorers combined by z-score average, rank average or Syn-Pic win rate (see module docstring)."""

    description = "ensemble of scorers: z-score average (~N(0,1)), rank average or Syn-Pic win rate ([0, 1])"

    def __init__(
        self,
        members: Mapping[str, Scorer],
        *,
        method: Method = "zscore",
        weights: Sequence[float] | None = None,
        stats: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError(
                "ensemble members is empty; list at least one scorer, e.g. members=['hpsv2.1', ...]"
            )
        if method not in METHODS:
            raise ValueError(f"ensemble method={method!r} is unknown; use one of {', '.join(METHODS)}")
        if method == "winrate" and weights is not None:
            raise ValueError(
                "ensemble weights are not used by method='winrate'; remove weights or use 'rank'"
            )
        # a ModuleList (not ModuleDict): member names such as "hpsv2.1" contain dots
        self.member_names = [str(k) for k in members]
        self.member_modules = torch.nn.ModuleList(members.values())
        self.method = method
        self.weights = None if weights is None else [float(w) for w in weights]
        if self.weights is not None and len(self.weights) != len(members):
            raise ValueError(f"ensemble weights has {len(self.weights)} entries for {len(members)} members")
        self.stats = {k: (float(v[0]), float(v[1])) for k, v in (stats or {}).items()}
        unknown = set(self.stats) - set(members)
        if unknown:
            raise ValueError(
                f"ensemble stats names unknown members {sorted(unknown)}; members are {list(members)}"
            )
        if self.stats and set(self.stats) != set(members):
            raise ValueError(
                f"ensemble stats must give [mean, std] for every member ({list(members)}) or none"
            )
        # differentiable only when the aggregation is smooth and every member is
        self.differentiable = (
            method == "zscore" and bool(self.stats) and all(m.differentiable for m in members.values())
        )
        self.needs_prompt = any(m.needs_prompt for m in members.values())

    @property
    def members(self) -> dict[str, Scorer]:
        # a ModuleList yields plain Modules; __init__ filled it from a Mapping[str, Scorer]
        return dict(zip(self.member_names, cast("list[Scorer]", list(self.member_modules))))

    @classmethod
    def from_options(
        cls,
        members: Sequence[str | Mapping[str, Any]],
        *,
        method: Method = "zscore",
        weights: Sequence[float] | None = None,
        stats: Mapping[str, Sequence[float]] | None = None,
    ) -> EnsembleScorer:
        """``members``: scorer names or ``{"name": ..., **options}`` mappings (an optional ``"as"`` key renames)."""
        from rewards import build_scorer

        built: dict[str, Scorer] = {}
        for spec in members:
            opts = {"name": spec} if isinstance(spec, str) else dict(spec)
            if "name" not in opts:
                raise ValueError(
                    f"ensemble member {spec!r} has no 'name'; write {{'name': 'hpsv2.1', 'path': ...}}"
                )
            name = str(opts.pop("name"))
            key = str(opts.pop("as", name))
            if key in built:
                raise ValueError(f"ensemble member {key!r} appears twice; give one an 'as' alias")
            built[key] = build_scorer(name, **opts)
        return cls(built, method=method, weights=weights, stats=stats)

    def member_scores(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {name: m(images, prompts).float() for name, m in self.members.items()}

    def combine(self, per_member: Mapping[str, torch.Tensor], prompts: Sequence[str]) -> torch.Tensor:
        names = list(self.members)
        scores = torch.stack([per_member[n].to(per_member[names[0]].device) for n in names])
        if self.method == "zscore":
            mean = [self.stats[n][0] for n in names] if self.stats else None
            std = [self.stats[n][1] for n in names] if self.stats else None
            return zscore_average(scores, self.weights, mean, std)
        if self.method == "rank":
            return rank_average(scores, prompts, self.weights)
        return win_rate(scores, prompts)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.combine(self.member_scores(images, prompts), prompts)
