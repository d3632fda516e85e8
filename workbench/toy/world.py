"""The toy world: one flat shape on a flat background, captioned "a {size} {colour} {shape} on a {background} background".

Vocabulary: 3 shapes x 8 colours x 2 sizes x 3 backgrounds = 144 prompts. A fixed, documented split holds out 24 of
them (:data:`HELDOUT_PROMPTS`): they are never used for pretraining or preference data, so that held-out *prompts*
exist beside held-out seeds. Every held-out prompt's individual words are seen in training; only the combination is new.

Rendering is deterministic by seed: :func:`sample_scene` draws the scene parameters (size, position) from
``random.Random(seed)``, and :func:`render_scene` draws it with PIL at 4x supersampling and downsizes with a box
filter. Each rendered image comes with its :class:`Scene`, so tests and rewards can check what was drawn.

Geometry (all in image sides, origin top-left): ``side`` is the bounding-box side of the shape (a square and a circle
fill their box; the triangle is upright, apex at the top-centre), ``cx, cy`` the bounding-box centre. Sizes: "small"
is ``side ~ U(0.25, 0.40)``, "large" is ``side ~ U(0.55, 0.75)``; the centre is uniform over the positions that keep
the shape inside the image.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: colour name -> sRGB in [0, 1]. Pairwise RGB distances are >= 0.36 (orange/yellow is the closest pair) and every
#: colour is >= 0.36 from every background, so the rewards' foreground threshold (0.25) separates shape from background.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (1.00, 0.90, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.55, 0.15, 0.75),
    "pink": (1.00, 0.45, 0.75),
    "brown": (0.55, 0.30, 0.10),
}

BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
}

#: size word -> range of the bounding-box side, in image sides.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.25, 0.40),
    "large": (0.55, 0.75),
}

#: fill ratio (shape area / bounding-box area) of each shape; the shape reward compares against these.
FILL_RATIO: dict[str, float] = {"circle": float(np.pi / 4), "square": 1.0, "triangle": 0.5}

#: every word a prompt can use; the toy tokenizer makes each of them a single token.
VOCABULARY: tuple[str, ...] = (
    "a",
    "on",
    "background",
    *SIZES,
    *COLOURS,
    *SHAPES,
    *BACKGROUNDS,
)

SUPERSAMPLE = 4


@dataclass(frozen=True)
class Attributes:
    """What a prompt asks for."""

    size: str
    colour: str
    shape: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background"


@dataclass(frozen=True)
class Scene:
    """What an image shows: the prompt's attributes plus the drawn geometry (in image sides)."""

    size: str
    colour: str
    shape: str
    background: str
    side: float
    cx: float
    cy: float

    @property
    def attributes(self) -> Attributes:
        return Attributes(self.size, self.colour, self.shape, self.background)

    @property
    def prompt(self) -> str:
        return self.attributes.prompt

    def to_dict(self) -> dict[str, str | float]:
        return asdict(self)


