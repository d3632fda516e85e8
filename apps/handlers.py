"""What the app's buttons do, as plain typed functions: no Gradio in this module, so tests call them directly.

The UI (:mod:`apps.app`) keeps one :class:`AppContext` (settings, the vote store, the renderer, scorers) and per
browser session an :class:`ArenaState` / :class:`CurateState`; every handler takes them plus the user's inputs and
returns plain values (images as ``H x W x 3`` uint8 arrays, messages as strings).

Generation is the workbench's own: :func:`samplers.generate_images` through the generation cache, pipelines from
:func:`samplers.load_pipeline_for`, the samplers' noise rule (the same prompt and seed start from the same noise for
every checkpoint), scorers from :func:`rewards.build_scorer`. User input is validated here with messages that say
what to change (:class:`InputError`); the UI shows them instead of failing.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from apps.metadata import IMAGE_SUFFIXES, read_metadata
from apps.store import Round, StoreError, Vote, VoteStore, new_id
from samplers import (
    SAMPLERS,
    ImageCache,
    SamplingConfig,
    fingerprint,
    from_uint8,
    generate_images,
    load_image,
    load_pipeline_for,
    model_id,
    noise_seed,
    parse_checkpoints,
    png_bytes,
    save_png,
)

ProgressFn = Callable[[float, str], None]


class InputError(ValueError):
    """User input the app refuses, with the fix in the message (shown in the UI)."""


# ------------------------------------------------------------------------------------------------------ settings
@dataclass
class AppSettings:
    base: str = "toy"  # diffusers folder, hub id or single file; 'toy' = the committed toy pipeline
    checkpoints: list[str] = field(default_factory=lambda: ["base"])  # specs as `workbench generate -c` takes
    runs_dir: str | None = "runs"  # training runs found here are offered too (final + every step)
    scorers: list[str] = field(default_factory=lambda: ["toy/fidelity", "toy/centering"])
    prompt_sets: list[str] = field(default_factory=lambda: ["toy:heldout", "toy:train", "parti"])
    sampler: str = "euler"
    steps: int = 10
    guidance: float = 5.0
    height: int | None = None
    width: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    db: str = "runs/app/votes.sqlite"
    cache_dir: str | None = None  # generation cache (default $WORKBENCH_CACHE/generations)
    export_dir: str | None = None  # default: exports/ beside the database
    curate_root: str | None = None  # when set, curated folders must lie inside it
    checkpoint_root: str | None = None  # when set, checkpoints added in the app must lie inside it
    max_prompt_chars: int = 500
    max_seeds: int = 16
    max_steps: int = 200
    max_curate_images: int = 2000
    personal_embedder: str | None = None  # scorer spec with encode_images; its top PCs join personal features
    personal_config: str | None = (
        None  # the personal fine-tune's training YAML (default: configs/toy/dpo.yaml, toy only)
    )
    seed: int | None = None  # the app's own draws (prompts, seeds, shuffles); None = fresh each launch


# ------------------------------------------------------------------------------------------------------ renderer
class Renderer(Protocol):
    """Images for (checkpoint name, prompts, seeds, sampling settings); what the app generates with."""

    def names(self) -> list[str]: ...

    def identity(self, name: str) -> dict[str, Any]: ...

    def render(
        self,
        name: str,
        prompts: Sequence[str],
        seeds: Sequence[int],
        cfg: Any,
        progress: ProgressFn | None = None,
    ) -> list[np.ndarray]: ...


class PipelineRenderer:
    """The workbench's generation: base + checkpoint pipelines (loaded on first use, kept resident), the
    generation cache, the samplers' noise rule. One generation at a time (a lock: pipelines are not re-entrant)."""

    def __init__(
        self, base: str, checkpoints: Sequence[Any], *, device: str, dtype: str, cache_dir: str | None
    ):
        from workbench.commands.generate import device_and_dtype, resolve_base

        self.base = resolve_base(base)
        self.device, self.dtype = device_and_dtype(device, dtype)
        self.checkpoints = {c.name: c for c in checkpoints}
        self.cache = ImageCache(cache_dir)
        self._pipes: dict[str, Any] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self.checkpoints)

    def add(self, checkpoint: Any) -> None:
        with self._lock:
            self.checkpoints[checkpoint.name] = checkpoint

    def _checkpoint(self, name: str) -> Any:
        if name not in self.checkpoints:
            raise InputError(
                f"checkpoint {name!r} is not loaded; choose one of {', '.join(self.checkpoints)}"
            )
        return self.checkpoints[name]

    def identity(self, name: str) -> dict[str, Any]:
        ckpt = self._checkpoint(name)
        return {
            "checkpoint": ckpt.name,
            "checkpoint_path": ckpt.path,
            "checkpoint_hash": "base" if ckpt.path is None else fingerprint(ckpt.path),
            "base": self.base,
            "base_hash": fingerprint(self.base),
            "model_id": model_id(self.base, ckpt, dtype=self.dtype, device=self.device),
        }

    def _load(self, name: str) -> Any:
        if name not in self._pipes:
            from workbench.models import DTYPES

            self._pipes[name] = load_pipeline_for(
                self.base, self._checkpoint(name), device=self.device, dtype=DTYPES[self.dtype]
            )
        return self._pipes[name]

    def render(
        self,
        name: str,
        prompts: Sequence[str],
        seeds: Sequence[int],
        cfg: Any,
        progress: ProgressFn | None = None,
    ) -> list[np.ndarray]:
        ident = self.identity(name)
        out: list[np.ndarray | None] = [None] * len(prompts)
        with self._lock:
            done = 0
            for idx, images in generate_images(
                lambda: self._load(name),
                prompts,
                seeds,
                cfg,
                batch_size=16,
                cache=self.cache,
                model_id=ident["model_id"],
                desc=None,
            ):
                for i, image in zip(idx, images):
                    out[i] = image
                done += len(idx)
                if progress is not None:
                    progress(done / len(prompts), f"{name}: {done}/{len(prompts)} images")
        return [x for x in out if x is not None]


