"""Tiny SDXL-shaped and SD1.5-shaped pipelines, built from config only (no hub, no downloads).

This is the one place where tiny components are built. Tests, the toy world and the benchmarks all call
:func:`build_tiny_components`; tests then save the result with ``save_pretrained`` (and as a single file) and load it
back through the production loaders in :mod:`workbench.models`.

Shapes follow diffusers' own SDXL pipeline tests (``get_dummy_components``): the UNet's ``text_time`` additional
embedding takes ``projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + pooled_dim``, where the 6 are
SDXL's micro-conditioning ids (original size, crop top-left, target size) and ``pooled_dim`` is the projection size of
the second text encoder.

The CLIP tokenizer is built offline from the BPE vocabulary that ``open_clip`` ships
(``bpe_simple_vocab_16e6.txt.gz``): the first ``n_merges`` merges of the real CLIP vocabulary, plus merge chains that
make each word of ``extra_words`` a single token (the toy world uses this so that "red", "circle", ... are one token).
"""

from __future__ import annotations

import gzip
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

Family = Literal["sdxl", "sd15"]


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny pipeline. The defaults give a ~1 M parameter UNet that runs a DPO step on CPU in well under a
    second at 32 px; the toy world uses larger UNet channels."""

    family: Family = "sdxl"
    resolution: int = 32
    unet_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: tuple[int, ...] = (2, 4)
    transformer_layers: int | tuple[int, ...] = 1  # per block, like SDXL's (1, 2, 10)
    norm_num_groups: int = 32
    vae_channels: tuple[int, ...] = (32, 64)
    vae_norm_groups: int = 16
    latent_channels: int = 4
    text_hidden: int = 32
    #: hidden size of SDXL's second text encoder (None = text_hidden). Real SDXL has 768 / 1280; give them different
    #: sizes when a test needs to tell the two encoders apart by shape (diffusers' single-file loader does).
    text_hidden_2: int | None = None
    text_layers: int = 2
    text_heads: int = 4
    text_ffn: int = 64
    text_max_length: int = 16
    pooled_dim: int = 32
    addition_time_embed_dim: int = 8
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    rescale_betas_zero_snr: bool = False
    #: "leading" / "trailing" / "linspace"; None keeps the default: "trailing" with zero-terminal-SNR, else "leading".
    timestep_spacing: str | None = None
    n_merges: int = 2000
    extra_words: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (identical to the one in ``transformers``' CLIP tokenizer)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _bpe(symbols: list[str], ranks: dict[tuple[str, ...], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the adjacent pair of lowest rank until none is left (CLIP's ``bpe``)."""
    word = list(symbols)
    while len(word) > 1:
        candidates = [pair for pair in itertools.pairwise(word) if pair in ranks]
        if not candidates:
            break
        best = min(candidates, key=ranks.__getitem__)
        i = next(i for i, pair in enumerate(itertools.pairwise(word)) if pair == best)
        word[i : i + 2] = [best[0] + best[1]]
    return word


def _open_clip_bpe_path() -> Path:
    import open_clip.tokenizer as oct

    return Path(oct.default_bpe())