def all_attributes() -> list[Attributes]:
    """All 144 attribute combinations in a fixed order (size, colour, shape, background nested in that order)."""
    return [Attributes(z, c, s, b) for z in SIZES for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def _is_heldout(a: Attributes) -> bool:
    # For each (colour, shape) exactly one of the 6 (size, background) cells is held out, chosen by a Latin-square-like
    # rule, so every colour (3x), shape (8x), size (12x) and background (8x) appears among the 24 held-out prompts.
    c, s = list(COLOURS).index(a.colour), SHAPES.index(a.shape)
    cell = list(SIZES).index(a.size) * len(BACKGROUNDS) + list(BACKGROUNDS).index(a.background)
    return cell == (c + 2 * s) % (len(SIZES) * len(BACKGROUNDS))


ALL_PROMPTS: tuple[str, ...] = tuple(a.prompt for a in all_attributes())
#: 24 prompts never used in pretraining or preference data.
HELDOUT_PROMPTS: tuple[str, ...] = tuple(a.prompt for a in all_attributes() if _is_heldout(a))
#: the 120 prompts pretraining and preference data draw from.
TRAIN_PROMPTS: tuple[str, ...] = tuple(a.prompt for a in all_attributes() if not _is_heldout(a))


#: 15 of the training prompts (every 8th) that the objective gym keeps out of every objective's preference data, to
#: choose recipes on; the held-out prompts then only report the final table. Pretraining did see them.
VAL_PROMPTS: tuple[str, ...] = TRAIN_PROMPTS[3::8]
#: the 105 training prompts the gym's preference data draws from (train minus val).
GYM_TRAIN_PROMPTS: tuple[str, ...] = tuple(p for p in TRAIN_PROMPTS if p not in VAL_PROMPTS)


def prompts(split: str = "train") -> tuple[str, ...]:
    """The prompts of a split: ``"train"`` (120), ``"heldout"`` (24), ``"all"`` (144), and for the objective gym
    ``"val"`` (15 of train) and ``"gym_train"`` (the other 105)."""
    table = {
        "train": TRAIN_PROMPTS,
        "heldout": HELDOUT_PROMPTS,
        "all": ALL_PROMPTS,
        "val": VAL_PROMPTS,
        "gym_train": GYM_TRAIN_PROMPTS,
    }
    if split not in table:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(table)}")
    return table[split]


_ALIASES = {"grey": "gray", "colour": "color"}


def parse_prompt(prompt: str) -> dict[str, str | None]:
    """The world attributes a prompt names: ``{"size", "colour", "shape", "background"}`` -> word or None.

    Lenient, so that free text degrades gracefully: the first size, colour and shape word found is taken, and the
    background is the background word right before "background". Absent attributes are None.
    """
    words = [_ALIASES.get(w, w) for w in prompt.lower().replace(",", " ").replace(".", " ").split()]
    background = None
    for i, w in enumerate(words):
        if w == "background" and i > 0 and words[i - 1] in BACKGROUNDS:
            background = words[i - 1]
            break

    def first(vocab: Collection[str]) -> str | None:
        return next((w for w in words if w in vocab), None)

    return {"size": first(SIZES), "colour": first(COLOURS), "shape": first(SHAPES), "background": background}


def attributes_of(prompt: str) -> Attributes:
    """The attributes of a world prompt; ``ValueError`` naming the missing part when the prompt is not one."""
    parsed = parse_prompt(prompt)
    missing = [k for k, v in parsed.items() if v is None]
    if missing:
        raise ValueError(
            f"{prompt!r} is not a toy-world prompt: no {', '.join(missing)} word found; expected "
            f"'a {{size}} {{colour}} {{shape}} on a {{background}} background' with size in {list(SIZES)}, colour in "
            f"{list(COLOURS)}, shape in {list(SHAPES)}, background in {list(BACKGROUNDS)}"
        )
    return Attributes(**{k: str(v) for k, v in parsed.items()})


def sample_scene(
    seed: int, prompt: str | None = None, *, split: str = "train", centred: bool = False
) -> Scene:
    """The scene for ``seed``: a uniform prompt of ``split`` unless ``prompt`` is given, a side drawn from the size
    word's range, and a uniform position that keeps the shape inside the image (the centre when ``centred``)."""
    rng = random.Random(seed)
    prompt = prompt if prompt is not None else rng.choice(prompts(split))
    a = attributes_of(prompt)
    lo, hi = SIZES[a.size]
    side = rng.uniform(lo, hi)
    half = side / 2
    cx, cy = rng.uniform(half, 1 - half), rng.uniform(half, 1 - half)
    if centred:
        cx = cy = 0.5
    return Scene(a.size, a.colour, a.shape, a.background, side, cx, cy)


def _rgb255(rgb: tuple[float, float, float]) -> tuple[int, int, int]:
    return (round(rgb[0] * 255), round(rgb[1] * 255), round(rgb[2] * 255))


