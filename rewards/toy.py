"""Ground-truth analytic rewards for the toy world (:mod:`workbench.toy.world`), each in [0, 1], batched.

Every reward reads the image through one analysis (:func:`analyse`), the part-1/part-2 prototype recipe of
``research/toyworld.md``:

* background estimate ``bg`` = per-channel median of the border pixels (the outermost ring);
* foreground = pixels whose RGB distance to ``bg`` exceeds ``FG_THRESHOLD`` = 0.25;
* foreground colour ``fg`` = per-channel median of the foreground pixels;
* bounding box of the foreground: ``side`` = max(box height, box width) / image side, centre ``(cx, cy)`` in image
  sides; ``fill`` = foreground area / box area.

Prompt fidelity (the prompt names the target; see :func:`workbench.toy.world.parse_prompt`):

* ``toy/colour``      = exp(-(||fg - colour(prompt)|| / 0.2)^2)
* ``toy/shape``       = exp(-((fill - fill(shape(prompt))) / 0.12)^2), with the fill ratios that rendered 32 px shapes
  measure (:data:`SHAPE_FILL`: circle 0.78, square 1.0, triangle 0.55; geometry gives pi/4, 1, 1/2, and the edge
  pixels that pass the threshold add a little)
* ``toy/size``        = exp(-(gap / 0.08)^2), gap = distance from ``side`` to the size word's range
  (small [0.25, 0.40], large [0.55, 0.75]) widened by one pixel on each side (a box of pixels rounds outwards)
* ``toy/background``  = exp(-(||bg - background(prompt)|| / 0.25)^2)
* ``toy/fidelity``    = 0.4 colour + 0.2 shape + 0.2 size + 0.2 background (colour is the hardest attribute, as in
  the prototype's 0.5/0.25/0.25 weighting), averaged over the attributes the prompt names (weights renormalised).

A sub-reward whose attribute the prompt does not name is 0 (nothing was asked, nothing can match); ``toy/fidelity`` of
a prompt naming no world attribute is 0. Images with no foreground score 0 on colour, shape, size and centring.

Prompt-independent "taste" rewards (they mimic aesthetic preferences; the prompt is ignored):

* ``toy/centering``   = exp(-(d / 0.1)^2), d = distance from the box centre to the image centre in image sides
  (toyworld.md part 2; the demo's target)
* ``toy/saturation``  = HSV saturation of ``fg``, (max - min) / max (vivid colours score high; the world's pink is 0.55)
* ``toy/clean_background`` = exp(-(dev / 0.05)^2), dev = mean RGB distance to ``bg`` over background pixels
  not next to the foreground (the foreground dilated by one pixel is excluded, so anti-aliased edges do not count);
  a flat background scores 1, texture, noise or faint blobs lower it

Differentiability: medians pass gradients to the selected pixel, so colour, background, saturation and clean
background are differentiable in the images; the box-based rewards (shape, size, centring) are not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rewards.base import SCORERS, Scorer
from workbench.toy.world import BACKGROUNDS, COLOURS, SHAPES, SIZES, parse_prompt

FG_THRESHOLD = 0.25
#: fill ratio (foreground area / box area) that each shape measures when rendered at 32 px (2,000 world images:
#: circle mean 0.775, square 0.997, triangle 0.554).
SHAPE_FILL: dict[str, float] = {"circle": 0.78, "square": 1.0, "triangle": 0.55}
FIDELITY_WEIGHTS: dict[str, float] = {"colour": 0.4, "shape": 0.2, "size": 0.2, "background": 0.2}


@dataclass
class Analysis:
    """Per-image measurements, each a tensor ``[B]`` (or ``[B, 3]`` for colours); NaN where there is no foreground."""

    bg: torch.Tensor  # [B, 3] background colour estimate
    fg: torch.Tensor  # [B, 3] foreground colour estimate (NaN without foreground)
    fg_frac: torch.Tensor  # [B] foreground pixels / all pixels
    side: torch.Tensor  # [B] bounding-box side in image sides
    cx: torch.Tensor  # [B] bounding-box centre, x, in image sides
    cy: torch.Tensor  # [B] bounding-box centre, y
    fill: torch.Tensor  # [B] foreground area / bounding-box area
    bg_dev: torch.Tensor  # [B] mean distance to bg over background pixels not touching the foreground
    resolution: int


def analyse(images: torch.Tensor) -> Analysis:
    """Measure ``images`` ``[B, 3, H, W]`` in [0, 1] (see the module docstring)."""
    x = images.float().clamp(0, 1)
    b, _, h, w = x.shape
    border = torch.cat(
        [x[:, :, 0, :], x[:, :, -1, :], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=2
    )  # [B, 3, 2W + 2H - 4]
    bg = border.median(dim=2).values  # [B, 3]
    dist = (x - bg[:, :, None, None]).norm(dim=1)  # [B, H, W]
    fg_mask = dist > FG_THRESHOLD  # [B, H, W]
    n_fg = fg_mask.flatten(1).sum(1)  # [B]
    pixels = x.flatten(2)  # [B, 3, H*W]
    fg = pixels.masked_fill(~fg_mask.flatten(1)[:, None, :], float("nan")).nanmedian(dim=2).values  # [B, 3]
    near_fg = torch.nn.functional.max_pool2d(fg_mask[:, None].float(), 3, stride=1, padding=1)[:, 0]
    bg_pixels = 1.0 - near_fg  # [B, H, W], background pixels not touching the foreground
    bg_dev = (dist * bg_pixels).flatten(1).sum(1) / bg_pixels.flatten(1).sum(1).clamp_min(1)

    rows, cols = fg_mask.any(dim=2), fg_mask.any(dim=1)  # [B, H], [B, W]
    iy = torch.arange(h, device=x.device)
    ix = torch.arange(w, device=x.device)
    y0 = torch.where(rows, iy, h).min(1).values
    y1 = torch.where(rows, iy, -1).max(1).values
    x0 = torch.where(cols, ix, w).min(1).values
    x1 = torch.where(cols, ix, -1).max(1).values
    box_h, box_w = (y1 - y0 + 1).float(), (x1 - x0 + 1).float()
    has_fg = n_fg > 0
    nan = torch.full((b,), float("nan"), device=x.device)
    side = torch.where(has_fg, torch.maximum(box_h / h, box_w / w), nan)
    cx = torch.where(has_fg, (x0 + x1 + 1).float() / 2 / w, nan)
    cy = torch.where(has_fg, (y0 + y1 + 1).float() / 2 / h, nan)
    fill = torch.where(has_fg, n_fg.float() / (box_h * box_w).clamp_min(1), nan)
    return Analysis(bg, fg, n_fg.float() / (h * w), side, cx, cy, fill, bg_dev, resolution=h)


def _table(
    names: Sequence[str], table: dict[str, tuple[float, float, float]], like: torch.Tensor
) -> torch.Tensor:
    return torch.tensor([table[n] for n in names], dtype=torch.float32, device=like.device)


def _gauss(err: torch.Tensor, scale: float) -> torch.Tensor:
    """exp(-(err/scale)^2), with NaN (nothing measured) -> 0."""
    return torch.nan_to_num(torch.exp(-((err / scale) ** 2)), nan=0.0)


def _per_prompt(prompts: Sequence[str], key: str) -> list[str | None]:
    return [parse_prompt(p)[key] for p in prompts]


def _masked(values: torch.Tensor, present: Sequence[bool]) -> torch.Tensor:
    return values * torch.tensor(present, dtype=values.dtype, device=values.device)


def colour_reward(a: Analysis, prompts: Sequence[str]) -> torch.Tensor:
    names = _per_prompt(prompts, "colour")
    target = _table([n or "red" for n in names], COLOURS, a.fg)
    return _masked(_gauss((a.fg - target).norm(dim=1), 0.2), [n is not None for n in names])


def shape_reward(a: Analysis, prompts: Sequence[str]) -> torch.Tensor:
    names = _per_prompt(prompts, "shape")
    target = torch.tensor([SHAPE_FILL[n or "square"] for n in names], device=a.fill.device)
    return _masked(_gauss(a.fill - target, 0.12), [n is not None for n in names])


def size_reward(a: Analysis, prompts: Sequence[str]) -> torch.Tensor:
    names = _per_prompt(prompts, "size")
    px = 1.0 / a.resolution
    lo = torch.tensor([SIZES[n or "small"][0] - px for n in names], device=a.side.device)
    hi = torch.tensor([SIZES[n or "small"][1] + px for n in names], device=a.side.device)
    gap = torch.clamp_min(torch.maximum(lo - a.side, a.side - hi), 0.0)
    return _masked(_gauss(gap, 0.08), [n is not None for n in names])


def background_reward(a: Analysis, prompts: Sequence[str]) -> torch.Tensor:
    names = _per_prompt(prompts, "background")
    target = _table([n or "white" for n in names], BACKGROUNDS, a.bg)
    return _masked(_gauss((a.bg - target).norm(dim=1), 0.25), [n is not None for n in names])


def fidelity_reward(a: Analysis, prompts: Sequence[str]) -> torch.Tensor:
    parts = {
        "colour": colour_reward(a, prompts),
        "shape": shape_reward(a, prompts),
        "size": size_reward(a, prompts),
        "background": background_reward(a, prompts),
    }
    parsed = [parse_prompt(p) for p in prompts]
    weights = torch.tensor(
        [[FIDELITY_WEIGHTS[k] * (q[k] is not None) for k in parts] for q in parsed], device=a.bg.device
    )  # [B, 4]
    total = torch.stack(list(parts.values()), dim=1)  # [B, 4]
    return (weights * total).sum(1) / weights.sum(1).clamp_min(1e-8)


def centering_reward(a: Analysis) -> torch.Tensor:
    d = torch.sqrt((a.cx - 0.5) ** 2 + (a.cy - 0.5) ** 2)
    return _gauss(d, 0.1)


def saturation_reward(a: Analysis) -> torch.Tensor:
    mx, mn = a.fg.max(dim=1).values, a.fg.min(dim=1).values
    return torch.nan_to_num((mx - mn) / mx.clamp_min(1e-6), nan=0.0)


def clean_background_reward(a: Analysis) -> torch.Tensor:
    return _gauss(a.bg_dev, 0.05)


# ---------------------------------------------------------------------------------------------------------------
# Hard labels: what a person would say the image shows (used for accuracy tables and the model card).


def classify(images: torch.Tensor) -> list[dict[str, str | None]]:
    """Hard attribute labels per image: nearest palette colour of ``fg``, nearest fill ratio, size by the midpoint
    (0.475) of the two size ranges, nearest background colour. None where there is no foreground."""
    a = analyse(images)
    colours = torch.tensor(list(COLOURS.values()))
    bgs = torch.tensor(list(BACKGROUNDS.values()))
    fills = torch.tensor([SHAPE_FILL[s] for s in SHAPES])
    mid = (SIZES["small"][1] + SIZES["large"][0]) / 2
    out: list[dict[str, str | None]] = []
    for i in range(images.shape[0]):
        has_fg = bool(torch.isfinite(a.fg[i]).all())
        out.append(
            {
                "colour": list(COLOURS)[int((colours - a.fg[i].cpu()).norm(dim=1).argmin())]
                if has_fg
                else None,
                "shape": SHAPES[int((fills - a.fill[i].cpu()).abs().argmin())] if has_fg else None,
                "size": ("small" if float(a.side[i]) < mid else "large") if has_fg else None,
                "background": list(BACKGROUNDS)[int((bgs - a.bg[i].cpu()).norm(dim=1).argmin())],
            }
        )
    return out


def adherence(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Accuracy of each attribute's hard label against the prompt, the all-four-correct rate, and the mean rewards."""
    labels = classify(images)
    parsed = [parse_prompt(p) for p in prompts]
    keys = ("colour", "shape", "size", "background")
    hits = {k: [lab[k] == q[k] for lab, q in zip(labels, parsed)] for k in keys}
    n = max(len(prompts), 1)
    out = {f"acc/{k}": sum(v) / n for k, v in hits.items()}
    out["acc/all"] = sum(all(hits[k][i] for k in keys) for i in range(len(prompts))) / n
    a = analyse(images)
    for name, value in (
        ("fidelity", fidelity_reward(a, prompts)),
        ("centering", centering_reward(a)),
        ("saturation", saturation_reward(a)),
        ("clean_background", clean_background_reward(a)),
    ):
        out[f"reward/{name}"] = float(value.mean())
    return out


