"""GPU check (issue 13, item 6): full-size SDXL-architecture training steps at 1024 px in bf16, and HPS scoring
throughput, on one CUDA device. Every result is printed as soon as it is measured, most important first.

What is built: the UNet, VAE and both text encoders with SDXL base 1.0's architecture (the configs below restate
``stabilityai/stable-diffusion-xl-base-1.0``'s ``unet/``, ``vae/``, ``text_encoder*/`` config files), randomly
initialised, in memory on the device: nothing is downloaded and no pipeline is written to disk. The real
``workbench.train.Trainer`` is set up from the shipped ``configs/sdxl/*.yaml`` with one substitution,
``workbench.models.load_pipeline`` -> "return this in-memory pipeline"; everything after it is the production path:
``setup_training_components`` (dtypes, LoRA), the latent / text-embedding cache built from synthetic 1024 px JPEGs
(VAE and text encoders run on the device), the reference, the optimizer, and ``Trainer.train()`` itself.

Measured, in this order:

(a) Diffusion-DPO, LoRA (configs/sdxl/dpo_lora.yaml): the diffusers-example-style step of
    ``benchmarks/dpo_step.py`` (``_baseline_step``: decode and preprocess the JPEGs, VAE-encode both images, run both
    text encoders, policy forward, reference forward with adapters disabled, loss, backward, optimizer step) against
    ours (``Trainer.train()`` steps: cached latents and embeddings, one batched forward over both images, reference =
    the same UNet with LoRA disabled, gradient clipping, the loop's own bookkeeping), on the same trainer, batch and
    optimizer;
(b) Diffusion-DPO, full fine-tune (configs/sdxl/dpo.yaml: fp32 master weights, frozen bf16 reference copy, Adafactor);
(c) every other objective in ``trainers.OBJECTIVES`` (its own configs/sdxl/<name>.yaml when there is one, else
    dpo_lora.yaml with the objective replaced), on data of the shape it needs;
(d) HPS v2.1 scoring on random ViT-H-14 weights: ``rewards.hps.HPSv21`` resident and batched against the
    hpsv2-style loop restated in ``benchmarks/score_throughput.py`` (checkpoint reloaded per call, one image at a time).

Per training variant: the mean step time over ``--steps`` timed steps after ``--warmup`` steps
(``torch.cuda.synchronize()`` before and after), peak memory (``torch.cuda.max_memory_allocated`` since just before
the warm-up: resident weights, optimizer state and the step's activations), the FLOPs of one step counted by
``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and attention, forward and backward, as
the step runs on the device) and MFU = FLOPs / step time / 989 TFLOP/s (H100/H200 SXM dense bf16).

    bash benchmarks/gpu_check.sh                       # on a GPU: PYTHONPATH=. python benchmarks/gpu_check.py
    PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --tiny    # CPU smoke run of the same code, tiny models
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

PEAK_FLOPS = 989e12  # H100 / H200 SXM dense bf16 (vendor datasheet)
T_START = time.perf_counter()

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (diffusers names; "attention_head_dim" holds head counts)
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
# vae/config.json (the fp16-fix VAE has the same architecture)
SDXL_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
# scheduler/scheduler_config.json
SDXL_SCHEDULER: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
)
CLIP_VOCAB, CLIP_MERGES = 49408, 48894  # the real CLIP BPE: 512 byte tokens + 48894 merges + 2 specials


def log(line: str = "") -> None:
    print(line, flush=True)


def elapsed() -> float:
    return time.perf_counter() - T_START


# ------------------------------------------------------------------------------------------------------ models
@dataclass
class Models:
    """The frozen parts (shared by every variant) and the UNet config (a fresh UNet per variant)."""

    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    scheduler: Any
    unet_config: dict[str, Any]
    resolution: int

    def pipeline(self, device: torch.device) -> Any:
        """A StableDiffusionXLPipeline around a freshly initialised UNet, built directly on ``device``."""
        from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

        torch.manual_seed(0)
        with device:
            unet = UNet2DConditionModel(**self.unet_config)
        return StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer,
            unet=unet,
            scheduler=self.scheduler,
        )


def build_models(tiny: bool, device: torch.device, workdir: Path) -> Models:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if tiny:
        from workbench.tiny import TinySpec, build_tiny_components

        c = build_tiny_components(TinySpec(family="sdxl", text_hidden_2=48), workdir / "tiny")
        for name in ("vae", "text_encoder", "text_encoder_2"):
            c[name].to(device)
        unet_config = {k: v for k, v in c["unet"].config.items() if not k.startswith("_")}
        return Models(
            c["vae"], c["text_encoder"], c["text_encoder_2"], c["tokenizer"], c["scheduler"], unet_config, 32
        )
    from workbench.tiny import write_clip_tokenizer

    tok_dir = write_clip_tokenizer(workdir / "tokenizer", n_merges=CLIP_MERGES, model_max_length=77)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))

    def clip(hidden: int, ffn: int, layers: int, heads: int, act: str) -> Any:
        return clip_text_config(hidden, ffn, layers, heads, act, vocab_size=len(tokenizer))

    torch.manual_seed(0)
    with device:  # initialised on the device: seconds instead of minutes on the host
        vae = AutoencoderKL(**SDXL_VAE)
        te1 = CLIPTextModel(clip(768, 3072, 12, 12, "quick_gelu"))  # CLIP ViT-L/14 text tower
        te2 = CLIPTextModelWithProjection(clip(1280, 5120, 32, 20, "gelu"))  # OpenCLIP ViT-bigG/14 text tower
    return Models(vae, te1, te2, tokenizer, EulerDiscreteScheduler(**SDXL_SCHEDULER), dict(SDXL_UNET), 1024)


def clip_text_config(
    hidden: int, ffn: int, layers: int, heads: int, act: str, *, vocab_size: int = CLIP_VOCAB
) -> Any:
    """A CLIP text tower's config (SDXL: ViT-L/14 768 / 3072 / 12 / 12 quick_gelu, bigG 1280 / 5120 / 32 / 20 gelu)
    over the CLIP BPE vocabulary (the last two ids are the start and end tokens)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act=act,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def n_params(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e9


# -------------------------------------------------------------------------------------------------------- data
def jpeg_images(n: int, res: int, seed: int = 0) -> list[bytes]:
    """Smooth random colour fields with a little noise, ``res`` x ``res`` JPEG (q 90)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
            (res, res), Image.Resampling.BICUBIC
        )
        arr = np.asarray(low, dtype=np.int16) + rng.integers(-12, 13, (res, res, 3))
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class Data:
    """Synthetic training data in the three source formats, written on first use."""

    def __init__(self, workdir: Path, res: int, groups: int) -> None:
        self.dir, self.res, self.groups = workdir / "data", res, groups
        self.dir.mkdir(parents=True, exist_ok=True)
        self._images: list[Path] = []

    def images(self, n: int) -> list[Path]:
        if len(self._images) < n:
            for i, b in enumerate(jpeg_images(n - len(self._images), self.res, seed=len(self._images))):
                path = self.dir / f"img_{len(self._images) + i:04d}.jpg"
                path.write_bytes(b)
            self._images = sorted(self.dir.glob("img_*.jpg"))
        return self._images[:n]

    def prompt(self, i: int) -> str:
        return f"a photo of object {i}"

    def source(self, needs: Any) -> str:
        """The ``data.sources`` override value for an objective's needs."""
        if needs.data == "rankings" or needs.scores:
            k = max(4, needs.min_k)
            path = self.dir / f"rankings_k{k}.jsonl"
            if not path.is_file():
                imgs = self.images(self.groups * k)
                rows = [
                    {
                        "prompt": self.prompt(g),
                        "images": [str(p) for p in imgs[g * k : (g + 1) * k]],
                        "scores": [(k - 1 - j) / (k - 1) for j in range(k)],  # best-first, in [0, 1]
                    }
                    for g in range(self.groups)
                ]
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            return f"[{{format: ranking_jsonl, path: '{path}'}}]"
        if needs.soft_labels:
            path = self.dir / "pairs_soft.jsonl"
            if not path.is_file():
                imgs = self.images(self.groups * 2)
                rows = [
                    {
                        "prompt": self.prompt(g),
                        "image_0": str(imgs[2 * g]),
                        "image_1": str(imgs[2 * g + 1]),
                        "prefer_0": 0.8,
                        "prefer_1": 0.2,
                    }
                    for g in range(self.groups)
                ]
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            return f"[{{format: pair_jsonl, path: '{path}'}}]"
        path = self.dir / "pickapic.parquet"
        if not path.is_file():
            import pyarrow as pa
            import pyarrow.parquet as pq

            imgs = [p.read_bytes() for p in self.images(self.groups * 2)]
            pq.write_table(
                pa.table(
                    {
                        "jpg_0": imgs[0::2],
                        "jpg_1": imgs[1::2],
                        "label_0": [1.0] * self.groups,
                        "label_1": [0.0] * self.groups,
                        "caption": [self.prompt(g) for g in range(self.groups)],
                    }
                ),
                str(path),
            )
        return f"[{{format: pickapic_parquet, path: '{path}'}}]"


# ---------------------------------------------------------------------------------------------- measurement
class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device, models: Models, workdir: Path) -> None:
        self.args, self.device, self.models, self.workdir = args, device, models, workdir
        self.data = Data(workdir, models.resolution, args.groups)
        self.results: list[dict[str, Any]] = []

    # ---- device helpers
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None

    def allocated_gib(self) -> float | None:
        return torch.cuda.memory_allocated() / 2**30 if self.device.type == "cuda" else None

    def count_flops(self, fn: Callable[[], Any]) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            fn()
        self.sync()
        return float(counter.get_total_flops())

    def timed(self, step: Callable[[], Any]) -> float:
        """Warm-up steps, then the mean of the timed steps (synchronised before and after)."""
        for _ in range(self.args.warmup):
            step()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(self.args.steps):
            step()
        self.sync()
        return (time.perf_counter() - t0) / self.args.steps

    def record(self, part: str, name: str, **fields: Any) -> dict[str, Any]:
        r = {"part": part, "name": name, **fields}
        self.results.append(r)
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(self.results, indent=1))
        return r

    def report_step(
        self, part: str, name: str, what: str, step_s: float, flops: float, peak: float | None, **extra: Any
    ) -> dict[str, Any]:
        mfu = flops / step_s / PEAK_FLOPS
        mem = f"{peak:6.1f} GiB" if peak is not None else "   n/a (cpu)"
        log(
            f"[{part}] {name:28s} step {step_s:8.4f} s   peak {mem}   {flops / 1e12:8.4g} TFLOP/step   "
            f"{flops / step_s / 1e12:7.1f} TFLOP/s   MFU {100 * mfu:5.1f}%   ({what})"
        )
        return self.record(part, name, what=what, step_s=step_s, flops=flops, peak_gib=peak, mfu=mfu, **extra)

    # ---- trainers
    def trainer(self, config: str, run: str, overrides: list[str], *, gc_on: bool) -> Any:
        """The real Trainer on the in-memory pipeline (see the module docstring)."""
        import workbench.models as wm
        from workbench.config import load_config
        from workbench.train import Trainer

        a = self.args
        common = [
            f"data.cache.dir={self.workdir / 'cache'}",
            f"data.resolution={self.models.resolution}",
            f"train.batch_size={a.groups_per_step}",
            "train.gradient_accumulation_steps=1",
            "train.mixed_precision=bf16",
            f"train.gradient_checkpointing={'true' if gc_on else 'false'}",
            "train.max_steps=1",
            "train.checkpoint_every=1000000",
            "model.vae=null",
            "model.vae_dtype=fp32",
            "model.text_encoder_dtype=bf16",
            f"run.output_dir={self.workdir / 'runs'}",
            f"run.name={run}",
            "train.overwrite=true",  # a fallback retry (gradient checkpointing on) reuses the scratch run's folder
            "run.seed=0",  # configs/*/self_npo.yaml's 453645634 overflows Trainer.reseed's generator seed
            "logging.tensorboard=false",
            "logging.wandb_project=null",
            "validation.prompts=[]",
        ]
        cfg = load_config(ROOT / "configs/sdxl" / config, common + overrides)
        if cfg.optimizer.name == "adamw_8bit":
            try:
                import bitsandbytes  # noqa: F401  # pyright: ignore[reportMissingImports]
            except ImportError:
                log(f"    ({config}: bitsandbytes is not installed: optimizer adamw_8bit -> adamw)")
                cfg = load_config(
                    ROOT / "configs/sdxl" / config, [*common, *overrides, "optimizer.name=adamw"]
                )
        pipe = self.models.pipeline(self.device)
        original = wm.load_pipeline
        wm.load_pipeline = lambda source, **kw: pipe  # the one substitution: no hub, no disk
        try:
            trainer = Trainer(cfg, show_progress=False)
            trainer.setup()
        finally:
            wm.load_pipeline = original
        trainer.save_final = lambda: trainer.run_dir  # do not write 10 GB of weights after the timed steps
        return trainer

    def release(self, trainer: Any) -> None:
        if trainer is not None:
            trainer.accelerator.free_memory()
            trainer.__dict__.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self, trainer: Any) -> str:
        cfg = trainer.cfg
        b, k = cfg.train.batch_size, max(item.k for item in trainer.cache.items)
        lora = f"LoRA r{cfg.model.lora.rank}" if cfg.model.finetune == "lora" else "full fine-tune"
        return (
            f"{cfg.objective.name}, {lora}, {b} groups x K={k} = {b * k} images/step at {self.models.resolution} px, "
            f"bf16, {cfg.optimizer.name}, grad ckpt {'on' if cfg.train.gradient_checkpointing else 'off'}, "
            f"reference {type(trainer.reference).__name__ if trainer.reference is not None else 'none'}"
        )

    def ours(self, part: str, name: str, trainer: Any) -> dict[str, Any]:
        """``Trainer.train()``: warm-up steps, then the timed steps, then one step under the FLOP counter."""
        cfg, w, n = trainer.cfg, self.args.warmup, self.args.steps
        resident = self.allocated_gib()
        self.reset_peak()
        cfg.train.max_steps = trainer.counters.step + w
        trainer.train()
        self.sync()
        t0 = time.perf_counter()
        cfg.train.max_steps = trainer.counters.step + n
        trainer.train()
        self.sync()
        step_s = (time.perf_counter() - t0) / n
        peak = self.peak_gib()
        records = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
        last = records[-1]

        def one_more() -> None:
            cfg.train.max_steps = trainer.counters.step + 1
            trainer.train()

        flops = self.count_flops(one_more)
        return self.report_step(
            part,
            name,
            self.describe(trainer),
            step_s,
            flops,
            peak,
            resident_gib=resident,
            last_loss=last["train/loss"],
            nonfinite_steps=last["train/nonfinite_total"],
        )

    def baseline(self, part: str, name: str, trainer: Any) -> dict[str, Any]:
        """``benchmarks/dpo_step.py``'s diffusers-example-style step on the same trainer."""
        from dpo_step import _baseline_step

        from workbench.data import read_records

        records, _ = read_records(trainer.cfg.data.sources)
        gen = torch.Generator().manual_seed(0)
        b = trainer.cfg.train.batch_size
        losses: list[float] = []

        def step() -> None:
            losses.append(_baseline_step(trainer, records, trainer.cursor.take(b), gen))

        resident = self.allocated_gib()
        self.reset_peak()
        step_s = self.timed(step)
        peak = self.peak_gib()
        flops = self.count_flops(step)
        what = (
            f"diffusers-example step: JPEG decode + preprocess, VAE encode, both text encoders, policy + reference "
            f"forward, backward, {trainer.cfg.optimizer.name}; {b} pairs/step"
        )
        return self.report_step(
            part, name, what, step_s, flops, peak, resident_gib=resident, last_loss=losses[-1]
        )

    def with_fallback(self, label: str, fn: Callable[[bool], None]) -> None:
        """Run ``fn(gradient_checkpointing)``; on CUDA OOM retry once with gradient checkpointing on; other errors
        are printed and the check goes on with the next variant."""
        tries = [True] if self.args.gradient_checkpointing else [False, True]
        for gc_on in tries:
            try:
                fn(gc_on)
                return
            except torch.OutOfMemoryError:
                log(f"    {label}: CUDA out of memory with gradient checkpointing {'on' if gc_on else 'off'}")
                self.record("oom", label, gradient_checkpointing=gc_on)
            except Exception:
                log(f"    {label}: FAILED")
                traceback.print_exc(file=sys.stdout)
                self.record("error", label, error=traceback.format_exc(limit=3))
                return
            finally:
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    # ---- the parts
    def part_a(self) -> None:
        def run(gc_on: bool) -> None:
            trainer = None
            try:
                src = self.data.source(_needs("diffusion_dpo"))
                trainer = self.trainer("dpo_lora.yaml", "a_lora", [f"data.sources={src}"], gc_on=gc_on)
                log(f"    (a) set up in {elapsed():.0f} s; {self.describe(trainer)}")
                base = self.baseline("a", "dpo-lora baseline", trainer)
                ours = self.ours("a", "dpo-lora ours", trainer)
                ratio = base["step_s"] / ours["step_s"]
                mem = (
                    f", peak memory ours / baseline {ours['peak_gib'] / base['peak_gib']:.2f}"
                    if ours["peak_gib"]
                    else ""
                )
                log(f"[a] speed-up ours vs baseline: {ratio:.2f}x (baseline step / our step){mem}")
                self.record("a", "ratio", speedup=ratio)
            finally:
                self.release(trainer)

        self.with_fallback("(a) dpo-lora", run)

    def part_e(self) -> None:
        """(e) Speed options (issue 13, item 2) on the Diffusion-DPO LoRA step: the per-phase profile of our eager
        step and of the baseline (device-synchronised at phase boundaries: ``benchmarks/dpo_step.py``'s ``Phases``),
        a torch.profiler summary (host vs device time) of one eager step, then each option alone in a fresh trainer:
        ``train.channels_last``, then ``train.compile`` (its warm-up steps include the compilation)."""
        from dpo_step import Phases, _baseline_step, instrument_ours

        from workbench.data import read_records

        src = self.data.source(_needs("diffusion_dpo"))
        variants: list[tuple[str, list[str]]] = [
            ("ours", []),
            ("ours+channels_last", ["train.channels_last=true"]),
            ("ours+compile", ["train.compile=true"]),  # last: the compilation takes minutes
        ]
        chosen = [v.strip() for v in self.args.e_variants.split(",") if v.strip()]
        base_s = None
        for name, over in [v for v in variants if v[0] in chosen]:

            def run(gc_on: bool, name: str = name, over: list[str] = over) -> None:
                nonlocal base_s
                trainer = None
                try:
                    trainer = self.trainer(
                        "dpo_lora.yaml", f"e_{name}", [f"data.sources={src}", *over], gc_on=gc_on
                    )
                    t0 = time.perf_counter()
                    r = self.ours("e", f"dpo-lora {name}", trainer)
                    log(f"    (e) {name}: set-up + warm-up + timed steps {time.perf_counter() - t0:.0f} s")
                    if name != "ours":
                        if base_s is not None:
                            log(f"[e] {name}: {base_s / r['step_s']:.2f}x the diffusers-example step")
                        return
                    records, _ = read_records(trainer.cfg.data.sources)
                    gen = torch.Generator().manual_seed(0)
                    b = trainer.cfg.train.batch_size
                    base = self.baseline("e", "dpo-lora baseline", trainer)
                    base_s = base["step_s"]
                    log(f"[e] ours eager: {base_s / r['step_s']:.2f}x the diffusers-example step")
                    ph_base = Phases(self.device)
                    for _ in range(3):
                        _baseline_step(trainer, records, trainer.cursor.take(b), gen, ph_base)
                    ph = Phases(self.device)
                    instrument_ours(trainer, ph)
                    cfg = trainer.cfg
                    cfg.train.max_steps = trainer.counters.step + 3
                    self.sync()
                    t1 = time.perf_counter()
                    trainer.train()
                    self.sync()
                    ours_total = (time.perf_counter() - t1) / 3
                    for label, p, total in (("baseline", ph_base, None), ("ours", ph, ours_total)):
                        secs = {k: v / 3 for k, v in p.seconds.items()}
                        if total is None:
                            total = sum(secs.values())
                        secs["other"] = max(0.0, total - sum(v for k, v in secs.items() if k != "other"))
                        log(
                            f"[e] phases {label:8s} (s/step, synchronised): "
                            + "  ".join(f"{k} {v:.4f}" for k, v in secs.items())
                            + f"  | step {total:.4f}"
                        )
                        self.record("e", f"phases {label}", seconds=secs, step_s=total)
                    from torch.profiler import ProfilerActivity, profile

                    acts = [ProfilerActivity.CPU] + (
                        [ProfilerActivity.CUDA] if self.device.type == "cuda" else []
                    )
                    cfg.train.max_steps = trainer.counters.step + 1
                    with profile(activities=acts) as prof:
                        trainer.train()
                        self.sync()
                    ev = prof.key_averages()
                    cpu_us = sum(e.self_cpu_time_total for e in ev)
                    dev_us = sum(getattr(e, "self_device_time_total", 0) for e in ev)
                    launches = sum(
                        e.count for e in ev if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel"))
                    )
                    log(
                        f"[e] torch.profiler, one eager step: host (self CPU) {cpu_us / 1e6:.3f} s, device kernels "
                        f"{dev_us / 1e6:.3f} s, kernel launches {launches}"
                    )
                    self.record(
                        "e", "profiler", host_s=cpu_us / 1e6, device_s=dev_us / 1e6, launches=launches
                    )
                    log(
                        prof.key_averages().table(
                            sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50
                        )
                    )
                finally:
                    self.release(trainer)

            self.with_fallback(f"(e) {name}", run)

    def part_b(self) -> None:
        def run(gc_on: bool) -> None:
            trainer = None
            try:
                src = self.data.source(_needs("diffusion_dpo"))
                trainer = self.trainer(
                    "dpo.yaml", "b_full", [f"data.sources={src}", "train.scale_lr=false"], gc_on=gc_on
                )
                self.ours("b", "dpo-full ours", trainer)
            finally:
                self.release(trainer)

        self.with_fallback("(b) dpo-full", run)

    def part_c(self, deadline: float) -> None:
        from trainers import OBJECTIVES

        first = [n for n in ("sft", "npo") if n in OBJECTIVES]
        names = first + [n for n in OBJECTIVES.names() if n not in first and n != "diffusion_dpo"]
        if self.args.objectives:
            names = [n for n in self.args.objectives.split(",") if n]
        log(f"    (c) objectives: {', '.join(names)}")
        for name in names:
            if elapsed() > deadline:
                log(f"    (c) {name}: skipped, past the {deadline:.0f} s deadline for parts a-c")
                self.record("skipped", name)
                continue
            needs = OBJECTIVES.get(name).needs
            if needs.data == "none":
                log(f"    (c) {name}: skipped (needs no preference data; not a cached-data step)")
                continue
            config = f"{name}.yaml" if (ROOT / "configs/sdxl" / f"{name}.yaml").is_file() else "dpo_lora.yaml"

            def run(gc_on: bool, name: str = name, config: str = config, needs: Any = needs) -> None:
                trainer = None
                try:
                    over = [f"data.sources={self.data.source(needs)}"]
                    if config == "dpo_lora.yaml":
                        over.append(f"objective={{name: {name}}}")
                    trainer = self.trainer(config, f"c_{name}", over, gc_on=gc_on)
                    self.ours("c", f"{name} ours", trainer)
                finally:
                    self.release(trainer)

            self.with_fallback(f"(c) {name}", run)

    def part_d(self) -> None:
        try:
            self._hps()
        except Exception:
            log("    (d) hps: FAILED")
            traceback.print_exc(file=sys.stdout)
            self.record("error", "hps", error=traceback.format_exc(limit=3))

    def _hps(self) -> None:
        import numpy as np
        import open_clip
        from PIL import Image
        from score_throughput import RELOAD_SECONDS, _arch, hpsv2_style_score

        from rewards.hps import HPSv21

        a, dev = self.args, self.device
        arch = _arch("tiny" if a.tiny else "ViT-H-14", self.workdir)
        ckpt = self.workdir / "HPS_random.pt"
        t0 = time.perf_counter()
        torch.manual_seed(0)
        with dev:  # random init on the device (seconds); saved in the HPS release layout
            model = open_clip.create_model(arch, pretrained=None, device=dev)
        torch.save({"state_dict": model.state_dict()}, ckpt)
        params = n_params(model)
        del model
        gc.collect()
        log(
            f"    (d) {arch}: {params * 1e3:.0f} M params, random checkpoint "
            f"{ckpt.stat().st_size / 1e9:.2f} GB written in {time.perf_counter() - t0:.1f} s"
        )
        n, size = a.hps_images, self.models.resolution
        g = torch.Generator().manual_seed(0)
        images = (torch.rand(n, 3, size, size, generator=g) * 255).round() / 255
        prompts = [self.data.prompt(i) for i in range(n)]
        t0 = time.perf_counter()
        scorer = HPSv21.from_pretrained(
            str(ckpt), arch=arch, device=str(dev), dtype="float32", batch_size=a.hps_batch
        )
        load_s = time.perf_counter() - t0
        ours_fp32 = None
        for dtype in (
            "bfloat16",
            "float32",
        ):  # the weights stay fp32; the scorer autocasts per call to dtype_option
            scorer.dtype_option = dtype
            with torch.no_grad():
                scorer(images[: a.hps_batch], prompts[: a.hps_batch])  # warm-up
                scorer.text_cache.clear()
                self.sync()
                t0 = time.perf_counter()
                scores = scorer(images, prompts)
                self.sync()
                dt = time.perf_counter() - t0
            rate = n / dt
            log(
                f"[d] hps ours {dtype:9s} {rate:9.1f} images/s   ({n} images of {size} px from host memory, batch "
                f"{a.hps_batch}, prompts encoded in the timed call; one-off load {load_s:.1f} s)"
            )
            self.record("d", f"hps ours {dtype}", images_per_s=rate, load_s=load_s)
            ours_fp32 = scores.float().cpu()
        pil = [
            Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            for x in images[: a.hps_baseline_calls]
        ]
        base: list[float] = []
        self.sync()
        t0 = time.perf_counter()
        for i in range(len(pil)):
            base += hpsv2_style_score(scorer.model, ckpt, arch, [pil[i]], prompts[i], dev)
        self.sync()
        dt = time.perf_counter() - t0
        rate = len(pil) / dt
        reload_s = sum(RELOAD_SECONDS) / len(RELOAD_SECONDS)
        log(
            f"[d] hps hpsv2-style loop   {rate:9.3f} images/s   ({len(pil)} calls x 1 image, fp32; of each call "
            f"{reload_s:.2f} s checkpoint reload)"
        )
        assert ours_fp32 is not None
        diff = (ours_fp32[: len(base)] - torch.tensor(base)).abs().max().item()
        fp32_rate = next(r for r in self.results if r["name"] == "hps ours float32")["images_per_s"]
        bf16_rate = next(r for r in self.results if r["name"] == "hps ours bfloat16")["images_per_s"]
        log(
            f"[d] hps ratio ours / hpsv2-style: {bf16_rate / rate:.0f}x (bf16), {fp32_rate / rate:.0f}x (fp32); "
            f"max |score difference| fp32 vs loop on shared images {diff:.1e}"
        )
        self.record("d", "hps hpsv2-style", images_per_s=rate, reload_s=reload_s, max_abs_diff=diff)
        os.remove(ckpt)