def render_scene(scene: Scene, resolution: int = 32) -> Image.Image:
    """Draw ``scene`` (PIL at 4x supersampling, box-filtered down to ``resolution``)."""
    big = resolution * SUPERSAMPLE
    img = Image.new("RGB", (big, big), _rgb255(BACKGROUNDS[scene.background]))
    draw = ImageDraw.Draw(img)
    x0, y0 = (scene.cx - scene.side / 2) * big, (scene.cy - scene.side / 2) * big
    x1, y1 = (scene.cx + scene.side / 2) * big, (scene.cy + scene.side / 2) * big
    fill = _rgb255(COLOURS[scene.colour])
    if scene.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; known shapes: {', '.join(SHAPES)}")
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def to_array(images: Sequence[Image.Image]) -> np.ndarray:
    """PIL images -> float32 array ``[B, 3, H, W]`` in [0, 1]."""
    return np.stack([np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0 for im in images])


def render_batch(
    seeds: Sequence[int],
    prompts_: Sequence[str] | None = None,
    *,
    split: str = "train",
    resolution: int = 32,
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Render one image per seed (for ``prompts_[i]`` if given, else a random prompt of ``split``).

    Returns ``(images [B, 3, H, W] float32 in [0, 1], prompts, scenes)``.
    """
    if prompts_ is not None and len(prompts_) != len(seeds):
        raise ValueError(f"got {len(seeds)} seeds but {len(prompts_)} prompts")
    scenes = [
        sample_scene(seed, None if prompts_ is None else prompts_[i], split=split)
        for i, seed in enumerate(seeds)
    ]
    images = to_array([render_scene(s, resolution) for s in scenes])
    return images, [s.prompt for s in scenes], scenes


def render_centering_pairs(
    n: int,
    seed: int = 0,
    *,
    split: str = "train",
    min_offset: float = 0.15,
    resolution: int = 32,
) -> tuple[np.ndarray, np.ndarray, list[str], list[tuple[Scene, Scene]]]:
    """Off-policy preference pairs for the shape-centring taste (toyworld.md part 2, "off-policy render").

    Pair ``i``: a uniform prompt of ``split``; the winner draws it centred, the loser draws the same scene (same
    shape, colour, background and side) with its centre moved at least ``min_offset`` image sides away from the image
    centre (uniform over such positions that keep the shape inside). Sides follow the size word's range, i.e. what
    the pretrained base draws, so centring is the only difference the pair teaches. Deterministic in ``seed``.

    Returns ``(winners [n, 3, H, W], losers [n, 3, H, W], prompts, [(winner_scene, loser_scene)])``.
    """
    rng = random.Random(seed)
    winners, losers, prompts_, scenes = [], [], [], []
    for _ in range(n):
        base = sample_scene(rng.randrange(2**31), split=split, centred=True)
        half = base.side / 2
        for _attempt in range(1000):
            cx, cy = rng.uniform(half, 1 - half), rng.uniform(half, 1 - half)
            if ((cx - 0.5) ** 2 + (cy - 0.5) ** 2) ** 0.5 >= min_offset:
                break
        else:  # a side so large that no off-centre position exists: push to a corner
            cx = cy = half
        loser = replace(base, cx=cx, cy=cy)
        winners.append(render_scene(base, resolution))
        losers.append(render_scene(loser, resolution))
        prompts_.append(base.prompt)
        scenes.append((base, loser))
    return to_array(winners), to_array(losers), prompts_, scenes


def grid(images: np.ndarray, ncol: int = 8, pad: int = 2) -> Image.Image:
    """A grid PNG of ``[B, 3, H, W]`` images in [0, 1] (white padding)."""
    b, _, h, w = images.shape
    nrow = (b + ncol - 1) // ncol
    canvas = np.ones((3, nrow * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.float32)
    for i in range(b):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[:, y : y + h, x : x + w] = images[i]
    return Image.fromarray((canvas.transpose(1, 2, 0).clip(0, 1) * 255).round().astype(np.uint8))


def to_pil(image: np.ndarray) -> Image.Image:
    """One ``[3, H, W]`` image in [0, 1] -> PIL."""
    return Image.fromarray((image.transpose(1, 2, 0).clip(0, 1) * 255).round().astype(np.uint8))
