"""Reward scorers behind one protocol: ``scorer(images[B, 3, H, W] in [0, 1], prompts) -> Tensor[B]``.

Every scorer module is imported here explicitly so that its ``@SCORERS.register`` line runs; there is no discovery.
The training loop, ``workbench eval`` and ``workbench score`` build scorers by name with plain keyword options::

    from rewards import build_scorer, build_ensemble
    hps = build_scorer("hpsv2.1", path="/weights/HPS_v2.1_compressed.pt", device="cuda")
    ens = build_ensemble(["hpsv2.1", {"name": "pickscore", "path": "/weights/PickScore_v1"}], method="rank")

See ``docs/scorers.md`` for what each number means and where the weights come from.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rewards import aesthetic, clip, ensemble, hps, jpeg, personal, pickscore, toy
from rewards.base import SCORERS, Scorer
from rewards.ensemble import EnsembleScorer

__all__ = [
    "SCORERS",
    "EnsembleScorer",
    "Scorer",
    "aesthetic",
    "build_ensemble",
    "build_scorer",
    "clip",
    "ensemble",
    "hps",
    "jpeg",
    "parse_scorer_spec",
    "personal",
    "pickscore",
    "scorer_options",
    "toy",
]


def _factory(entry: Any) -> Any:
    """The callable that builds a registered entry from plain options: ``from_options``, ``from_pretrained`` or
    the entry itself (classes with keyword-only constructors, e.g. analytic rewards)."""
    for attr in ("from_options", "from_pretrained"):
        fn = getattr(entry, attr, None)
        if fn is not None:
            return fn
    return entry


def scorer_options(name: str) -> dict[str, Any]:
    """Option name -> default (``inspect.Parameter.empty`` when required) accepted by ``build_scorer(name, ...)``."""
    sig = inspect.signature(_factory(SCORERS.get(name)))
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "cls")
    }


def build_scorer(name: str, **options: Any) -> Scorer:
    """Construct the scorer registered as ``name`` from plain keyword options (as YAML gives them).

    Unknown options raise a ``ValueError`` listing the accepted ones; missing weights raise a ``ValueError`` that says
    which file to download and which option to set.
    """
    try:
        entry = SCORERS.get(name)
    except KeyError as e:
        raise ValueError(str(e.args[0])) from None
    factory = _factory(entry)
    accepted = scorer_options(name)
    # torch.nn.Module.__init__(*args, **kwargs) accepts nothing really: treat an inherited one as "no options"
    inherits_module_init = isinstance(factory, type) and factory.__init__ is torch.nn.Module.__init__
    takes_kwargs = not inherits_module_init and any(
        p.kind == p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values()
    )
    unknown = sorted(set(options) - set(accepted))
    if unknown and not takes_kwargs:
        raise ValueError(
            f"scorer {name!r} has no option(s) {', '.join(unknown)}; accepted options: {', '.join(accepted) or '(none)'}"
        )
    scorer = factory(**options)
    if not isinstance(scorer, Scorer):
        raise TypeError(f"scorer {name!r} built a {type(scorer).__name__}, not a rewards.Scorer")
    return scorer


def build_ensemble(
    members: Sequence[str | Mapping[str, Any] | Scorer] | Mapping[str, Scorer],
    *,
    method: ensemble.Method = "zscore",
    weights: Sequence[float] | None = None,
    stats: Mapping[str, Sequence[float]] | None = None,
) -> EnsembleScorer:
    """An :class:`~rewards.ensemble.EnsembleScorer` from names, ``{"name": ..., **options}`` specs, built scorers, or
    a ``{name: scorer}`` mapping. ``method``: ``zscore`` | ``rank`` | ``winrate`` (Syn-Pic)."""
    if isinstance(members, Mapping):
        return EnsembleScorer(dict(members), method=method, weights=weights, stats=stats)
    scorers = [m for m in members if isinstance(m, Scorer)]
    if len(scorers) == len(members):
        built = {f"{type(m).__name__.lower()}_{i}": m for i, m in enumerate(scorers)}
        return EnsembleScorer(built, method=method, weights=weights, stats=stats)
    if scorers:
        raise ValueError(
            "ensemble members mix built scorers and specs; pass a {name: scorer} mapping instead"
        )
    specs = [m for m in members if not isinstance(m, Scorer)]
    return EnsembleScorer.from_options(specs, method=method, weights=weights, stats=stats)


def parse_scorer_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"hpsv2.1:path=/w/HPS.pt,device=cuda"`` -> ``("hpsv2.1", {"path": "/w/HPS.pt", "device": "cuda"})``.

    The command-line form of a scorer (``workbench score --scorer``; usable by any command that takes scorers).
    Values parse as bool (true/false), None (none/null), int, float, else string; paths must not contain commas.
    """
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(
                f"scorer spec {spec!r}: option {item!r} is not key=value; write NAME:key=value,key=value"
            )
        options[key.strip()] = _parse_value(value.strip())
    if not name:
        raise ValueError(f"scorer spec {spec!r}: missing scorer name; see `workbench ls scorers`")
    return name, options


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