def _needs(name: str) -> Any:
    from trainers import OBJECTIVES

    return OBJECTIVES.get(name).needs


def environment(device: torch.device) -> None:
    import importlib.metadata as md

    versions = []
    for pkg in ("torch", "diffusers", "transformers", "accelerate", "peft", "open_clip_torch", "pydantic"):
        try:
            versions.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            versions.append(f"{pkg} -")
    log("versions: " + ", ".join(versions))
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        log(
            f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
            f"CUDA {torch.version.cuda}; MFU against {PEAK_FLOPS / 1e12:.0f} TFLOP/s dense bf16"
        )
    else:
        log(f"device: {device} (smoke run: times and MFU mean nothing here)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tiny", action="store_true", help="tiny models at 32 px on the CPU (a smoke run in seconds)"
    )
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    p.add_argument("--groups-per-step", type=int, default=2, help="pairs (groups) per step, train.batch_size")
    p.add_argument("--groups", type=int, default=8, help="groups in the synthetic data set")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument(
        "--parts", default="abcd", help="which parts to run, in order (a, b, c, d; e: speed options)"
    )
    p.add_argument("--deadline", type=float, default=210.0, help="seconds after which (c) skips what is left")
    p.add_argument("--objectives", default=None, help="(c): these, comma-separated (default: all registered)")
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="on from the start (default: on OOM)"
    )
    p.add_argument(
        "--e-variants",
        default="ours,ours+channels_last,ours+compile",
        help="(e): which of ours, ours+channels_last, ours+compile (ours also runs the baseline and the profiles)",
    )
    p.add_argument("--hps-images", type=int, default=128)
    p.add_argument("--hps-batch", type=int, default=32)
    p.add_argument("--hps-baseline-calls", type=int, default=4)
    p.add_argument("--json", default=None, help="also write the results here (rewritten after each one)")
    args = p.parse_args()
    if args.tiny:  # a smoke run: every code path once, nothing skipped
        args.hps_images, args.hps_batch, args.hps_baseline_calls = 8, 4, 2
        args.warmup, args.steps, args.deadline = 1, 1, float("inf")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    environment(device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        models = build_models(args.tiny, device, workdir)
        log(
            f"models ({'tiny' if args.tiny else 'SDXL base 1.0 architecture'}, random init, on {device}) built in "
            f"{time.perf_counter() - t0:.1f} s: VAE {n_params(models.vae):.3f} B, text encoders "
            f"{n_params(models.text_encoder):.3f} B + {n_params(models.text_encoder_2):.3f} B params; UNet built "
            "fresh per variant"
        )
        bench = Bench(args, device, models, workdir)
        for part in args.parts:
            log(f"--- part ({part}) at {elapsed():.0f} s")
            if part == "a":
                bench.part_a()
            elif part == "b":
                bench.part_b()
            elif part == "c":
                bench.part_c(args.deadline)
            elif part == "d":
                bench.part_d()
            elif part == "e":
                bench.part_e()
            else:
                raise SystemExit(f"--parts: unknown part {part!r} (use a, b, c, d, e)")
    log(f"done in {elapsed():.0f} s")


if __name__ == "__main__":
    main()
