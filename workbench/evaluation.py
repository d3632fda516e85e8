"""Evaluation: checkpoints x prompts x seeds -> images (identical initial noise per (prompt, seed)) -> scorers ->
statistics -> JSON, HTML report and a grid PNG (base beside tuned).

Statistics (all pure numpy/scipy functions of score arrays; higher scores are better for every scorer):

* per checkpoint and scorer: the mean with a Student-t 95% interval over the N (prompt, seed) items;
* per tuned checkpoint vs the base, paired by item: the mean difference ``tuned - base`` with a percentile-bootstrap
  95% interval (items resampled with replacement), and the win rate ``wins / (wins + losses)`` (exact ties, e.g.
  identical images, excluded) with a paired-bootstrap 95% interval and a Wilson score 95% interval, plus the
  two-sided exact sign test p-value of wins vs losses (binomial, p = 0.5).

The bootstrap is seeded (``seed``), so a report is reproducible bit for bit.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LEVEL = 0.95
N_BOOTSTRAP = 5000


# ------------------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval at ``level``."""

    estimate: float
    low: float
    high: float
    level: float = LEVEL

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def fmt(self, digits: int = 3) -> str:
        if math.isnan(self.estimate):
            return "n/a"  # e.g. a win rate when every item ties
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def mean_interval(x: Sequence[float] | np.ndarray, level: float = LEVEL) -> Interval:
    """Mean with a Student-t interval: ``mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)``."""
    from scipy import stats

    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        raise ValueError("cannot summarise zero scores")
    m = float(a.mean())
    if a.size == 1:
        return Interval(m, m, m, level)
    half = float(stats.t.ppf((1 + level) / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return Interval(m, m - half, m + half, level)


def paired_bootstrap(
    statistic: Callable[[np.ndarray], np.ndarray],
    values: np.ndarray,
    *,
    n_boot: int = N_BOOTSTRAP,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap of ``statistic`` over items. ``values`` is ``[n, ...]`` (one row per item, paired
    columns stay together); ``statistic`` maps ``[R, n, ...]`` replicates to ``[R]`` and must also accept ``[1, n, ...]``
    for the point estimate. Replicates are processed in chunks to bound memory."""
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[0]
    if n == 0:
        raise ValueError("cannot bootstrap zero items")
    estimate = float(statistic(v[None])[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)  # replicates per chunk: bounds the [chunk, n] index array to ~16 MB
    reps = np.concatenate(
        [statistic(v[rng.integers(0, n, size=(min(chunk, n_boot - i), n))]) for i in range(0, n_boot, chunk)]
    )
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return Interval(estimate, float("nan"), float("nan"), level)
    low, high = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(low), float(high), level)


def mean_difference(
    tuned: np.ndarray, base: np.ndarray, *, n_boot: int = N_BOOTSTRAP, seed: int = 0
) -> Interval:
    """Mean paired difference ``tuned - base`` with a percentile-bootstrap interval."""
    d = _paired(tuned, base)
    return paired_bootstrap(lambda r: r.mean(axis=1), d[:, 0] - d[:, 1], n_boot=n_boot, seed=seed)


def _win_fraction(signs: np.ndarray) -> np.ndarray:
    """``[R, n]`` signs (+1 win, -1 loss, 0 tie) -> ``[R]`` wins / (wins + losses); NaN when all tie."""
    wins = (signs > 0).sum(axis=1)
    decided = (signs != 0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(decided > 0, wins / np.maximum(decided, 1), np.nan)


def wilson_interval(successes: int, trials: int, level: float = LEVEL) -> Interval:
    """Wilson score interval for a binomial proportion (Wilson 1927): centre ``(p + z^2/2n) / (1 + z^2/n)``,
    half-width ``z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)`` with ``z`` the normal quantile at ``(1+level)/2``."""
    from scipy import stats

    if trials == 0:
        return Interval(float("nan"), 0.0, 1.0, level)
    z = float(stats.norm.ppf((1 + level) / 2))
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), level)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value of ``wins`` vs ``losses`` (ties dropped): Binomial(wins + losses, 1/2)."""
    from scipy import stats

    if wins + losses == 0:
        return 1.0
    return float(stats.binomtest(wins, wins + losses, 0.5).pvalue)


@dataclass(frozen=True)
class WinRate:
    wins: int
    losses: int
    ties: int
    bootstrap: Interval  # estimate = wins / (wins + losses)
    wilson: Interval
    p_sign: float

    @property
    def rate(self) -> float:
        return self.bootstrap.estimate


def win_rate(tuned: np.ndarray, base: np.ndarray, *, n_boot: int = N_BOOTSTRAP, seed: int = 0) -> WinRate:
    """Paired win rate of ``tuned`` over ``base`` per item (ties excluded), with bootstrap and Wilson intervals and
    the sign-test p-value."""
    d = _paired(tuned, base)
    signs = np.sign(d[:, 0] - d[:, 1])
    wins, losses = int((signs > 0).sum()), int((signs < 0).sum())
    boot = paired_bootstrap(_win_fraction, signs, n_boot=n_boot, seed=seed)
    return WinRate(
        wins,
        losses,
        len(signs) - wins - losses,
        boot,
        wilson_interval(wins, wins + losses),
        sign_test(wins, losses),
    )


def _paired(tuned: np.ndarray, base: np.ndarray) -> np.ndarray:
    t, b = np.asarray(tuned, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if t.shape != b.shape or t.ndim != 1:
        raise ValueError(f"paired scores must be 1-D arrays of equal length, got {t.shape} and {b.shape}")
    return np.stack([t, b], axis=1)


def summarise(
    scores: dict[str, dict[str, np.ndarray]], base: str = "base", *, n_boot: int = N_BOOTSTRAP, seed: int = 0
) -> dict[str, Any]:
    """``scores[checkpoint][scorer] -> [N]`` (items aligned across checkpoints) -> JSON-ready statistics:
    ``{"means": {ckpt: {scorer: interval}}, "vs_base": {ckpt: {scorer: {"delta": ..., "win_rate": ...}}}}``."""
    means = {c: {s: asdict(mean_interval(v)) for s, v in per.items()} for c, per in scores.items()}
    vs_base: dict[str, Any] = {}
    if base in scores:
        for c, per in scores.items():
            if c == base:
                continue
            vs_base[c] = {}
            for s, v in per.items():
                w = win_rate(v, scores[base][s], n_boot=n_boot, seed=seed)
                vs_base[c][s] = {
                    "delta": asdict(mean_difference(v, scores[base][s], n_boot=n_boot, seed=seed)),
                    "win_rate": {
                        "wins": w.wins,
                        "losses": w.losses,
                        "ties": w.ties,
                        "rate": w.rate,
                        "bootstrap": asdict(w.bootstrap),
                        "wilson": asdict(w.wilson),
                        "p_sign": w.p_sign,
                    },
                }
    return {"means": means, "vs_base": vs_base}


# ---------------------------------------------------------------------------------------------------- orchestration
ScorerFn = Callable[..., Any]  # scorer(images [B, 3, H, W] in [0, 1], prompts) -> Tensor[B]


@dataclass
class EvalPlan:
    """What to evaluate. ``checkpoints`` holds the base first (name ``base``) when win rates are wanted."""

    base: str
    checkpoints: list[Any]  # samplers.Checkpoint
    prompts: list[str]
    seeds: list[int]
    sampling: Any  # samplers.SamplingConfig
    scorers: list[str]
    out_dir: Path
    prompt_set: str = "custom"
    batch_size: int = 16
    cache_dir: Path | None = None  # None: no generation cache
    device: str = "cpu"
    dtype: str = "fp32"
    grid_items: int = 16
    html_items: int = 48
    n_boot: int = N_BOOTSTRAP
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the JSON (e.g. the demo's training run)

    @property
    def items(self) -> list[tuple[str, int]]:
        """The fixed (prompt, seed) items, prompt-major."""
        return [(p, s) for p in self.prompts for s in self.seeds]


@dataclass
class EvalResult:
    out_dir: Path
    summary: dict[str, Any]
    report: dict[str, Any]  # what report.json holds
    scores: dict[str, dict[str, np.ndarray]]
    image_paths: dict[str, list[Path]]
    json_path: Path
    html_path: Path
    grid_path: Path


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def run_eval(
    plan: EvalPlan,
    *,
    scorers: dict[str, ScorerFn] | None = None,
    load: Callable[[Any], Any] | None = None,
) -> EvalResult:
    """Generate, score, summarise and report. ``scorers`` (name -> scorer) defaults to
    ``rewards.build_scorer`` of each ``NAME[:key=value,...]`` spec; ``load(checkpoint) -> pipeline`` defaults to
    :func:`samplers.load_pipeline_for` on ``plan.base`` (both injectable for tests)."""
    import torch

    from samplers import ImageCache, from_uint8, generate_images, load_pipeline_for, model_id, save_png
    from workbench.models import DTYPES

    if not plan.checkpoints:
        raise ValueError("nothing to evaluate: pass at least one checkpoint (e.g. base)")
    if scorers is None:
        from rewards import build_scorer, parse_scorer_spec

        specs = [parse_scorer_spec(spec) for spec in plan.scorers]  # "NAME" or "NAME:key=value,..."
        scorers = {name: build_scorer(name, **options) for name, options in specs}
    for s in scorers.values():
        if isinstance(s, torch.nn.Module):
            s.to(plan.device).eval()

    def load_default(ckpt: Any) -> Any:
        return load_pipeline_for(plan.base, ckpt, device=plan.device, dtype=DTYPES[plan.dtype])

    loader = load or load_default

    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = ImageCache(plan.cache_dir) if plan.cache_dir is not None else None
    items = plan.items
    prompts = [p for p, _ in items]
    seeds = [s for _, s in items]
    scores: dict[str, dict[str, np.ndarray]] = {}
    paths: dict[str, list[Path]] = {}
    timings: dict[str, float] = {}
    for ckpt in plan.checkpoints:
        t0 = time.perf_counter()
        per = {name: np.full(len(items), np.nan) for name in scorers}
        ckpt_paths = [out / "images" / _slug(ckpt.name) / f"{i:05d}.png" for i in range(len(items))]
        mid = model_id(plan.base, ckpt, dtype=plan.dtype, device=plan.device)
        batches = generate_images(
            lambda c=ckpt: loader(c),
            prompts,
            seeds,
            plan.sampling,
            batch_size=plan.batch_size,
            cache=cache,
            model_id=mid,
            desc=f"eval {ckpt.name}",
        )
        for idx, images in batches:
            for i, image in zip(idx, images):
                save_png(image, ckpt_paths[i])
            x = from_uint8(images).to(plan.device)
            with torch.no_grad():
                for name, scorer in scorers.items():
                    per[name][idx] = scorer(x, [prompts[i] for i in idx]).float().cpu().numpy()
        scores[ckpt.name] = per
        paths[ckpt.name] = ckpt_paths
        timings[ckpt.name] = round(time.perf_counter() - t0, 2)

    summary = summarise(scores, plan.checkpoints[0].name, n_boot=plan.n_boot, seed=plan.seed)
    grid_path = write_grid(out / "grid.png", plan, paths, scores)
    report = {
        "plan": {
            "base": plan.base,
            "checkpoints": [{"name": c.name, "path": c.path} for c in plan.checkpoints],
            "prompt_set": plan.prompt_set,
            "n_prompts": len(plan.prompts),
            "seeds": plan.seeds,
            "n_items": len(items),
            "sampling": plan.sampling.to_dict(),
            "scorers": list(scorers),
            "device": plan.device,
            "dtype": plan.dtype,
            "bootstrap": {"n": plan.n_boot, "seed": plan.seed, "level": LEVEL},
            **plan.extra,
        },
        **summary,
        "seconds": timings,
        "files": {"grid": "grid.png", "html": "report.html", "images": "images/", "scores": "scores.jsonl"},
    }
    json_path = out / "report.json"
    _write_text(json_path, json.dumps(report, indent=2, default=_json_default))
    lines = []
    for i, (p, s) in enumerate(items):
        for c in plan.checkpoints:
            row = {
                "item": i,
                "prompt": p,
                "seed": s,
                "checkpoint": c.name,
                "path": os.path.relpath(paths[c.name][i], out),
            }
            row.update({f"score/{n}": float(scores[c.name][n][i]) for n in scorers})
            lines.append(json.dumps(row))
    _write_text(out / "scores.jsonl", "\n".join(lines) + "\n")
    html_path = write_html(out / "report.html", report, plan, paths, scores)
    return EvalResult(out, summary, report, scores, paths, json_path, html_path, grid_path)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# -------------------------------------------------------------------------------------------------------- reports
def format_table(summary: dict[str, Any], *, digits: int = 3) -> str:
    """Plain-text tables: means with 95% intervals, then each checkpoint vs the base (mean difference and win rate)."""
    means = summary["means"]
    ckpts = list(means)
    scorer_names = list(next(iter(means.values())))
    out = []
    head = ["checkpoint", *[f"{s} mean [95% CI]" for s in scorer_names]]
    rows = [[c, *[Interval(**means[c][s]).fmt(digits) for s in scorer_names]] for c in ckpts]
    out.append(_text_table(head, rows))
    vs = summary.get("vs_base") or {}
    if vs:
        head = [
            "checkpoint",
            "scorer",
            "delta vs base [95% bootstrap]",
            "win rate [95% bootstrap]",
            "win rate [95% Wilson]",
            "W/L/T",
            "sign-test p",
        ]
        rows = []
        for c, per in vs.items():
            for s, v in per.items():
                w = v["win_rate"]
                rows.append(
                    [
                        c,
                        s,
                        _signed(Interval(**v["delta"]), digits),
                        Interval(**w["bootstrap"]).fmt(2),
                        Interval(**w["wilson"]).fmt(2),
                        f"{w['wins']}/{w['losses']}/{w['ties']}",
                        f"{w['p_sign']:.2g}",
                    ]
                )
        out.append(_text_table(head, rows))
    return "\n\n".join(out)


def _signed(iv: Interval, digits: int) -> str:
    return f"{iv.estimate:+.{digits}f} [{iv.low:+.{digits}f}, {iv.high:+.{digits}f}]"


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*head), fmt.format(*["-" * w for w in widths]), *(fmt.format(*r) for r in rows)]
    )


def _grid_items(n: int, k: int) -> list[int]:
    """``k`` item indices spread evenly over ``n`` (so a grid shows many prompts, not the first prompt's seeds)."""
    if n <= k:
        return list(range(n))
    return sorted({round(x) for x in np.linspace(0, n - 1, k)})


def write_grid(
    path: Path,
    plan: EvalPlan,
    paths: dict[str, list[Path]],
    scores: dict[str, dict[str, np.ndarray]],
    *,
    cell: int = 128,
) -> Path:
    """One row per checkpoint (base on top), one column per item, same (prompt, seed) down each column; under each
    image, its score on the first scorer."""
    from PIL import Image, ImageDraw, ImageFont

    cols = _grid_items(len(plan.items), plan.grid_items)
    names = list(paths)
    first = next(iter(next(iter(scores.values())))) if scores and plan.scorers else None
    font = ImageFont.load_default()
    label_w, text_h, pad = 110, 14, 4
    width = label_w + len(cols) * (cell + pad) + pad
    height = pad + len(names) * (cell + text_h + pad) + text_h
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if first is not None:
        draw.text((2, 1), f"score: {first}", fill="black", font=font)
    for j, i in enumerate(cols):
        draw.text(
            (label_w + j * (cell + pad) + pad, 1), f"#{i} seed {plan.items[i][1]}", fill="black", font=font
        )
    for r, name in enumerate(names):
        y = text_h + pad + r * (cell + text_h + pad)
        draw.text((2, y + cell // 2), name[:18], fill="black", font=font)
        for j, i in enumerate(cols):
            x = label_w + j * (cell + pad) + pad
            with Image.open(paths[name][i]) as im:
                resample = Image.Resampling.NEAREST if im.width < cell else Image.Resampling.LANCZOS
                canvas.paste(im.convert("RGB").resize((cell, cell), resample), (x, y))
            if first is not None:
                draw.text(
                    (x, y + cell + 1),
                    f"{scores[name][first][i]:.3f}",
                    fill="black",
                    font=font,
                )
    canvas.save(path)
    return path


def write_html(
    path: Path,
    report: dict[str, Any],
    plan: EvalPlan,
    paths: dict[str, list[Path]],
    scores: dict[str, dict[str, np.ndarray]],
    figures: dict[str, str] | None = None,
) -> Path:
    """A self-contained report (images referenced relatively): settings, tables, the grid, per-item images."""
    e = html.escape
    names = list(paths)
    scorer_names = list(report["means"][names[0]])
    parts = [
        "<!doctype html><meta charset='utf-8'><title>workbench eval</title>",
        "<style>body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img.s{width:128px;image-rendering:pixelated}"
        "code{background:#f4f4f4}</style>",
        "<h1>Evaluation report</h1>",
        f"<p>Base <code>{e(plan.base)}</code>; prompt set <code>{e(plan.prompt_set)}</code> "
        f"({len(plan.prompts)} prompts) x {len(plan.seeds)} seeds = {len(plan.items)} fixed (prompt, seed) items; "
        f"sampler <code>{e(plan.sampling.sampler)}</code>, {plan.sampling.steps} steps, guidance "
        f"{plan.sampling.guidance}. Identical initial noise per (prompt, seed) for every checkpoint.</p>",
        "<h2>Mean score [95% t-interval]</h2><table><tr><th>checkpoint</th>"
        + "".join(f"<th>{e(s)}</th>" for s in scorer_names)
        + "</tr>",
    ]
    for c in names:
        parts.append(
            f"<tr><td>{e(c)}</td>"
            + "".join(f"<td>{Interval(**report['means'][c][s]).fmt()}</td>" for s in scorer_names)
            + "</tr>"
        )
    parts.append("</table>")
    if report.get("vs_base"):
        parts.append(
            "<h2>Against the base, paired per (prompt, seed)</h2><table><tr><th>checkpoint</th><th>scorer</th>"
            "<th>mean difference [95% bootstrap]</th><th>win rate [95% bootstrap]</th><th>[95% Wilson]</th>"
            "<th>wins / losses / ties</th><th>sign test p</th></tr>"
        )
        for c, per in report["vs_base"].items():
            for s, v in per.items():
                w = v["win_rate"]
                parts.append(
                    f"<tr><td>{e(c)}</td><td>{e(s)}</td><td>{_signed(Interval(**v['delta']), 3)}</td>"
                    f"<td>{Interval(**w['bootstrap']).fmt(2)}</td><td>{Interval(**w['wilson']).fmt(2)}</td>"
                    f"<td>{w['wins']} / {w['losses']} / {w['ties']}</td><td>{w['p_sign']:.2g}</td></tr>"
                )
        parts.append("</table><p>Win rate = wins / (wins + losses); exact ties are excluded.</p>")
    parts.append(
        "<h2>Grid</h2><p>Rows: checkpoints (base on top); columns: the same (prompt, seed).</p>"
        "<img src='grid.png' style='max-width:100%'>"
    )
    for title, rel in (figures or {}).items():
        parts.append(f"<h2>{e(title)}</h2><img src='{e(rel)}' style='max-width:100%'>")
    parts.append(
        f"<h2>Items (first {min(plan.html_items, len(plan.items))} of {len(plan.items)})</h2>"
        "<table><tr><th>#</th><th>prompt</th><th>seed</th>"
        + "".join(f"<th>{e(c)}</th>" for c in names)
        + "</tr>"
    )
    for i in _grid_items(len(plan.items), plan.html_items):
        p, s = plan.items[i]
        cells = []
        for c in names:
            rel = os.path.relpath(paths[c][i], path.parent)
            sc = "<br>".join(f"{e(n)} {scores[c][n][i]:.3f}" for n in scorer_names)
            cells.append(f"<td><img class='s' src='{e(rel)}'><br>{sc}</td>")
        parts.append(f"<tr><td>{i}</td><td>{e(p)}</td><td>{s}</td>{''.join(cells)}</tr>")
    parts.append("</table>")
    _write_text(path, "\n".join(parts))
    return path
