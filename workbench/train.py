"""The training loop, in one place: setup -> train -> save -> cleanup (torchtune's recipe idea).

Only this module knows optimizers, accelerators, checkpoints and logging; the objective is a pure function looked up
in ``trainers.OBJECTIVES``. Multi-GPU runs go through ``accelerate launch -m workbench train CONFIG`` (DDP, DeepSpeed
and FSDP come from accelerate's own config); nothing distributed is home-made.

Run directory::

    config.resolved.yaml  environment.json  metrics.jsonl  tensorboard/  validation/step_XXXXXX.png
    checkpoints/step_XXXXXX/{lora/ | unet/, training_state/, COMPLETE}   final/{lora/ | unet/, COMPLETE}
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from trainers import OBJECTIVES
from workbench.batch import GroupBatch, flatten_groups, repeat_per_image, unflatten_groups
from workbench.config import RunConfig, resolved_yaml

COMPLETE = "COMPLETE"


class TrainingError(RuntimeError):
    """A run had to stop (non-finite losses, bad data); the last good checkpoint is intact."""


# --------------------------------------------------------------------------------------------------- utilities
def environment_info() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in (
        "torch",
        "diffusers",
        "transformers",
        "accelerate",
        "peft",
        "safetensors",
        "pydantic",
        "open_clip_torch",
    ):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], capture_output=True, text=True, check=False, cwd=Path(__file__).parent
            )
        except OSError:
            return ""
        return out.stdout.strip()

    rev, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain")
    return {
        "python": sys.version.split()[0],
        "packages": versions,
        "git_revision": rev or None,
        "git_dirty": bool(dirty),
    }


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A folder without COMPLETE was interrupted while saving."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / COMPLETE).is_file())


def build_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    if opt.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=opt.betas, weight_decay=opt.weight_decay, eps=opt.eps)
    if opt.name == "adamw_8bit":
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ValueError("optimizer.name=adamw_8bit needs bitsandbytes: pip install '.[gpu]'") from exc
        return bnb.optim.AdamW8bit(params, lr=lr, betas=opt.betas, weight_decay=opt.weight_decay, eps=opt.eps)
    from transformers.optimization import Adafactor

    return Adafactor(
        params,
        lr=lr,
        weight_decay=opt.weight_decay,
        clip_threshold=opt.clip_threshold,
        scale_parameter=False,
        relative_step=False,
    )


def build_lr_lambda(cfg: RunConfig, total_steps: int):
    sch = cfg.scheduler
    warmup = getattr(sch, "warmup_steps", 0)

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if sch.name == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return sch.min_lr_ratio + (1 - sch.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return fn


class DataCursor:
    """Deterministic, resumable data order: a fresh permutation per epoch from (seed, epoch); each process takes
    its own stride of it. ``state_dict`` is saved with every checkpoint (accelerate ``register_for_checkpointing``)."""

    def __init__(self, n: int, seed: int, process_index: int, num_processes: int) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, process_index, num_processes
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        return order[self.rank :: self.world] or order

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.position])
            self.position += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()


class Counters:
    def __init__(self) -> None:
        self.step = 0
        self.nonfinite_total = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "nonfinite_total": self.nonfinite_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.nonfinite_total = int(state["step"]), int(state["nonfinite_total"])


def training_target(
    scheduler: Any, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet is trained to predict: eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022,
    "Progressive Distillation", section 4; diffusers ``get_velocity``) for v-prediction models such as SD2.x-768."""
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, eps, t)
    if prediction_type == "epsilon":
        return eps
    raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")