def write_clip_tokenizer(
    directory: str | Path,
    *,
    n_merges: int = 2000,
    extra_words: tuple[str, ...] | list[str] = (),
    model_max_length: int = 16,
) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` (+ tokenizer config) for a ``CLIPTokenizer`` into ``directory``.

    The vocabulary is the real CLIP BPE truncated to its first ``n_merges`` merges (so tokenisation of common text is
    exactly CLIP's), plus, for each word of ``extra_words``, the merges that join its pieces into one token.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(_open_clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + n_merges]]
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
    known = set(vocab_list)
    ranks = {m: i for i, m in enumerate(merges)}
    for word in extra_words:
        # BPE applies merges by rank, so a word's pieces are what the merges so far make of it; appending merges that
        # join exactly those pieces (lowest priority, applied after everything else) makes the word one token without
        # changing how any other text, or any earlier extra word, is split.
        pieces = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
        cur = pieces[0]
        for piece in pieces[1:]:
            merge = (cur, piece)
            if merge not in ranks:
                ranks[merge] = len(merges)
                merges.append(merge)
            cur = cur + piece
            if cur not in known:
                vocab_list.append(cur)
                known.add(cur)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    config = {
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


def build_tokenizer(spec: TinySpec, directory: str | Path) -> Any:
    from transformers import CLIPTokenizer

    write_clip_tokenizer(
        directory, n_merges=spec.n_merges, extra_words=spec.extra_words, model_max_length=spec.text_max_length
    )
    return CLIPTokenizer.from_pretrained(str(directory))


def _text_config(spec: TinySpec, vocab_size: int, *, projection: bool) -> Any:
    hidden = spec.text_hidden_2 or spec.text_hidden if projection else spec.text_hidden
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=spec.text_ffn,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=spec.text_max_length,
        projection_dim=spec.pooled_dim if projection else hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="gelu",
    )


def build_tiny_components(spec: TinySpec, workdir: str | Path) -> dict[str, Any]:
    """Build every component of a tiny pipeline. ``workdir`` receives the tokenizer files.

    Returns the keyword arguments of ``StableDiffusionXLPipeline`` (family "sdxl") or ``StableDiffusionPipeline``
    (family "sd15", with ``safety_checker=None``).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    workdir = Path(workdir)
    tokenizer = build_tokenizer(spec, workdir / "tokenizer")
    vocab_size = len(tokenizer)
    n_blocks = len(spec.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_blocks - 1)
    up = ("CrossAttnUpBlock2D",) * (n_blocks - 1) + ("UpBlock2D",)
    latent_size = spec.resolution // 2 ** (len(spec.vae_channels) - 1)
    sdxl = spec.family == "sdxl"
    cross_dim = spec.text_hidden + (spec.text_hidden_2 or spec.text_hidden) if sdxl else spec.text_hidden
    unet_kwargs: dict[str, Any] = dict(
        sample_size=latent_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=spec.attention_head_dim,
        cross_attention_dim=cross_dim,
        norm_num_groups=spec.norm_num_groups,
        transformer_layers_per_block=spec.transformer_layers,
        use_linear_projection=sdxl,
    )
    if sdxl:
        unet_kwargs.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=spec.addition_time_embed_dim,
            # 6 micro-conditioning ids x time-embed dim + pooled text embedding (diffusers' SDXL test formula).
            projection_class_embeddings_input_dim=6 * spec.addition_time_embed_dim + spec.pooled_dim,
        )
    torch.manual_seed(spec.seed)
    unet = UNet2DConditionModel(**unet_kwargs)
    torch.manual_seed(spec.seed)
    # diffusers annotates the three per-level tuples as ``Tuple[int]`` / ``Tuple[str]`` (one element); any length works
    vae = AutoencoderKL(
        block_out_channels=spec.vae_channels,  # pyright: ignore[reportArgumentType]  # see above
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),  # pyright: ignore[reportArgumentType]
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),  # pyright: ignore[reportArgumentType]
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.vae_norm_groups,
        layers_per_block=1,
        sample_size=spec.resolution,
        scaling_factor=0.13025 if sdxl else 0.18215,
    )
    sched_kwargs: dict[str, Any] = dict(
        beta_start=spec.beta_start,
        beta_end=spec.beta_end,
        beta_schedule=spec.beta_schedule,
        num_train_timesteps=1000,
        prediction_type=spec.prediction_type,
        steps_offset=1,
        timestep_spacing=spec.timestep_spacing or ("trailing" if spec.rescale_betas_zero_snr else "leading"),
        rescale_betas_zero_snr=spec.rescale_betas_zero_snr,
    )
    torch.manual_seed(spec.seed)
    text_encoder = CLIPTextModel(_text_config(spec, vocab_size, projection=False))
    if not sdxl:
        scheduler = DDIMScheduler(**sched_kwargs, clip_sample=False, set_alpha_to_one=False)
        return dict(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    torch.manual_seed(spec.seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(spec, vocab_size, projection=True))
    scheduler = EulerDiscreteScheduler(**sched_kwargs)
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=scheduler,
    )


def build_tiny_pipeline(spec: TinySpec, workdir: str | Path) -> Any:
    """A ``StableDiffusionXLPipeline`` / ``StableDiffusionPipeline`` around :func:`build_tiny_components`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    components = build_tiny_components(spec, workdir)
    cls = StableDiffusionXLPipeline if spec.family == "sdxl" else StableDiffusionPipeline
    return cls(**components)


def save_tiny_pipeline(spec: TinySpec, directory: str | Path) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder (``model_index.json`` + components)."""
    directory = Path(directory)
    pipe = build_tiny_pipeline(spec, directory / "_tokenizer_build")
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return directory


# ------------------------------------------------------------------------------------------------ tiny fixture data
def _png(array: Any) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_tiny_pickapic(
    path: str | Path, n: int = 32, *, seed: int = 0, corrupt_rows: tuple[int, ...] = (), ties: int = 0
) -> Path:
    """A small parquet in the Pick-a-Pic v2 layout (``jpg_0``, ``jpg_1``, ``label_0``, ``label_1``, ``caption``).

    Preferred images are a bright centred square on a dark background; dispreferred ones are noise. Sizes vary
    (40-56 px, not square) so that resizing, joint cropping and SDXL micro-conditioning are exercised.
    ``corrupt_rows`` get undecodable bytes in ``jpg_1``; ``ties`` extra rows have ``label_0 = 0.5``.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
    rows: dict[str, list[Any]] = {k: [] for k in ("jpg_0", "jpg_1", "label_0", "label_1", "caption")}
    for i in range(n + ties):
        name, rgb = list(colours.items())[i % len(colours)]
        h, w = int(rng.integers(40, 57)), int(rng.integers(40, 57))
        good = np.full((h, w, 3), 20, dtype=np.uint8)
        good[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = rgb
        bad = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        winner_first = bool(rng.integers(0, 2))
        a, b = (good, bad) if winner_first else (bad, good)
        rows["jpg_0"].append(_png(a))
        rows["jpg_1"].append(b"\x00not an image" if i in corrupt_rows else _png(b))
        label0 = 0.5 if i >= n else (1.0 if winner_first else 0.0)
        rows["label_0"].append(label0)
        rows["label_1"].append(1.0 - label0)
        rows["caption"].append(f"a {name} square")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), str(path))
    return path


def write_tiny_fixtures(directory: str | Path) -> dict[str, Path]:
    """Everything ``configs/tiny/*.yaml`` refer to: tiny SDXL and SD1.5 pipelines and a Pick-a-Pic parquet."""
    directory = Path(directory)
    out = {
        "sdxl": directory / "sdxl",
        "sd15": directory / "sd15",
        "pickapic": directory / "pickapic.parquet",
    }
    if not (out["sdxl"] / "model_index.json").is_file():
        save_tiny_pipeline(TinySpec(family="sdxl", text_hidden_2=48), out["sdxl"])
    if not (out["sd15"] / "model_index.json").is_file():
        save_tiny_pipeline(TinySpec(family="sd15"), out["sd15"])
    if not out["pickapic"].is_file():
        write_tiny_pickapic(out["pickapic"], n=48)
    return out
