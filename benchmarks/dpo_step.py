"""Diffusion-DPO LoRA step: the workbench step against the diffusers example's step, side by side, at two sizes, with
a per-phase profile, the speed options measured one at a time, and the FLOPs of each phase at real SDXL size.

Both steps run on the same model, data, LoRA (r8 on attention: the example's ``to_q/to_k/to_v/to_out.0``), AdamW,
beta 5000 and batch, each variant in its own child process (so peak RSS is per variant); the variants alternate for
``--rounds`` rounds and the best median of each is kept, so a busy machine hurts all alike.

* ``baseline``: the step as ``train_diffusion_dpo_sdxl.py`` writes it (:func:`_baseline_step`): decode and
  preprocess both images of every pair, VAE-encode them and run both text encoders on every step, then the policy
  forward, the LoRA-disabled reference forward, the loss, backward and the optimizer step.
* ``ours``: ``workbench.train.Trainer.train()`` itself, the production loop (cached VAE posterior and text embeddings,
  all images of a group in one forward, reference = LoRA disabled without gradient, gradient clipping, metrics and
  bookkeeping), timed over ``--steps`` optimizer steps after ``--warmup``.
* ``ours+<option>``: the same with one speed option on (``train.compile``, ``train.channels_last``,
  ``optimizer.implementation=foreach|fused``), or the memory option ``train.gradient_checkpointing`` (its speed
  cost); ``ours+all`` = compile, channels-last and foreach at once.

Sizes: ``toy`` is the committed toy pipeline (the objective gym's model, SDXL-architecture, 32 px, 8 pairs per step:
the setting the issue measured); ``mid`` is SDXL's block structure (``layers_per_block`` 2, transformer depths
(1, 2, 10), three levels, a four-level VAE, two text encoders with a pooled projection) at about a tenth of its width,
on 64x64 latents (512 px images), 2 pairs per step, built from config by ``workbench.tiny``.

``--profile`` adds, for ``ours`` and ``baseline``, the share of step time in each phase (data loading and
preprocessing, VAE, text encoders, policy forward, backward, reference forward, optimizer, other = the rest of the
step, Python overhead included) and the FLOPs of each phase at this size (``torch.utils.flop_counter``).
``--sdxl-flops`` prints the same phase FLOPs at real SDXL size (UNet 2.57 B, 1024 px, counted on the meta device:
nothing is allocated), with an activation-memory estimate (bytes autograd saves for backward, also on meta), so the
ratio to expect on a GPU is on record beside what a CPU measures (``benchmarks/sdxl_estimate.py``).

Usage::

    python benchmarks/dpo_step.py                                   # both sizes, ours vs baseline, 2 rounds
    python benchmarks/dpo_step.py --sizes toy --variants ours,ours+compile,ours+foreach --profile
    python benchmarks/dpo_step.py --sdxl-flops
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

OPTIONS: dict[str, list[str]] = {
    "ours": [],
    "ours+compile": ["train.compile=true"],
    "ours+channels_last": ["train.channels_last=true"],
    "ours+foreach": ["optimizer.implementation=foreach"],
    "ours+fused": ["optimizer.implementation=fused"],
    "ours+grad_ckpt": ["train.gradient_checkpointing=true"],  # a memory option: its speed cost, measured
    "ours+all": ["train.compile=true", "train.channels_last=true", "optimizer.implementation=foreach"],
}
SIZES: dict[str, dict[str, Any]] = {
    "toy": {"pairs": 8, "resolution": 32, "what": "toy pipeline (SDXL architecture, 32 px)"},
    "mid": {
        "pairs": 2,
        "resolution": 512,
        "what": "SDXL block structure at ~1/10 width, 64x64 latents (512 px)",
    },
}
PHASES = ("data", "vae", "text", "policy_fwd", "backward", "ref_fwd", "optimizer", "other")


def mid_spec() -> Any:
    """SDXL base 1.0's UNet block structure at about a tenth of its width (320/640/1280 -> 32/64/128 channels, head
    dim 64 kept), its VAE's four levels at an eighth (128/256/512/512 -> 16/32/64/64), and two text encoders at a
    tenth of their widths (768 / 1280 -> 64 / 128) with fewer layers: 512 px images, 64x64 latents."""
    from workbench.tiny import TinySpec

    return TinySpec(
        family="sdxl",
        resolution=512,
        unet_channels=(32, 64, 128),
        layers_per_block=2,
        attention_head_dim=(1, 1, 2),
        transformer_layers=(1, 2, 10),
        norm_num_groups=32,
        vae_channels=(16, 32, 64, 64),
        vae_norm_groups=16,
        text_hidden=64,
        text_hidden_2=128,
        text_layers=4,
        text_heads=4,
        text_ffn=256,
        text_max_length=77,
        pooled_dim=128,
        addition_time_embed_dim=32,
    )


# ------------------------------------------------------------------------------------------------- phase timer
class Phases:
    """Wall time (device-synchronised) and FLOPs accumulated per phase; ``other`` is the step's remainder."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.flops: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.counter: Any = None  # a FlopCounterMode while FLOPs are counted
        self.active: str | None = None

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _count(self) -> float:
        return float(self.counter.get_total_flops()) if self.counter is not None else 0.0

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if (
            self.active is not None
        ):  # nested (e.g. the reference's UNet call inside ref_fwd): the outer one counts
            yield
            return
        self._sync()
        self.active, t0, f0 = name, time.perf_counter(), self._count()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - t0
            self.flops[name] += self._count() - f0
            self.active = None

    def wrap(self, obj: Any, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self(name):
                return fn(*args, **kwargs)

        setattr(obj, attr, timed)


def instrument_ours(trainer: Any, ph: Phases) -> None:
    """Phase wrappers on the trainer's own objects (the loop itself is untouched): the cached batch, the UNet call
    (policy forward unless the reference is running), the reference, backward and the optimizer (clip + step)."""
    ph.wrap(trainer.cache, "batch", "data")
    ph.wrap(trainer.reference, "predict", "ref_fwd")
    ph.wrap(trainer.accelerator, "backward", "backward")
    ph.wrap(trainer.accelerator, "clip_grad_norm_", "optimizer")
    ph.wrap(trainer.optimizer, "step", "optimizer")
    ph.wrap(trainer.optimizer, "zero_grad", "optimizer")
    unet = trainer.unet
    forward = unet.forward

    def policy_forward(*args: Any, **kwargs: Any) -> Any:
        with ph("policy_fwd"):
            return forward(*args, **kwargs)

    unet.forward = policy_forward


# --------------------------------------------------------------------------------------------------- the steps
def _baseline_step(
    trainer: Any, records: Any, indices: list[int], gen: Any, ph: Phases | None = None
) -> float:
    """One step written the way the diffusers SDXL DPO example does it (encode everything every step)."""
    import torch
    import torch.nn.functional as F

    from workbench.data import load_image, preprocess_group

    phase: Callable[[str], Any] = ph if ph is not None else (lambda name: nullcontext())
    comps, acc = trainer.components, trainer.accelerator
    pipe, unet = comps.pipe, trainer.unet
    res = trainer.cfg.data.resolution
    with phase("data"):
        groups = [preprocess_group([load_image(s) for s in records[i].images], res) for i in indices]
        pixels = torch.stack([g[0] for g in groups])  # [B, 2, 3, H, W]
        # the example's layout: [w_1..w_B, l_1..l_B]
        feed = torch.cat([pixels[:, 0], pixels[:, 1]]).to(acc.device)  # the example's .to(accelerator.device)
    with torch.no_grad():
        with phase("vae"):
            latents = pipe.vae.encode(feed.to(pipe.vae.dtype)).latent_dist.sample(generator=gen)
            latents = latents * pipe.vae.config.scaling_factor
        with phase("text"):
            prompts = [records[i].prompt for i in indices]
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts, device=acc.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
    b = len(indices)
    noise = torch.randn(latents[:b].shape, generator=gen).to(acc.device).repeat(2, 1, 1, 1)
    t = torch.randint(0, 1000, (b,), generator=gen).to(acc.device).repeat(2)
    x_t = trainer.noise_scheduler.add_noise(latents, noise, t)
    time_ids = (
        torch.tensor(
            [[g[1].original_size[0], g[1].original_size[1], *g[1].crop_top_left, res, res] for g in groups]
        )
        .float()
        .to(acc.device)
    )
    cond = {
        "encoder_hidden_states": embeds.repeat(2, 1, 1),
        "added_cond_kwargs": {"text_embeds": pooled.repeat(2, 1), "time_ids": time_ids.repeat(2, 1)},
    }
    with phase("policy_fwd"), acc.autocast():
        pred = unet(x_t, t, **cond).sample
    m = acc.unwrap_model(unet)
    with phase("ref_fwd"):
        m.disable_adapters()
        with torch.no_grad(), acc.autocast():
            ref = unet(x_t, t, **cond).sample
        m.enable_adapters()
    err = (pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
    ref_err = (ref.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
    mw, ml = err.chunk(2)
    rw, rl = ref_err.chunk(2)
    loss = -F.logsigmoid(-0.5 * 5000 * ((mw - ml) - (rw - rl))).mean()
    with phase("backward"):
        acc.backward(loss)
    with phase("optimizer"):
        acc.clip_grad_norm_(trainer.trainable, 1.0)  # the example clips at --max_grad_norm 1.0 too
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _pipeline_and_data(size: str, workdir: Path) -> tuple[Path, Path]:
    from workbench.commands.demo import render_pairs

    spec = SIZES[size]
    data = workdir / f"pairs_{size}.parquet"
    if not data.is_file():
        render_pairs(data, 48, 0, resolution=spec["resolution"], split="gym_train")
    if size == "toy":
        return ROOT / "workbench/toy/assets/pipeline", data
    from workbench.tiny import save_tiny_pipeline

    pipe = workdir / "mid_pipeline"
    if not (pipe / "model_index.json").is_file():
        save_tiny_pipeline(mid_spec(), pipe)
    return pipe, data


def _trainer(size: str, workdir: Path, variant: str, pairs: int) -> Any:
    from workbench.config import load_config
    from workbench.train import Trainer

    pipeline, data = _pipeline_and_data(size, workdir)
    overrides = [
        f"model.source={pipeline}",
        "model.lora.target_modules=[to_q, to_k, to_v, to_out.0]",  # the diffusers example's LoRA targets
        f"data.sources=[{{format: pickapic_parquet, path: '{data}'}}]",
        f"data.cache.dir={workdir / ('cache_' + size)}",
        f"data.resolution={SIZES[size]['resolution']}",
        f"train.batch_size={pairs}",
        "train.max_steps=1",
        "train.checkpoint_every=1000000",
        "train.log_every=1",
        "objective.beta=5000",
        "optimizer.weight_decay=0.01",
        f"run.output_dir={workdir / 'runs'}",
        f"run.name={size}_{variant.replace('+', '_')}",
        "train.overwrite=true",  # scratch runs: BENCH_WORKDIR may hold the last invocation's
        "validation.prompts=[]",
        *([] if variant == "baseline" else OPTIONS[variant]),
    ]
    cfg = load_config(ROOT / "configs/toy/dpo.yaml", overrides)
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()  # the cache is built here, outside the timed steps
    trainer.save_final = lambda: trainer.run_dir  # type: ignore[method-assign]  # no weights written after timing
    return trainer


def _run_ours(trainer: Any, steps: int) -> float:
    """``steps`` optimizer steps of the production loop; seconds per step."""
    trainer.cfg.train.max_steps = trainer.counters.step + steps
    t0 = time.perf_counter()
    trainer.train()
    return (time.perf_counter() - t0) / steps


def child(size: str, variant: str, steps: int, warmup: int, pairs: int, profile: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", str(os.cpu_count() or 2))))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(os.environ.get("BENCH_WORKDIR", tmp))
        trainer = _trainer(size, workdir, variant, pairs)
        device = trainer.accelerator.device
        out: dict[str, Any] = {"size": size, "variant": variant}
        if variant == "baseline":
            from workbench.data import read_records

            records, _ = read_records(trainer.cfg.data.sources)
            gen = torch.Generator().manual_seed(0)
            times = []
            for i in range(warmup + steps):
                t0 = time.perf_counter()
                _baseline_step(trainer, records, trainer.cursor.take(pairs), gen)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            out["step_s"] = statistics.median(times)

            def profiled(ph: Phases) -> None:
                _baseline_step(trainer, records, trainer.cursor.take(pairs), gen, ph)

        else:
            t0 = time.perf_counter()
            _run_ours(trainer, warmup)  # compilation, when on, happens here
            out["warmup_s"] = time.perf_counter() - t0
            _run_ours(trainer, steps)
            records = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
            # the loop's own per-step clock (train/steps_per_s), over the timed steps
            out["step_s"] = statistics.median(1.0 / r["train/steps_per_s"] for r in records[-steps:])
            profiled = None
            if profile and variant == "ours":
                instrument_ours(trainer, phases := Phases(device))

                def profiled(ph: Phases, n: int = 1) -> None:
                    assert ph is phases
                    _run_ours(trainer, n)

        if profile and profiled is not None:
            ph = phases if variant != "baseline" else Phases(device)
            n = max(2, steps // 2)
            t0 = time.perf_counter()
            if variant == "baseline":
                for _ in range(n):
                    profiled(ph)
            else:
                profiled(ph, n)  # one call of the loop for n steps
            total = (time.perf_counter() - t0) / n
            shares = {k: v / n for k, v in ph.seconds.items()}
            shares["other"] = max(0.0, total - sum(shares.values()))
            from torch.utils.flop_counter import FlopCounterMode

            ph.seconds = dict.fromkeys(PHASES, 0.0)
            with FlopCounterMode(display=False) as counter:
                ph.counter = counter
                profiled(ph)
            ph.counter = None
            out["profile"] = {"step_s": total, "seconds": shares, "flops": ph.flops}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ------------------------------------------------------------------------------------------------------ report
def _profile_table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    cols = [r for r in results.values() if "profile" in r]
    if not cols:
        return lines
    head = f"{'phase':12s}" + "".join(f" {r['variant'] + ' s':>14s} {'%':>5s} {'GFLOP':>9s}" for r in cols)
    lines.append(head)
    for phase in PHASES:
        row = f"{phase:12s}"
        for r in cols:
            p = r["profile"]
            s = p["seconds"][phase]
            row += f" {s:14.4f} {100 * s / p['step_s']:5.1f} {p['flops'][phase] / 1e9:9.3f}"
        lines.append(row)
    row = f"{'step':12s}"
    for r in cols:
        p = r["profile"]
        row += f" {p['step_s']:14.4f} {100.0:5.1f} {sum(p['flops'].values()) / 1e9:9.3f}"
    lines.append(row)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="toy,mid", help="comma-separated: toy, mid")
    p.add_argument(
        "--variants", default="ours", help=f"ours variants besides the baseline: {', '.join(OPTIONS)}"
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs", type=int, default=None, help="pairs per step (default: 8 toy, 2 mid)")
    p.add_argument(
        "--rounds", type=int, default=2, help="alternate the variants this many times; keep the best"
    )
    p.add_argument("--profile", action="store_true", help="per-phase time and FLOPs for ours and baseline")
    p.add_argument(
        "--sdxl-flops", action="store_true", help="phase FLOPs + memory estimate at real SDXL size"
    )
    p.add_argument("--json", default=None, help="also write every result here")
    p.add_argument("--child", nargs=2, metavar=("SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        size, variant = args.child
        pairs = args.pairs or SIZES[size]["pairs"]
        print(json.dumps(child(size, variant, args.steps, args.warmup, pairs, args.profile)))
        return
    variants = ["baseline", *[v.strip() for v in args.variants.split(",") if v.strip()]]
    unknown = [v for v in variants[1:] if v not in OPTIONS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(OPTIONS)}")
    everything: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dpo-step-") as shared:
        for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
            if size not in SIZES:
                raise SystemExit(f"--sizes: unknown {size!r}; choose from {', '.join(SIZES)}")
            pairs = args.pairs or SIZES[size]["pairs"]
            results: dict[str, dict[str, Any]] = {}
            for rnd in range(args.rounds):
                for variant in variants:  # alternating, so a busy machine hurts every variant alike
                    cmd = [sys.executable, __file__, "--child", size, variant, "--steps", str(args.steps)]
                    cmd += ["--warmup", str(args.warmup), "--pairs", str(pairs)]
                    if args.profile and rnd == 0 and variant in ("baseline", "ours"):
                        cmd.append("--profile")
                    proc = subprocess.run(
                        cmd,
                        capture_output=True,
                        text=True,
                        cwd=ROOT,
                        env={**os.environ, "BENCH_WORKDIR": shared},
                    )
                    if proc.returncode != 0:
                        print(f"[{size}] {variant}: FAILED\n{proc.stderr[-3000:]}", flush=True)
                        continue
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    everything.append(r)
                    best = results.get(variant)
                    if best is None or r["step_s"] < best["step_s"]:
                        if best is not None and "profile" in best:
                            r["profile"] = best["profile"]
                        results[variant] = r
            _report(size, pairs, args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))
    if args.sdxl_flops:
        from sdxl_estimate import report

        report(pairs=2)


def _report(size: str, pairs: int, args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    base = results.get("baseline")
    print(
        f"\n== {size}: {SIZES[size]['what']}, {pairs} pairs/step, LoRA r8 on attention, AdamW, median of "
        f"{args.steps} steps after {args.warmup} warm-up, best of {args.rounds} alternating rounds",
        flush=True,
    )
    print(f"{'variant':20s} {'step (s)':>10s} {'speed-up':>9s} {'peak RSS (MB)':>14s} {'RSS ratio':>9s}")
    for variant, r in results.items():
        speed = f"{base['step_s'] / r['step_s']:8.2f}x" if base else "      n/a"
        mem = f"{r['peak_rss_mb'] / base['peak_rss_mb']:9.2f}" if base else "      n/a"
        extra = f"   (warm-up incl. compile {r['warmup_s']:.0f} s)" if "compile" in variant else ""
        print(f"{variant:20s} {r['step_s']:10.4f} {speed} {r['peak_rss_mb']:14.0f} {mem}{extra}")
    lines = _profile_table(results)
    if lines:
        print(f"\nper-phase profile ({size}; seconds per step, share, GFLOP per step at this size):")
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