def discover_checkpoints(runs_dir: str | Path | None) -> list[str]:
    """``NAME=PATH`` specs for the training runs under ``runs_dir``: each run's ``final`` and every saved step
    (``runs/x/final`` -> ``x``, ``runs/x/checkpoints/step_000200`` -> ``x@200``), also one level deeper
    (the demo's ``runs/demo/train`` -> ``demo``)."""
    if runs_dir is None or not Path(runs_dir).is_dir():
        return []
    specs: list[str] = []
    root = Path(runs_dir)
    run_dirs = sorted({p.parent for p in root.glob("*/final")} | {p.parent for p in root.glob("*/*/final")})
    run_dirs += sorted(
        {p.parent for p in root.glob("*/checkpoints")}
        | {p.parent for p in root.glob("*/*/checkpoints")} - set(run_dirs)
    )
    for run in run_dirs:
        name = str(run.relative_to(root)).removesuffix("/train")  # the demo's runs/demo/train -> demo
        if (run / "final" / "COMPLETE").exists() or any((run / "final").glob("*")):
            specs.append(f"{name}={run / 'final'}")
        for step in sorted((run / "checkpoints").glob("step_*")):
            if step.is_dir():
                specs.append(f"{name}@{int(step.name.split('_')[-1])}={step}")
    return specs


# ------------------------------------------------------------------------------------------------------- context
class AppContext:
    """What all sessions share: settings, the store, the renderer, built scorers, prompt sets."""

    def __init__(
        self, settings: AppSettings, *, renderer: Renderer | None = None, store: VoteStore | None = None
    ):
        self.settings = settings
        self.store = store or VoteStore(settings.db)
        if renderer is None:
            specs = list(dict.fromkeys([*settings.checkpoints, *discover_checkpoints(settings.runs_dir)]))
            renderer = PipelineRenderer(
                settings.base,
                parse_checkpoints(specs),
                device=settings.device,
                dtype=settings.dtype,
                cache_dir=settings.cache_dir,
            )
        self.renderer = renderer
        self.rng = random.Random(settings.seed)
        self._scorers: dict[str, Any] = {}
        self._prompts: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    @property
    def export_dir(self) -> Path:
        return Path(self.settings.export_dir or Path(self.settings.db).parent / "exports")

    def scorer(self, spec: str) -> Any:
        with self._lock:
            if spec not in self._scorers:
                from rewards import build_scorer, parse_scorer_spec

                name, options = parse_scorer_spec(spec)
                self._scorers[spec] = build_scorer(name, **options)
            return self._scorers[spec]

    def prompts(self, spec: str) -> list[str]:
        if spec not in self._prompts:
            from workbench.prompts import load_prompts

            try:
                self._prompts[spec] = load_prompts(spec)
            except (ValueError, OSError) as exc:
                raise InputError(f"prompt set {spec!r}: {exc}") from None
        return self._prompts[spec]

    def draw(self, fn: Callable[[random.Random], Any]) -> Any:
        with self._lock:
            return fn(self.rng)


def add_checkpoint(ctx: AppContext, spec: str | None) -> str:
    """Offer one more checkpoint (``[NAME=]PATH``: a LoRA folder, a kohya ``.safetensors``, a UNet folder, a
    training run or one of its steps); returns its name."""
    text = (spec or "").strip()
    if not text:
        raise InputError(
            "type a checkpoint as NAME=PATH (LoRA folder, kohya .safetensors, UNet folder or run)"
        )
    add = getattr(ctx.renderer, "add", None)
    if add is None:
        raise InputError("this app's renderer takes no new checkpoints")
    try:
        (ckpt,) = parse_checkpoints([text])
    except (ValueError, FileNotFoundError) as exc:
        raise InputError(str(exc)) from None
    if ctx.settings.checkpoint_root is not None:
        for path in (ckpt.path, ckpt.negative):
            if path is not None:
                _check_inside(Path(path), ctx.settings.checkpoint_root)
    if ckpt.name in ctx.renderer.names():
        raise InputError(f"a checkpoint named {ckpt.name!r} is already there; name this one as NAME=PATH")
    add(ckpt)
    return ckpt.name