# ---------------------------------------------------------------------------------------------------------------
# Registered scorers.


class _ToyScorer(Scorer):
    differentiable = False
    supports_grad = False

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.reward(analyse(images), prompts).clamp(0, 1)

    def reward(self, a: Analysis, prompts: Sequence[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@SCORERS.register("toy/colour")
class ToyColour(_ToyScorer):
    description = (
        "toy world: foreground colour matches the prompt's colour word, exp(-(dist/0.2)^2), in [0, 1]"
    )
    differentiable = True
    supports_grad = True

    def reward(self, a: Analysis, prompts: Sequence[str]) -> torch.Tensor:
        return colour_reward(a, prompts)


@SCORERS.register("toy/shape")
class ToyShape(_ToyScorer):
    description = "toy world: fill ratio matches the prompt's shape (circle/square/triangle), in [0, 1]"

    def reward(self, a: Analysis, prompts: Sequence[str]) -> torch.Tensor:
        return shape_reward(a, prompts)


@SCORERS.register("toy/size")
class ToySize(_ToyScorer):
    description = "toy world: bounding-box side within the prompt's size range (small/large), in [0, 1]"

    def reward(self, a: Analysis, prompts: Sequence[str]) -> torch.Tensor:
        return size_reward(a, prompts)


@SCORERS.register("toy/background")
class ToyBackground(_ToyScorer):
    description = (
        "toy world: border colour matches the prompt's background word, exp(-(dist/0.25)^2), in [0, 1]"
    )
    differentiable = True
    supports_grad = True

    def reward(self, a: Analysis, prompts: Sequence[str]) -> torch.Tensor:
        return background_reward(a, prompts)


@SCORERS.register("toy/fidelity")
class ToyFidelity(_ToyScorer):
    description = "toy world prompt fidelity: 0.4 colour + 0.2 shape + 0.2 size + 0.2 background, in [0, 1]"

    def reward(self, a: Analysis, prompts: Sequence[str]) -> torch.Tensor:
        return fidelity_reward(a, prompts)


@SCORERS.register("toy/centering")
class ToyCentering(_ToyScorer):
    needs_prompt = False
    description = (
        "toy world taste (prompt-independent): shape centred, exp(-(centre offset/0.1)^2), in [0, 1]"
    )

    def reward(self, a: Analysis, prompts: Sequence[str]) -> torch.Tensor:
        return centering_reward(a)


@SCORERS.register("toy/saturation")
class ToySaturation(_ToyScorer):
    description = "toy world taste (prompt-independent): HSV saturation of the shape's colour, in [0, 1]"
    needs_prompt = False
    differentiable = True
    supports_grad = True

    def reward(self, a: Analysis, prompts: Sequence[str]) -> torch.Tensor:
        return saturation_reward(a)


@SCORERS.register("toy/clean_background")
class ToyCleanBackground(_ToyScorer):
    needs_prompt = False
    description = (
        "toy world taste (prompt-independent): flat background, exp(-(mean bg deviation/0.05)^2), in [0, 1]"
    )
    differentiable = True
    supports_grad = True

    def reward(self, a: Analysis, prompts: Sequence[str]) -> torch.Tensor:
        return clean_background_reward(a)