# ------------------------------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, cfg: RunConfig, *, show_progress: bool = True) -> None:
        self.cfg = cfg
        self.show_progress = show_progress
        self.run_dir = cfg.run_dir
        self.objective = OBJECTIVES.get(cfg.objective.name)

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.cfg
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        log_with = []
        if cfg.logging.tensorboard:
            log_with.append("tensorboard")
        if cfg.logging.wandb_project:
            log_with.append("wandb")
        self.accelerator = acc = Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            log_with=log_with or None,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir)),
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            (self.run_dir / "config.resolved.yaml").write_text(resolved_yaml(cfg))
            (self.run_dir / "environment.json").write_text(json.dumps(environment_info(), indent=2))
        torch.manual_seed(cfg.run.seed)  # LoRA initialisation
        from workbench.models import setup_training_components

        self.components = comps = setup_training_components(cfg.model, device=acc.device)
        if cfg.model.finetune == "lora" and cfg.train.mixed_precision != "no":
            # The frozen base in the AMP dtype, the trainable LoRA weights in fp32 (diffusers' cast_training_params).
            comps.unet.to(dtype=torch.float16 if cfg.train.mixed_precision == "fp16" else torch.bfloat16)
            for p in comps.unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if cfg.train.attention == "xformers":
            comps.unet.enable_xformers_memory_efficient_attention()  # type: ignore[operator]
        if cfg.train.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()  # type: ignore[operator]
        self._setup_data()
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(comps.pipe.scheduler.config)
        params = [p for p in comps.unet.parameters() if p.requires_grad]
        self.trainable = params
        lr = cfg.optimizer.lr
        if cfg.train.scale_lr:
            lr *= cfg.train.gradient_accumulation_steps * cfg.train.batch_size * acc.num_processes
        optimizer = build_optimizer(cfg, params, lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambda(cfg, cfg.train.max_steps))
        self.unet, self.optimizer, self.lr_scheduler = acc.prepare(comps.unet, optimizer, scheduler)
        self.cursor = DataCursor(len(self.cache), cfg.run.seed, acc.process_index, acc.num_processes)
        self.noise_generator = torch.Generator()
        self.counters = Counters()
        for obj in (self.cursor, self.counters):
            acc.register_for_checkpointing(obj)
        self._register_hooks()
        if acc.is_main_process:
            flat = json.loads(json.dumps(cfg.model_dump(mode="json")))
            acc.init_trackers("tensorboard", config=_flatten_for_tb(flat)) if log_with else None
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.base_images: list[Any] | None = None
        self.scorers = self._build_scorers()
        self.objective_kwargs = self._objective_kwargs()

    def _setup_data(self) -> None:
        from workbench.cache import PreferenceCache
        from workbench.data import read_records

        cfg, acc = self.cfg, self.accelerator
        records, report = read_records(
            cfg.data.sources,
            drop_ties=cfg.data.drop_ties,
            max_samples=cfg.data.max_samples,
            pairwise=self.objective.min_images_per_group <= 2,
        )
        self.cache = PreferenceCache(self.components.pipe, self.components.family, cfg.data)
        with acc.main_process_first():
            self.cache.build(records, report, show_progress=self.show_progress and acc.is_local_main_process)
        self.read_report = report
        if acc.is_main_process and report.skipped:
            print(f"[data] {report.summary()}", file=sys.stderr)
            (self.run_dir / "skipped_rows.jsonl").write_text(
                "".join(json.dumps({"row": r, "reason": why}) + "\n" for r, why in report.skipped)
            )

    def _register_hooks(self) -> None:
        """accelerate's save_state writes the full UNet by default; for LoRA runs save only the adapter."""
        if self.cfg.model.finetune != "lora":
            return
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        from workbench.models import peft_lora_state_dict

        def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
            for _ in range(len(weights)):
                weights.pop()
            unet = self.accelerator.unwrap_model(self.unet)
            state = {k: v.detach().cpu().contiguous() for k, v in peft_lora_state_dict(unet).items()}
            save_file(state, os.path.join(output_dir, "adapter.safetensors"))

        def load_hook(models: list[Any], input_dir: str) -> None:
            while models:
                models.pop()
            unet = self.accelerator.unwrap_model(self.unet)
            set_peft_model_state_dict(unet, load_file(os.path.join(input_dir, "adapter.safetensors")))

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

    def _build_scorers(self) -> dict[str, Any]:
        names = self.cfg.validation.scorers
        if not names or not self.accelerator.is_main_process:
            return {}
        import rewards

        return {n: rewards.build_scorer(n, **self.cfg.validation.scorer_options.get(n, {})) for n in names}

    # -------------------------------------------------------------------------------------------- one step
    def reseed(self, step: int) -> None:
        """Every random draw of a step (timesteps, noise, posterior samples, prompt dropout) comes from a generator
        seeded by (run seed, process, step): exact resume needs no saved generator state, and each process of a
        multi-GPU run draws its own noise."""
        rank = self.accelerator.process_index
        self.noise_generator.manual_seed((self.cfg.run.seed * 1_000_003 + rank) * 1_000_033 + step)

    def predictions(
        self, batch: GroupBatch, *, with_reference: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Noise the group (one timestep per group, noise shared by its K images unless configured otherwise), run
        the policy on all K images in one forward and the reference without gradients. Returns policy and reference
        predictions and the target, each ``[B, K, C, h, w]``."""
        cfg, acc = self.cfg, self.accelerator
        g = self.noise_generator
        b, k = batch.shape
        device = acc.device
        x0 = batch.latents.to(device)  # [B, K, C, h, w]
        nz = cfg.noising
        t = torch.randint(nz.t_min, nz.t_max, (b,), generator=g)  # one timestep per group
        if nz.share_noise:
            eps = torch.randn((b, 1, *x0.shape[2:]), generator=g).expand(
                -1, k, -1, -1, -1
            )  # shared by the group
        else:
            eps = torch.randn(x0.shape, generator=g)
        eps = eps.to(device)
        t_flat = repeat_per_image(t, k).to(device)  # [B*K]
        x0_flat, eps_flat = flatten_groups(x0), flatten_groups(eps.contiguous())
        x_t = self.noise_scheduler.add_noise(x0_flat, eps_flat, t_flat)
        target = training_target(
            self.noise_scheduler, x0_flat, eps_flat, t_flat, self.components.prediction_type
        )
        cond: dict[str, Any] = {"encoder_hidden_states": repeat_per_image(batch.prompt_embeds, k).to(device)}
        if batch.pooled_embeds is not None and batch.time_ids is not None:
            cond["added_cond_kwargs"] = {
                "text_embeds": repeat_per_image(batch.pooled_embeds, k).to(device),
                "time_ids": repeat_per_image(batch.time_ids, k).to(device),
            }
        with acc.autocast():
            pred = self.unet(x_t, t_flat, **cond).sample  # all K images of every group in one forward
        ref_pred = self._reference_prediction(x_t, t_flat, cond) if with_reference else None
        return (
            unflatten_groups(pred, k),
            None if ref_pred is None else unflatten_groups(ref_pred, k),
            unflatten_groups(target, k),
        )

    def compute_loss(self, batch: GroupBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pred, ref_pred, target = self.predictions(batch, with_reference=self.objective.needs_reference)
        return self.objective.loss_fn(pred, ref_pred, target, **self.objective_kwargs)

    @torch.no_grad()
    def implicit_accuracy(self, *, draws: int = 4, batch_size: int = 16, seed: int = 12345) -> float:
        """Implicit-reward preference accuracy on the cached pairs (Diffusion-DPO paper, Supp. S4.1: the reward
        difference of two images is ``beta * [(err_ref(w) - err(w)) - (err_ref(l) - err(l))]``, averaged here over
        ``draws`` fixed (t, eps) draws per pair). Exact ties count half, so a model equal to its reference scores 0.5.
        """
        from trainers.base import per_sample_error

        unet = self.accelerator.unwrap_model(self.unet)
        was_training = unet.training
        unet.eval()
        margins = torch.zeros(len(self.cache))
        try:
            for d in range(draws):
                for start in range(0, len(self.cache), batch_size):
                    idx = list(range(start, min(len(self.cache), start + batch_size)))
                    self.noise_generator.manual_seed(seed + 1_000_003 * d + start)
                    batch = self.cache.batch(idx, self.noise_generator, empty_prompt_prob=0.0, hflip=False)
                    pred, ref, target = self.predictions(batch)
                    assert ref is not None
                    gap = per_sample_error(ref[:, :2], target[:, :2]) - per_sample_error(
                        pred[:, :2], target[:, :2]
                    )
                    margins[idx] += (
                        gap[:, 0] - gap[:, 1]
                    ).cpu() / draws  # > 0: the policy prefers the winner
        finally:
            unet.train(was_training)
        return float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean())

    @torch.no_grad()
    def _reference_prediction(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        comps = self.components
        if comps.reference is not None:  # full fine-tune: frozen reduced-precision copy
            ref = comps.reference
            dtype = next(ref.parameters()).dtype
            cast = {"encoder_hidden_states": cond["encoder_hidden_states"].to(dtype)}
            if "added_cond_kwargs" in cond:
                cast["added_cond_kwargs"] = {k: v.to(dtype) for k, v in cond["added_cond_kwargs"].items()}
            with self.accelerator.autocast():
                return ref(x_t.to(dtype), t, **cast).sample.float()
        unet = self.accelerator.unwrap_model(self.unet)
        unet.disable_adapters()  # the reference is the same UNet without its LoRA (no second copy)
        try:
            with self.accelerator.autocast():
                return self.unet(x_t, t, **cond).sample.float()
        finally:
            unet.enable_adapters()

    def _objective_kwargs(self) -> dict[str, Any]:
        ocfg = self.cfg.objective
        if ocfg.name == "diffusion_dpo":
            from trainers.diffusion_dpo import beta_from_convention

            lat = self.cache.batch(
                [0], torch.Generator().manual_seed(0), empty_prompt_prob=0, hflip=False
            ).latents
            beta = beta_from_convention(ocfg.beta, ocfg.beta_convention, int(lat[0, 0].numel()))
            return {"beta": beta, "sft_weight": ocfg.sft_weight}
        return {}

    # ---------------------------------------------------------------------------------------------- the loop
    def train(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        self._maybe_resume()
        ga = cfg.train.gradient_accumulation_steps
        bs = cfg.train.batch_size
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.train.max_steps,
            initial=self.counters.step,
            desc="train",
            disable=not (self.show_progress and acc.is_local_main_process),
        )
        interrupted = {"flag": False}

        def on_term(signum: int, frame: Any) -> None:
            interrupted["flag"] = True

        old_term = signal.signal(signal.SIGTERM, on_term) if _in_main_thread() else None
        nonfinite_in_row = 0
        t_last = time.perf_counter()
        try:
            while self.counters.step < cfg.train.max_steps:
                if interrupted["flag"]:
                    raise KeyboardInterrupt
                sums: dict[str, float] = {}
                loss_sum, bad = 0.0, False
                self.reseed(self.counters.step)
                for micro in range(ga):
                    indices = self.cursor.take(bs)
                    batch = self.cache.batch(
                        indices,
                        self.noise_generator,
                        empty_prompt_prob=cfg.data.proportion_empty_prompts,
                        hflip=cfg.data.hflip,
                    )
                    sync = micro == ga - 1
                    ctx = nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(self.unet)
                    with ctx:
                        loss, metrics = self.compute_loss(batch)
                        finite = bool(acc.gather(torch.isfinite(loss.detach()).reshape(1)).all())
                        if not finite:
                            bad = True
                            continue
                        acc.backward(loss / ga)
                    loss_sum += float(loss.detach()) / ga
                    for key, v in metrics.items():
                        sums[key] = sums.get(key, 0.0) + float(v) / ga
                if bad:
                    self.optimizer.zero_grad(set_to_none=True)
                    nonfinite_in_row += 1
                    self.counters.nonfinite_total += 1
                    print(
                        f"[train] non-finite loss at step {self.counters.step}: step skipped", file=sys.stderr
                    )
                    if nonfinite_in_row >= cfg.train.max_nonfinite_steps:
                        raise TrainingError(
                            f"{nonfinite_in_row} non-finite losses in a row at step {self.counters.step}; stopping. "
                            f"The last good checkpoint is intact in {self.run_dir / 'checkpoints'}. Lower the "
                            "learning rate, check the data, or use bf16 instead of fp16."
                        )
                    continue
                nonfinite_in_row = 0
                grad_norm = None
                if cfg.train.max_grad_norm is not None and cfg.optimizer.name != "adafactor":
                    grad_norm = acc.clip_grad_norm_(self.trainable, cfg.train.max_grad_norm)
                lr_used = self.lr_scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.counters.step += 1
                step = self.counters.step
                now = time.perf_counter()
                record = {"step": step, "train/loss": loss_sum, **sums}
                record["train/lr"] = lr_used
                record["train/steps_per_s"] = 1.0 / max(now - t_last, 1e-9)
                record["train/nonfinite_total"] = self.counters.nonfinite_total
                if grad_norm is not None:
                    record["train/grad_norm"] = float(grad_norm)
                t_last = now
                if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                    self._log(record)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_sum:.4f}",
                    acc=f"{sums.get('dpo/implicit_acc', float('nan')):.2f}",
                    lr=f"{record['train/lr']:.2e}",
                )
                if cfg.validation.every and step % cfg.validation.every == 0:
                    self.validate(step)
                if step % cfg.train.checkpoint_every == 0 and step < cfg.train.max_steps:
                    self.save_checkpoint(step)
        except KeyboardInterrupt:
            bar.close()
            if self.counters.step > 0:
                path = self.save_checkpoint(self.counters.step)
                print(f"[train] interrupted: saved {path}; resume with train.resume=latest", file=sys.stderr)
            raise
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
        bar.close()
        if not cfg.validation.every or self.counters.step % cfg.validation.every:
            self.validate(self.counters.step)
        self.save_final()
        acc.end_training()
        return self.run_dir

    def _maybe_resume(self) -> None:
        resume = self.cfg.train.resume
        if not resume:
            return
        if resume == "latest":
            ckpts = list_checkpoints(self.run_dir)
            if not ckpts:
                print(f"[train] resume=latest: no complete checkpoint in {self.run_dir}; starting fresh")
                return
            path = ckpts[-1]
        else:
            path = Path(resume)
            if not (path / COMPLETE).is_file():
                raise TrainingError(
                    f"train.resume: {path} is not a complete checkpoint (no {COMPLETE} marker)"
                )
        self.accelerator.load_state(str(path / "training_state"))
        print(f"[train] resumed from {path} at step {self.counters.step}", file=sys.stderr)

    def _log(self, record: dict[str, Any]) -> None:
        acc = self.accelerator
        if not acc.is_main_process:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if acc.trackers:
            acc.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    # ---------------------------------------------------------------------------------------------- outputs
    def _export_weights(self, directory: Path) -> None:
        from workbench.models import save_lora

        unet = self.accelerator.unwrap_model(self.unet)
        if self.cfg.model.finetune == "lora":
            save_lora(unet, directory / "lora", self.components.family)
        else:
            unet.save_pretrained(str(directory / "unet"), safe_serialization=True)

    def save_checkpoint(self, step: int) -> Path:
        acc = self.accelerator
        final = self.run_dir / "checkpoints" / f"step_{step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "training_state"))
        if acc.is_main_process:
            self._export_weights(tmp)
            (tmp / COMPLETE).write_text(f"step {step}\n")  # written last: a checkpoint without it is ignored
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in list_checkpoints(self.run_dir)[: -self.cfg.train.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def save_final(self) -> Path:
        acc = self.accelerator
        final = self.run_dir / "final"
        if acc.is_main_process:
            tmp = final.with_name("final.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._export_weights(tmp)
            (tmp / COMPLETE).write_text(f"step {self.counters.step}\n")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        acc.wait_for_everyone()
        return final

    # -------------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self, step: int) -> Path | None:
        """Fixed prompts x seeds, base and tuned from identical initial noise (one generator per image)."""
        vcfg = self.cfg.validation
        acc = self.accelerator
        if not vcfg.prompts or not acc.is_main_process:
            return None
        pipe = self.components.pipe
        unet = acc.unwrap_model(self.unet)
        res = self.cfg.data.resolution
        jobs = [(p, s) for p in vcfg.prompts for s in vcfg.seeds]

        def render() -> list[Any]:
            return [
                pipe(
                    prompt=p,
                    num_inference_steps=vcfg.num_inference_steps,
                    guidance_scale=vcfg.guidance_scale,
                    height=res,
                    width=res,
                    generator=torch.Generator().manual_seed(s),
                ).images[0]
                for p, s in jobs
            ]

        original_unet = pipe.unet
        was_training = unet.training
        unet.eval()
        pipe.set_progress_bar_config(disable=True)
        try:
            if self.base_images is None:  # the base never changes: render it once
                if self.components.reference is not None:
                    pipe.unet = self.components.reference
                else:
                    pipe.unet = unet
                    unet.disable_adapters()
                try:
                    self.base_images = render()
                finally:
                    if self.components.reference is None:
                        unet.enable_adapters()
            pipe.unet = unet
            tuned = render()
        finally:
            pipe.unet = original_unet
            unet.train(was_training)
        out_dir = self.run_dir / "validation"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{step:06d}.png"
        side_by_side_grid(self.base_images, tuned, [f"{p[:24]} s{s}" for p, s in jobs]).save(path)
        record: dict[str, Any] = {"step": step}
        if self.scorers:
            import numpy as np

            prompts = [p for p, _ in jobs]
            for name, scorer in self.scorers.items():
                for tag, imgs in (("reward", tuned), ("reward_base", self.base_images)):
                    x = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in imgs]))
                    record[f"{tag}/{name}"] = float(scorer(x.permute(0, 3, 1, 2), prompts).float().mean())
            self._log(record)
        return path


def side_by_side_grid(base: list[Any], tuned: list[Any], labels: list[str]) -> Any:
    """Two rows: base on top, tuned below, one column per (prompt, seed); labels under each column."""
    from PIL import Image, ImageDraw

    w, h = base[0].size
    label_h = 12
    grid = Image.new("RGB", (w * len(base), 2 * h + label_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (b, t) in enumerate(zip(base, tuned)):
        grid.paste(b, (i * w, 0))
        grid.paste(t, (i * w, h))
        draw.text((i * w + 1, 2 * h), labels[i][: max(1, w // 6)], fill="black")
    return grid


def _flatten_for_tb(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten_for_tb(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(cfg: RunConfig, *, show_progress: bool = True) -> Path:
    """Run a training job end to end; returns the run directory."""
    trainer = Trainer(cfg, show_progress=show_progress)
    trainer.setup()
    return trainer.train()