def _check_inside(path: Path, root: str) -> None:
    """``path`` (a file or a folder and every file in it) lies inside ``root`` once symlinks are resolved."""
    allowed = Path(root).expanduser().resolve()
    files = [path, *path.rglob("*")] if path.is_dir() else [path]
    outside = [f for f in files if not f.resolve().is_relative_to(allowed)]
    if outside:
        raise InputError(
            f"checkpoint {outside[0]} is outside the allowed root {root} (--checkpoint-root); copy it there"
        )


# ---------------------------------------------------------------------------------------------------- validation
def check_user(name: str | None, auth_user: str | None = None) -> str:
    """The voter: the authenticated user when auth is on (a typed name cannot override it), else the typed name."""
    if auth_user:
        return auth_user
    name = (name or "").strip()
    if not name:
        raise InputError(
            "enter your name (or a pseudonym) in 'user' before voting; votes are stored per user"
        )
    if len(name) > 64 or any(c in name for c in "\n\r\t"):
        raise InputError("user name: at most 64 characters on one line")
    return name


def check_prompt(ctx: AppContext, prompt: str | None, prompt_set: str | None = None) -> str:
    """A typed prompt, or one drawn from ``prompt_set`` when the box is empty."""
    text = (prompt or "").strip()
    if not text:
        if not prompt_set:
            raise InputError("type a prompt or choose a prompt set to draw from")
        pool = ctx.prompts(prompt_set)
        text = ctx.draw(lambda r: r.choice(pool))
    limit = ctx.settings.max_prompt_chars
    if len(text) > limit:
        raise InputError(
            f"prompt is {len(text)} characters; the limit is {limit} (AppSettings.max_prompt_chars)"
        )
    return text


def check_seeds(ctx: AppContext, text: str | None) -> list[int]:
    from workbench.commands.generate import parse_seeds

    try:
        seeds = parse_seeds(str(text or ""))
    except ValueError as exc:
        raise InputError(str(exc).replace("--seeds: ", "seeds: ")) from None
    if any(s < 0 or s >= 2**63 for s in seeds):
        raise InputError("seeds must be between 0 and 2**63 - 1")
    if len(seeds) > ctx.settings.max_seeds:
        raise InputError(f"{len(seeds)} seeds; at most {ctx.settings.max_seeds} per view")
    return seeds


def check_k(k: Any) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise InputError(f"images per round must be 2 or 4, got {k!r}") from None
    if k not in (2, 4):
        raise InputError(f"images per round must be 2 or 4, got {k}")
    return k


def sampling(ctx: AppContext, sampler: str | None, steps: Any, guidance: Any) -> Any:
    s = ctx.settings
    name = sampler or s.sampler
    if name not in SAMPLERS:
        raise InputError(f"sampler {name!r} unknown; use one of {', '.join(SAMPLERS)}")
    try:
        n_steps = int(steps if steps is not None else s.steps)
        cfg_scale = float(guidance if guidance is not None else s.guidance)
    except (TypeError, ValueError):
        raise InputError("steps must be a whole number and guidance a number") from None
    if not 1 <= n_steps <= s.max_steps:
        raise InputError(f"steps must be between 1 and {s.max_steps}, got {n_steps}")
    if not 0 <= cfg_scale <= 30:
        raise InputError(f"guidance must be between 0 and 30, got {cfg_scale}")
    return SamplingConfig(sampler=name, steps=n_steps, guidance=cfg_scale, height=s.height, width=s.width)


def generation_params(
    ctx: AppContext, checkpoint: str, prompt: str, seed: int, cfg: Any, image: np.ndarray
) -> dict[str, Any]:
    """What identifies a generated image: checkpoint and its fingerprint, seed, sampler, steps, guidance, size."""
    return {
        **ctx.renderer.identity(checkpoint),
        "source": "generated",
        "seed": int(seed),
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "negative_prompt": cfg.negative_prompt,
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "noise_rule": cfg.to_dict()["noise_rule"],
        "noise_seed": noise_seed(prompt, int(seed)),
    }


# -------------------------------------------------------------------------------------------------------- compare
@dataclass
class Cell:
    checkpoint: str
    seed: int
    guidance: float
    image: np.ndarray
    scores: dict[str, float]

    def caption(self) -> str:
        scores = "  ".join(f"{k} {v:.3f}" for k, v in self.scores.items())
        return f"{self.checkpoint} · seed {self.seed} · cfg {self.guidance:g}" + (
            f"\n{scores}" if scores else ""
        )


def score_cells(ctx: AppContext, cells: list[Cell], prompt: str, scorers: Sequence[str]) -> None:
    """Fill each cell's scores (images of one size are scored as one batch per scorer)."""
    import torch

    if not cells or not scorers:
        return
    by_size: dict[tuple[int, ...], list[Cell]] = {}
    for c in cells:
        by_size.setdefault(c.image.shape, []).append(c)
    for group in by_size.values():
        x = from_uint8([c.image for c in group])
        for spec in scorers:
            with torch.no_grad():
                values = ctx.scorer(spec)(x, [prompt] * len(group)).float().cpu().tolist()
            for c, v in zip(group, values):
                c.scores[spec] = float(v)


