"""Evaluation reports: the plain-text tables, the grid PNG and the HTML report, from a summary
(:func:`workbench.stats.summarise`) and the images. Prompt-clustered figures come first and say so; the per-item
figures (seeds treated as independent) follow as a secondary table."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.stats import PER_ITEM, Interval

if TYPE_CHECKING:
    from workbench.evaluation import EvalPlan


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (a temporary file renamed over ``path``)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _iv(d: dict[str, Any]) -> Interval:
    return Interval(**d)


def _p(p: float) -> str:
    return f"{p:.2g}"


def _wlt(w: dict[str, Any]) -> str:
    return f"{w['wins']}/{w['losses']}/{w['ties']}"


def _clustered(summary: dict[str, Any]) -> bool:
    return summary.get("clustered_by") == "prompt"


def mean_label(summary: dict[str, Any]) -> str:
    return "95% CI, prompt-clustered" if _clustered(summary) else "95% CI, items independent"


def vs_base_title(summary: dict[str, Any]) -> str:
    """One line saying what the against-the-base figures resample."""
    if _clustered(summary):
        return (
            f"against the base, prompt-clustered ({summary['n_prompts']} prompts, {summary['n_items']} items: "
            "intervals resample prompts with all their seeds)"
        )
    return f"against the base, {PER_ITEM} (no prompt labels; {summary.get('n_items', '?')} items)"


def vs_base_rows(summary: dict[str, Any], *, digits: int = 3) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the primary (prompt-clustered) comparison table."""
    head = [
        "checkpoint",
        "scorer",
        "delta vs base [95% CI]",
        "per-prompt win rate [95% CI]",
        "prompts W/L/T",
        "sign test p (prompts)",
        "per-item win rate [95% CI]",
        "items W/L/T",
    ]
    rows = []
    for c, per in (summary.get("vs_base") or {}).items():
        for s, v in per.items():
            pw, iw = v["prompt_win_rate"], v["item_win_rate"]
            rows.append(
                [
                    c,
                    s,
                    _iv(v["delta"]).fmt(digits, sign=True),
                    _iv(pw["bootstrap"]).fmt(2),
                    _wlt(pw),
                    _p(pw["p_sign"]),
                    _iv(iw["bootstrap"]).fmt(2),
                    _wlt(iw),
                ]
            )
    return head, rows


def per_item_rows(summary: dict[str, Any], *, digits: int = 3) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the secondary table: every item independent (too narrow for claims about prompts)."""
    head = [
        "checkpoint",
        "scorer",
        "delta vs base [95% item bootstrap]",
        "win rate [95% item bootstrap]",
        "win rate [95% Wilson]",
        "sign test p (items)",
    ]
    rows = []
    for c, per in (summary.get("vs_base") or {}).items():
        for s, v in per.items():
            w = v["per_item"]["win_rate"]
            rows.append(
                [
                    c,
                    s,
                    _iv(v["per_item"]["delta"]).fmt(digits, sign=True),
                    _iv(w["bootstrap"]).fmt(2),
                    _iv(w["wilson"]).fmt(2),
                    _p(w["p_sign"]),
                ]
            )
    return head, rows


def format_table(summary: dict[str, Any], *, digits: int = 3) -> str:
    """Plain-text tables: means with 95% intervals; each checkpoint vs the base, prompt-clustered (mean difference,
    per-prompt win rate and sign test, per-item win rate); then the same per item, seeds treated as independent."""
    means = summary["means"]
    scorer_names = list(next(iter(means.values())))
    label = mean_label(summary)
    out = [
        _text_table(
            ["checkpoint", *[f"{s} mean [{label}]" for s in scorer_names]],
            [[c, *[_iv(means[c][s]).fmt(digits) for s in scorer_names]] for c in means],
        )
    ]
    if summary.get("vs_base"):
        out.append(vs_base_title(summary) + "\n" + _text_table(*vs_base_rows(summary, digits=digits)))
        if _clustered(summary):
            out.append(
                f"{PER_ITEM} (secondary: too narrow for claims about prompts)\n"
                + _text_table(*per_item_rows(summary, digits=digits))
            )
    if summary.get("note"):
        out.append(f"note: {summary['note']}")
    return "\n\n".join(out)


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*["-" * w for w in widths]), *(fmt.format(*r) for r in rows)]
    return "\n".join(line.rstrip() for line in lines)


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    return (
        "<table><tr>"
        + "".join(f"<th>{e(h)}</th>" for h in head)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{e(x)}</td>" for x in r) + "</tr>" for r in rows)
        + "</table>"
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
                draw.text((x, y + cell + 1), f"{scores[name][first][i]:.3f}", fill="black", font=font)
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
        f"<h2>Mean score [{e(mean_label(report))}]</h2>",
        _html_table(
            ["checkpoint", *scorer_names],
            [[c, *[_iv(report["means"][c][s]).fmt() for s in scorer_names]] for c in names],
        ),
    ]
    if report.get("note"):
        parts.append(f"<p><b>Note:</b> {e(report['note'])}</p>")
    if report.get("vs_base"):
        title = vs_base_title(report)
        parts += [f"<h2>{e(title[:1].upper() + title[1:])}</h2>", _html_table(*vs_base_rows(report))]
        if _clustered(report):
            parts += [
                "<p>The seeds of one prompt are correlated, so the prompt is the unit of replication: intervals "
                "come from a paired bootstrap that resamples prompts with all their seeds. A prompt is won when its "
                "mean difference over its seeds is above 0; per-prompt win rate = won / (won + lost), ties "
                "excluded; the sign test is exact on the per-prompt outcomes. The per-item win rate counts "
                "(prompt, seed) items, exact ties excluded, with the same prompt-resampling interval.</p>",
                f"<h2>Secondary: {e(PER_ITEM)}</h2>",
                _html_table(*per_item_rows(report)),
                "<p>These treat every (prompt, seed) item as independent and are too narrow for claims about "
                "prompts; shown for comparison only.</p>",
            ]
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
    write_text(path, "\n".join(parts))
    return path