def compare(
    ctx: AppContext,
    checkpoints: Sequence[str],
    prompt: str | None,
    seeds: str,
    *,
    prompt_set: str | None = None,
    sampler: str | None = None,
    steps: Any = None,
    guidance: Any = None,
    guidance_sweep: str | None = None,
    scorers: Sequence[str] = (),
    progress: ProgressFn | None = None,
) -> tuple[str, list[Cell]]:
    """Images of every checkpoint for every seed (and every guidance of the sweep), identical initial noise per
    (prompt, seed), each scored; returns the prompt used and the cells (checkpoint-major)."""
    if not checkpoints:
        raise InputError("choose at least one checkpoint to compare")
    text = check_prompt(ctx, prompt, prompt_set)
    seed_list = check_seeds(ctx, seeds)
    cfg = sampling(ctx, sampler, steps, guidance)
    scales = [cfg.guidance]
    if guidance_sweep and guidance_sweep.strip():
        try:
            scales = [float(x) for x in guidance_sweep.replace(" ", "").split(",") if x]
        except ValueError:
            raise InputError("guidance sweep: comma-separated numbers, e.g. 1,3,5,7.5") from None
        if not scales or len(scales) > 8 or any(not 0 <= g <= 30 for g in scales):
            raise InputError("guidance sweep: 1 to 8 values between 0 and 30")
    total = len(checkpoints) * len(scales) * len(seed_list)
    if total > 64:
        raise InputError(
            f"{total} images requested; at most 64 per view (fewer checkpoints, seeds or scales)"
        )
    cells: list[Cell] = []
    done = 0
    for name in checkpoints:
        for g in scales:
            c = replace(cfg, guidance=g)
            images = ctx.renderer.render(name, [text] * len(seed_list), seed_list, c)
            cells += [Cell(name, s, g, img, {}) for s, img in zip(seed_list, images)]
            done += len(seed_list)
            if progress is not None:
                progress(done / total, f"{done}/{total} images")
    score_cells(ctx, cells, text, scorers)
    return text, cells


def grid_png(cells: Sequence[Cell], out: Path, *, columns: int | None = None) -> Path:
    """The cells as one PNG grid (row = checkpoint x guidance, column = seed) for download."""
    from PIL import Image

    if not cells:
        raise InputError("nothing to download yet: generate a comparison first")
    ncol = columns or len({c.seed for c in cells})
    h, w = cells[0].image.shape[:2]
    rows = (len(cells) + ncol - 1) // ncol
    canvas = Image.new("RGB", (ncol * (w + 2) + 2, rows * (h + 2) + 2), "white")
    for i, c in enumerate(cells):
        tile = Image.fromarray(c.image).resize((w, h))
        canvas.paste(tile, (2 + (i % ncol) * (w + 2), 2 + (i // ncol) * (h + 2)))
    return save_png(np.asarray(canvas), out)


def slider_pair(cells: Sequence[Cell], a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Two cells (by index) at one size, for the before/after slider."""
    from PIL import Image

    n = len(cells)
    if not (0 <= a < n and 0 <= b < n):
        raise InputError(f"slider: choose two images between 1 and {n}")
    x, y = cells[a].image, cells[b].image
    if x.shape != y.shape:
        y = np.asarray(Image.fromarray(y).resize((x.shape[1], x.shape[0])))
    return x, y


# ---------------------------------------------------------------------------------------------------------- arena
@dataclass
class ArenaState:
    """One browser session's arena: the round on screen and what has been pressed for it."""

    round_id: str | None = None
    mode: str = "best"  # best | rank
    shown_at: float = 0.0
    attempt: int = 0  # bumped by undo, so a re-vote on the same round gets a new idempotency key
    pending_rank: list[int] = field(default_factory=list)  # display positions pressed so far (rank mode)
    voted: bool = False
    last_vote_id: int | None = None
    message: str = ""


@dataclass
class RoundView:
    """What the UI shows for a round: images in display order, labels, and a status line."""

    images: list[np.ndarray]
    labels: list[str]
    prompt: str
    reveal: str  # checkpoint/seed per position, shown after the vote in blind rounds
    status: str


def _labels(rnd: Round, revealed: bool) -> list[str]:
    out = []
    for pos, item in enumerate(rnd.shown(), start=1):
        p = item.params
        if revealed or not rnd.blind:
            # "arm": what a before/after round compares (e.g. best-of-8 reranking of a checkpoint), when set
            who = p.get("arm") or p.get("checkpoint") or Path(str(p.get("source_file", ""))).name or "image"
            seed = f" · seed {p['seed']}" if p.get("seed") is not None else ""
            out.append(f"{pos} · {who}{seed}")
        else:
            out.append(f"{pos} · hidden until you vote")
    return out


def for_display(image: np.ndarray, size: int = 256) -> np.ndarray:
    """Small images (the toy world's 32 px) enlarged by an integer factor with nearest-neighbour pixels, so they are
    seen as they are; the stored image is unchanged."""
    factor = max(1, size // max(image.shape[:2]))
    return image if factor == 1 else image.repeat(factor, axis=0).repeat(factor, axis=1)


def round_view(ctx: AppContext, rnd: Round, state: ArenaState) -> RoundView:
    revealed = state.voted
    labels = _labels(rnd, revealed)
    reveal = "   ".join(_labels(rnd, True)) if revealed else ""
    images = [for_display(load_image(i.path)) for i in rnd.shown()]
    return RoundView(images, labels, rnd.prompt, reveal, state.message)


def new_round(
    ctx: AppContext,
    state: ArenaState,
    *,
    user: str,
    prompt: str | None,
    prompt_set: str | None,
    k: Any,
    source: str,
    checkpoints: Sequence[str],
    mode: str = "best",
    sampler: str | None = None,
    steps: Any = None,
    guidance: Any = None,
    session_id: str | None = None,
    progress: ProgressFn | None = None,
) -> tuple[ArenaState, RoundView]:
    """Generate and record a round: ``source="seeds"``: K seeds of the first chosen checkpoint, checkpoint shown;
    ``source="checkpoints"``: K of the chosen checkpoints on one seed (identical noise), anonymised until the vote.
    The display order is shuffled either way and stored beside the slot identities."""
    if mode not in ("best", "rank"):
        raise InputError(f"mode must be 'best' or 'rank', got {mode!r}")
    k = check_k(k)
    text = check_prompt(ctx, prompt, prompt_set)
    cfg = sampling(ctx, sampler, steps, guidance)
    chosen = [c for c in checkpoints if c]
    if not chosen:
        raise InputError("choose at least one checkpoint for the arena")
    if source == "seeds":
        seeds = ctx.draw(lambda r: r.sample(range(2**31), k))
        names = [chosen[0]] * k
        blind = False
    elif source == "checkpoints":
        if len(chosen) < k:
            raise InputError(
                f"{k} images across checkpoints need {k} checkpoints, {len(chosen)} chosen; choose more or "
                "use 'seeds of one checkpoint'"
            )
        names = ctx.draw(lambda r: r.sample(chosen, k))
        seed = ctx.draw(lambda r: r.randrange(2**31))
        seeds = [seed] * k
        blind = True
    else:
        raise InputError(f"source must be 'seeds' or 'checkpoints', got {source!r}")
    by_name: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        by_name.setdefault(n, []).append(i)
    slots: list[np.ndarray | None] = [None] * k
    for n, idx in by_name.items():
        rendered = ctx.renderer.render(n, [text] * len(idx), [seeds[i] for i in idx], cfg, progress)
        for i, img in zip(idx, rendered):
            slots[i] = img
    images = [x for x in slots if x is not None]
    items = []
    for n, s, img in zip(names, seeds, images):
        params = generation_params(ctx, n, text, s, cfg, img)
        items.append((ctx.store.add_image(png_bytes(img), {**params, "prompt": text}), params))
    order = ctx.draw(lambda r: r.sample(range(k), k))
    rnd = ctx.store.new_round(
        user_id=user,
        prompt=text,
        items=items,
        display_order=order,
        blind=blind,
        source="arena",
        session_id=session_id,
    )
    state = ArenaState(
        round_id=rnd.round_id, mode=mode, shown_at=time.monotonic(), message=_prompt_hint(mode, k)
    )
    return state, round_view(ctx, rnd, state)


def _prompt_hint(mode: str, k: int) -> str:
    keys = "1-2" if k == 2 else "1-4"
    if mode == "rank":
        return f"rank: press {keys} from best to worst ({k - 1} presses); t tie, b both bad, s skip, u undo"
    return f"best of {k}: press {keys}; t tie, b both bad, s skip, u undo, n next"


ACTIONS = {"1": 0, "2": 1, "3": 2, "4": 3, "t": "tie", "b": "both_bad", "s": "skip", "u": "undo"}


def act(
    ctx: AppContext, state: ArenaState, *, user: str, key: str, session_id: str | None = None
) -> tuple[ArenaState, RoundView | None]:
    """One key (or button) press in a round: ``1``-``4`` (best, or the next rank), ``t`` tie, ``b`` both bad,
    ``s`` skip, ``u`` undo the user's last vote (and bring its round back to vote again)."""
    if key not in ACTIONS:
        raise InputError(f"unknown action {key!r}; use 1-4, t, b, s or u")
    if key == "u":
        return undo(ctx, state, user=user)
    if state.round_id is None:
        return replace(state, message="no round yet: press n (or Next) to generate one"), None
    rnd = ctx.store.get_round(state.round_id)
    if state.voted:
        return replace(
            state, message="already voted on this round: press n for the next, u to undo"
        ), round_view(ctx, rnd, state)
    action = ACTIONS[key]
    latency = int(1000 * (time.monotonic() - state.shown_at)) if state.shown_at else None
    if isinstance(action, int):
        if action >= rnd.k:
            return replace(state, message=f"this round has {rnd.k} images: press 1-{rnd.k}"), round_view(
                ctx, rnd, state
            )
        if state.mode == "rank":
            if action in state.pending_rank:
                return replace(state, message=f"image {action + 1} is already ranked"), round_view(
                    ctx, rnd, state
                )
            pending = [*state.pending_rank, action]
            if len(pending) < rnd.k - 1:
                order = " > ".join(str(p + 1) for p in pending)
                new = replace(
                    state, pending_rank=pending, message=f"ranked so far: {order} (press the next best)"
                )
                return new, round_view(ctx, rnd, new)
            outcome, ranking = "rank", [rnd.display_order[p] for p in pending]
        else:
            outcome, ranking = "best", [rnd.display_order[action]]
    else:
        outcome, ranking = str(action), []
    result = ctx.store.record_vote(
        rnd.round_id,
        user_id=user,
        outcome=outcome,
        ranking=ranking,
        idempotency_key=f"{rnd.round_id}#{state.attempt}",
        latency_ms=latency,
        session_id=session_id,
    )
    word = {"best": "best", "rank": "ranking", "tie": "tie", "both_bad": "both bad", "skip": "skip"}[outcome]
    dup = " (already stored)" if result.duplicate else ""
    new = replace(
        state,
        voted=True,
        pending_rank=[],
        last_vote_id=result.vote_id,
        message=f"stored vote #{result.vote_id}: {word}{dup}. n = next round, u = undo",
    )
    return new, round_view(ctx, rnd, new)


def undo(ctx: AppContext, state: ArenaState, *, user: str) -> tuple[ArenaState, RoundView | None]:
    """Withdraw the user's last vote (an undo row; the vote stays in the store) and show its round again."""
    if state.pending_rank:  # a half-entered ranking is undone locally first
        new = replace(state, pending_rank=state.pending_rank[:-1], message="last rank press removed")
        return new, round_view(ctx, ctx.store.get_round(state.round_id or ""), new)
    key = f"undo:{user}:{state.last_vote_id}:{new_id()}"
    vote = ctx.store.undo_last(user, idempotency_key=key)
    if vote is None:
        return replace(state, message="nothing to undo"), None
    new = ArenaState(
        round_id=vote.round.round_id,
        mode="rank" if vote.outcome == "rank" else state.mode,
        shown_at=time.monotonic(),
        attempt=_next_attempt(ctx, vote),
        message=f"undid vote #{vote.vote_id} ({vote.outcome}); vote again on this round or press n",
    )
    return new, round_view(ctx, vote.round, new)


def _next_attempt(ctx: AppContext, vote: Vote) -> int:
    """Votes already cast on the round (undone ones included), so the next key is new."""
    return len(ctx.store.votes(round_id=vote.round.round_id, include_undone=True))


_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:")


def submit_vote(
    ctx: AppContext,
    *,
    user: str,
    round_id: str,
    outcome: str,
    ranking: Sequence[int],
    idempotency_key: str,
    latency_ms: int | None = None,
    session_id: str | None = None,
) -> dict[str, Any]:
    """A vote sent by a script or another front end (the app's ``/vote`` API), which unlike the buttons holds its
    own state: it names the round, the decision (``ranking``: slots best-first, as
    :meth:`apps.store.VoteStore.record_vote` takes them) and its own ``idempotency_key``, a fresh random id (8-128
    characters of ``A-Z a-z 0-9 - _ . :``) per decision that it resends unchanged on every retry. A submit retried
    after a timeout, a dropped connection or a server restart is then stored once (``duplicate`` is true on the
    repeats). The key is stored as ``api:<user>:<key>``, so one user's keys never collide with another's or with
    the buttons' ``<round>#<attempt>`` keys. Only the user a round was shown to may vote on it."""
    key = idempotency_key or ""
    if not 8 <= len(key) <= 128 or not set(key) <= _KEY_CHARS:
        raise InputError(
            "idempotency_key: send 8-128 characters of A-Z a-z 0-9 - _ . : (e.g. a uuid4 hex), new for each "
            "decision and the same on every retry of it"
        )
    rnd = ctx.store.get_round(round_id)
    if rnd.user_id != user:
        raise InputError(f"round {round_id!r} was shown to another user; vote on your own rounds")
    result = ctx.store.record_vote(
        round_id,
        user_id=user,
        outcome=outcome,
        ranking=list(ranking),
        idempotency_key=f"api:{user}:{key}",
        latency_ms=latency_ms,
        session_id=session_id,
    )
    return {"vote_id": result.vote_id, "round_id": result.round_id, "duplicate": result.duplicate}


# --------------------------------------------------------------------------------------------------------- curate
@dataclass
class CuratedImage:
    sha256: str
    prompt: str
    params: dict[str, Any]


@dataclass
class CurateState:
    folder: str | None = None
    images: list[CuratedImage] = field(default_factory=list)
    strategy: str = "swiss"  # swiss | winner_stays
    compared: dict[str, int] = field(default_factory=dict)  # sha -> comparisons so far
    wins: dict[str, float] = field(default_factory=dict)  # sha -> wins (ties 0.5)
    seen_pairs: set[tuple[str, str]] = field(default_factory=set)
    last_winner: str | None = None
    arena: ArenaState = field(default_factory=ArenaState)


def resolve_folder(ctx: AppContext, folder: str | None) -> Path:
    """A folder the user chose, checked: it exists, is a directory, and lies inside ``curate_root`` if one is set."""
    text = (folder or "").strip()
    if not text:
        raise InputError("enter the folder of images to curate")
    path = Path(text).expanduser()
    try:
        path = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InputError(f"folder {text!r} does not exist") from None
    if not path.is_dir():
        raise InputError(f"{text!r} is not a folder")
    root = ctx.settings.curate_root
    if root is not None and not path.is_relative_to(Path(root).expanduser().resolve()):
        raise InputError(f"folder {text!r} is outside the allowed root {root} (--curate-root)")
    return path


def folder_images(folder: Path, limit: int) -> list[Path]:
    """Image files under ``folder`` whose real location is inside it (a symlink pointing out is skipped)."""
    found = []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
            continue
        if not p.resolve().is_relative_to(folder):
            continue
        found.append(p)
        if len(found) >= limit:
            break
    return found


def load_folder(
    ctx: AppContext, folder: str | None, typed_prompt: str | None = None, *, strategy: str = "swiss"
) -> tuple[CurateState, str]:
    """Import a folder's images into the store (content-addressed, with the prompt / seed / sampler read from
    their metadata, a sidecar caption, or ``typed_prompt``); returns the session and a summary."""
    if strategy not in ("swiss", "winner_stays"):
        raise InputError(f"pairing must be 'swiss' or 'winner_stays', got {strategy!r}")
    path = resolve_folder(ctx, folder)
    files = folder_images(path, ctx.settings.max_curate_images)
    typed = (typed_prompt or "").strip()
    if len(typed) > ctx.settings.max_prompt_chars:
        raise InputError(f"prompt is {len(typed)} characters; the limit is {ctx.settings.max_prompt_chars}")
    images: list[CuratedImage] = []
    formats: dict[str, int] = {}
    unreadable: list[str] = []
    no_prompt = 0
    for f in files:
        try:
            meta = read_metadata(f)
            png = png_bytes(load_image(f))
        except (OSError, ValueError) as exc:
            unreadable.append(f"{f.name}: {exc}")
            continue
        prompt = meta.prompt or typed
        if not prompt:
            no_prompt += 1
        formats[meta.format] = formats.get(meta.format, 0) + 1
        params = {
            **meta.to_params(),
            "source": "curated",
            "source_file": str(f.relative_to(path)),
            "folder": str(path),
        }
        params["prompt"] = prompt
        images.append(CuratedImage(ctx.store.add_image(png, params), prompt, params))
    if len(images) < 2:
        raise InputError(f"{path} holds {len(images)} readable image(s); curating needs at least 2")
    state = CurateState(folder=str(path), images=images, strategy=strategy)
    summary = f"{len(images)} images from {path} (metadata: " + ", ".join(
        f"{k} {v}" for k, v in sorted(formats.items())
    )
    summary += ")"
    if no_prompt:
        summary += f"; {no_prompt} without a prompt (type one to use for them)"
    if unreadable:
        summary += f"; {len(unreadable)} unreadable skipped, e.g. {unreadable[0]}"
    return state, summary


def pick_group(state: CurateState, k: int, rng: random.Random) -> list[CuratedImage]:
    """The next K images to compare, spending few votes well instead of all pairs:

    * ``winner_stays`` (Pick-a-Pic): the last winner stays, joined by the least-compared images it has not met;
    * ``swiss``: the least-compared image is the pivot, joined by the images with the closest win rate that it has
      not met yet (Swiss pairing; unseen pairs first, ties broken at random).

    Images with the pivot's prompt are preferred, so that a pair shares a prompt when the folder allows it.
    """
    pool = list(state.images)
    if len(pool) < k:
        raise InputError(f"the folder has {len(pool)} images; a round of {k} needs at least {k}")
    rng.shuffle(pool)  # random tie-breaks
    n = lambda im: state.compared.get(im.sha256, 0)  # noqa: E731
    rate = lambda im: (state.wins.get(im.sha256, 0.0) + 0.5) / (n(im) + 1.0)  # noqa: E731
    by_sha = {im.sha256: im for im in pool}
    if state.strategy == "winner_stays" and state.last_winner in by_sha:
        pivot = by_sha[state.last_winner]
    else:
        pivot = min(pool, key=n)
    group = [pivot]
    while len(group) < k:
        rest = [im for im in pool if im not in group]

        def key(im: CuratedImage) -> tuple[int, int, float, int]:
            met = sum(1 for g in group if _pair(g.sha256, im.sha256) in state.seen_pairs)
            other_prompt = int(im.prompt != pivot.prompt)
            closeness = abs(rate(im) - rate(pivot)) if state.strategy == "swiss" else 0.0
            return (met, other_prompt, closeness, n(im))

        group.append(min(rest, key=key))
    return group


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


def new_curate_round(
    ctx: AppContext,
    state: CurateState,
    *,
    user: str,
    k: Any,
    mode: str = "best",
    typed_prompt: str | None = None,
    session_id: str | None = None,
) -> tuple[CurateState, RoundView]:
    if not state.images:
        raise InputError("load a folder first")
    if mode not in ("best", "rank"):
        raise InputError(f"mode must be 'best' or 'rank', got {mode!r}")
    k = check_k(k)
    group = ctx.draw(lambda r: pick_group(state, k, r))
    prompt = (
        group[0].prompt or (typed_prompt or "").strip()
    )  # the image's own prompt; typed only when it has none
    if not prompt:
        raise InputError("these images carry no prompt: type the prompt they were made for")
    order = ctx.draw(lambda r: r.sample(range(k), k))
    rnd = ctx.store.new_round(
        user_id=user,
        prompt=prompt,
        items=[(im.sha256, im.params) for im in group],
        display_order=order,
        blind=False,
        source="curate",
        session_id=session_id,
    )
    arena = ArenaState(
        round_id=rnd.round_id, mode=mode, shown_at=time.monotonic(), message=_prompt_hint(mode, k)
    )
    state = replace(state, arena=arena)
    return state, round_view(ctx, rnd, arena)


def curate_act(
    ctx: AppContext, state: CurateState, *, user: str, key: str, session_id: str | None = None
) -> tuple[CurateState, RoundView | None]:
    """A key press in Curate: the arena's rules, then the pairing statistics are updated from the stored vote."""
    was_voted = state.arena.voted
    arena, view = act(ctx, state.arena, user=user, key=key, session_id=session_id)
    state = replace(state, arena=arena)
    if key != "u" and arena.voted and not was_voted and arena.round_id is not None:
        _tally(ctx, state, arena.round_id)
    elif key == "u":
        _retally(ctx, state, user)
    return state, view


def _apply(state: CurateState, vote: Vote) -> None:
    shas = [i.sha256 for i in vote.round.items]
    if vote.outcome in ("best", "rank", "tie"):
        for a, b in ((a, b) for i, a in enumerate(shas) for b in shas[i + 1 :]):
            state.seen_pairs.add(_pair(a, b))
        for s in shas:
            state.compared[s] = state.compared.get(s, 0) + 1
    if vote.outcome == "best":
        winner = shas[vote.ranking[0]]
        state.wins[winner] = state.wins.get(winner, 0.0) + 1
        state.last_winner = winner
    elif vote.outcome == "rank":
        k = len(shas)
        for place, slot in enumerate(vote.ranking):  # Borda share: best 1, worst 0
            state.wins[shas[slot]] = state.wins.get(shas[slot], 0.0) + (k - 1 - place) / (k - 1)
        state.last_winner = shas[vote.ranking[0]]
    elif vote.outcome == "tie":
        for s in shas:
            state.wins[s] = state.wins.get(s, 0.0) + 0.5


def _tally(ctx: AppContext, state: CurateState, round_id: str) -> None:
    for vote in ctx.store.votes(round_id=round_id):
        _apply(state, vote)


def _retally(ctx: AppContext, state: CurateState, user: str) -> None:
    """Recount the pairing statistics from the user's active curate votes on this folder (after an undo)."""
    state.compared.clear()
    state.wins.clear()
    state.seen_pairs.clear()
    state.last_winner = None
    mine = {im.sha256 for im in state.images}
    for vote in ctx.store.votes(user_id=user):
        if vote.round.source == "curate" and all(i.sha256 in mine for i in vote.round.items):
            _apply(state, vote)


def curate_ranking(state: CurateState) -> list[tuple[CuratedImage, float, int]]:
    """Images by win rate so far (ties 0.5), with their comparison counts."""
    rows = [
        (
            im,
            state.wins.get(im.sha256, 0.0) / max(1, state.compared.get(im.sha256, 0)),
            state.compared.get(im.sha256, 0),
        )
        for im in state.images
    ]
    return sorted(rows, key=lambda r: (-r[1], -r[2]))


# ---------------------------------------------------------------------------------------------------- export/stats
def export(ctx: AppContext, *, user: str | None = None) -> tuple[str, Path]:
    """Export the active votes (all users, or one) to a fresh folder under the export dir; returns the summary
    and the Pick-a-Pic parquet path."""
    from apps.store import export_votes

    out = ctx.export_dir / time.strftime("%Y%m%d-%H%M%S") / new_id()[:6]
    try:
        result = export_votes(ctx.store, out, user_id=user)
    except StoreError as exc:
        raise InputError(str(exc)) from None
    return result.summary(), result.files["pickapic"]


def stats_text(ctx: AppContext, *, user: str | None = None) -> str:
    from apps.store import format_stats, vote_stats

    return format_stats(vote_stats(ctx.store, user_id=user))


def load_settings(path: str | Path | None = None, **overrides: Any) -> AppSettings:
    """App settings from a YAML file (keys = :class:`AppSettings` fields), then ``overrides`` (None = keep)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(AppSettings)}
    data: dict[str, Any] = {}
    if path is not None:
        from omegaconf import OmegaConf

        p = Path(path)
        if not p.is_file():
            raise InputError(f"--config {path}: no such file")
        loaded = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
        if not isinstance(loaded, dict):
            raise InputError(f"{path}: expected a mapping of app settings")
        data = {str(k): v for k, v in loaded.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{path}: unknown app setting(s) {unknown}; known: {', '.join(sorted(known))}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"unknown app setting(s) {unknown}")
    return AppSettings(**data)
