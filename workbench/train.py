"""The training loop, in one place: setup -> train -> save -> cleanup (torchtune's recipe idea).

Only this module orchestrates optimizers, the accelerator, checkpoints and logging; everything else is looked up
from the objective's spec (``trainers.OBJECTIVES``): its loss (built from its config), its needs from the data, its
default noising (``samplers.noising.NOISING``), its reference (``workbench.references.REFERENCES``), its implicit
reward margin and its progress metrics. The loop never names an objective. Multi-GPU runs go through
``accelerate launch -m workbench train CONFIG`` (DDP, DeepSpeed and FSDP come from accelerate's own config);
nothing distributed is home-made. Pieces with a job of their own live beside it: :mod:`workbench.optim` (optimizers,
the lr schedule), :mod:`workbench.checkpointing` (cursor, counters, atomic saves), :mod:`workbench.validation`
(same-seed grids through the one renderer).

Run directory (its safety rules, overwrite and resume, are :mod:`workbench.rundir`'s)::

    config.resolved.yaml  environment.json  metrics.jsonl  tensorboard/  validation/step_XXXXXX.png
    config.resolved.resume-XXXXXX.yaml  resume_log.jsonl  (one per resume)
    checkpoints/step_XXXXXX/{lora/ | unet/, training_state/, manifest.json, COMPLETE}   final/{lora/ | unet/, COMPLETE}
    rescued/step_XXXXXX/  (the weights alone, after a checkpoint write failed)
"""

from __future__ import annotations

import json
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

from samplers.noising import NOISING, BatchRows, NoisingContext, noising_config
from trainers import OBJECTIVES, ObjectiveContext, Predictions
from trainers.base import Needs
from workbench.batch import GroupBatch, first_column, flatten_groups, repeat_per_image, unflatten_groups
from workbench.checkpointing import (
    COMPLETE,
    CheckpointWriteError,
    CorruptFileError,
    Counters,
    DataCursor,
    ResumeState,
    accelerate_view,
    fault_point,
    list_checkpoints,
    restore_rng,
    save_checkpoint,
    save_final,
    trainer_state,
    verify_checkpoint,
)
from workbench.config import RunConfig
from workbench.distributed import check_launch
from workbench.optim import base_lr, build_optimizer, lr_factor, set_lr
from workbench.references import REFERENCES, reference_dtype, reference_for
from workbench.rundir import check_run_dir, clear_run_outputs, start_records
from workbench.validation import Validator, side_by_side_grid

__all__ = [
    "COMPLETE",
    "Trainer",
    "TrainingError",
    "list_checkpoints",
    "side_by_side_grid",
    "train",
    "training_target",
]


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


def select_groups(cond: dict[str, Any], groups: torch.Tensor, k: int) -> dict[str, Any]:
    """The flat ``[B*K, ...]`` conditioning of the groups ``groups`` (``[G]``) only: ``[G*K, ...]``, group-major."""
    device = next(v for v in cond.values() if isinstance(v, torch.Tensor)).device
    rows = (groups.to(device)[:, None] * k + torch.arange(k, device=device)).flatten()

    def pick(v: Any) -> Any:
        if isinstance(v, dict):
            return {name: pick(x) for name, x in v.items()}  # pyright: ignore[reportUnknownVariableType]
        return v.index_select(0, rows) if isinstance(v, torch.Tensor) else v

    return {name: pick(v) for name, v in cond.items()}


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
        self.spec = OBJECTIVES.get(cfg.objective.name)

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.cfg
        # Before anything loads or is written: a finished run is never overwritten, a resume keeps its config.
        self.resume_plan = check_run_dir(cfg)
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
        check_launch(acc.num_processes, acc.distributed_type)
        if acc.is_main_process and cfg.train.overwrite:
            clear_run_outputs(self.run_dir)
        acc.wait_for_everyone()
        # config.resolved.yaml and environment.json are written by train(), once the run is known to start
        self.run_dir.mkdir(parents=True, exist_ok=True)
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
            comps.unet.enable_xformers_memory_efficient_attention()  # pyright: ignore[reportCallIssue]  # diffusers ModelMixin method typed as a module attribute
        if cfg.train.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()  # pyright: ignore[reportCallIssue]  # same
        # from_pretrained returns eval mode: without this, LoRA dropout would be off until the first validation.
        comps.unet.train()
        self._setup_data()
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(comps.pipe.scheduler.config)
        if cfg.train.channels_last:
            comps.unet.to(memory_format=torch.channels_last)
        self.reference = self._build_reference()  # before prepare: a frozen copy is taken of the plain module
        if cfg.train.compile:  # after the reference: a deep copy of a compiled module would call the original
            _compile(comps.unet)
            module = getattr(self.reference, "module", None)
            if isinstance(module, torch.nn.Module):
                _compile(module)
        self.trainable = [p for p in comps.unet.parameters() if p.requires_grad]
        self.base_lr = base_lr(cfg, acc.num_processes)
        optimizer = build_optimizer(cfg, self.trainable, self.base_lr)
        self._configure_deepspeed()
        self.unet, self.optimizer = acc.prepare(comps.unet, optimizer)
        self.cursor = DataCursor(len(self.cache), cfg.run.seed)
        self.noise_generator = torch.Generator()
        self.counters = (
            Counters()
        )  # cursor and counters: trainer_state.json (workbench.checkpointing), no pickle
        self._register_hooks()
        if acc.is_main_process and log_with:
            flat = json.loads(json.dumps(cfg.model_dump(mode="json")))
            # A resume at step S purges the TensorBoard events after S that the interrupted run logged (SummaryWriter's
            # purge_step), as metrics.jsonl drops its lines after S: each step is shown once.
            step = self.resume_plan.step if self.resume_plan is not None else None
            purge = {"tensorboard": {"purge_step": step + 1}} if step else {}
            acc.init_trackers("tensorboard", config=_flatten_for_tb(flat), init_kwargs=purge)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        latent_shape = tuple(
            self.cache.batch(
                [0], torch.Generator().manual_seed(0), empty_prompt_prob=0, hflip=False
            ).latents.shape[2:]
        )
        context = ObjectiveContext(
            latent_shape=(int(latent_shape[0]), int(latent_shape[1]), int(latent_shape[2])),
            prediction_type=comps.prediction_type,
            scheduler=self.noise_scheduler,
        )
        self.loss_fn = self.spec.build(cfg.objective, context)
        options = self.spec.noising_options(cfg.objective) if self.spec.noising_options else None
        noising_cfg = noising_config(self.spec.noising, options, cfg.noising)
        self.noise_fn = NOISING.get(noising_cfg.name).build(noising_cfg)  # pyright: ignore[reportAttributeAccessIssue]  # every noising config has a name
        self.validator = Validator(
            cfg.validation,
            pipe=comps.pipe,
            resolution=cfg.data.resolution,
            autocast=acc.autocast,
            out_dir=self.run_dir / "validation",
            scorers=self._build_scorers(),
            base_weights=self._base_weights(),
        )

    def _configure_deepspeed(self) -> None:
        """Under DeepSpeed (configs/accelerate/deepspeed_zero2.yaml; not run on this project's machines, see
        docs/scaling.md): no dataloader goes through ``prepare``, so the micro-batch is set from the run config (the
        fix accelerate's own error names), and DeepSpeed clips at ``train.max_grad_norm``. accelerate's DeepSpeed
        wrapper runs the optimizer step inside ``backward``, so gradient accumulation by this loop is refused."""
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None:
            return
        train = self.cfg.train
        if train.gradient_accumulation_steps != 1:
            raise ValueError(
                "train.gradient_accumulation_steps must be 1 under DeepSpeed (its engine steps inside backward); "
                "raise train.batch_size or the number of processes instead, or use DDP (configs/accelerate/ddp.yaml)"
            )
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = train.batch_size
        plugin.deepspeed_config["gradient_clipping"] = train.max_grad_norm or 0.0

    def _base_weights(self) -> Any:
        """``() -> theta_base``, the pretrained UNet weights as a state dict of views (negative-model guidance in
        validation merges them), or None where the run keeps no copy of them (a full fine-tune whose reference is
        not the base)."""
        from samplers.guidance import base_state

        if self.cfg.model.finetune == "lora":
            return lambda: base_state(self.accelerator.unwrap_model(self.unet))
        if self._reference_is_base() and self.reference is not None:
            return lambda: base_state(self.reference.module)
        return None

    def _build_reference(self) -> Any:
        cfg, comps = self.cfg, self.components
        name = reference_for(self.spec.reference, cfg.model.finetune)
        if name is None:
            return None
        dtype = reference_dtype(cfg.model.reference_dtype, cfg.train.mixed_precision)
        options = self.spec.reference_options(cfg.objective) if self.spec.reference_options else {}
        return REFERENCES.get(name)(
            unet=comps.unet,
            forward=lambda *a, **k: self.unet(
                *a, **k
            ),  # the prepared (DDP/FSDP-wrapped) module, once it exists
            dtype=dtype,
            autocast=lambda: self.accelerator.autocast(),
            **options,
        )

    def _setup_data(self) -> None:
        from workbench.cache import PreferenceCache
        from workbench.data import DataError, read_records

        cfg, acc = self.cfg, self.accelerator
        needs = self.spec.needs
        records, report = read_records(
            cfg.data.sources,
            drop_ties=cfg.data.drop_ties,
            max_samples=cfg.data.max_samples,
            group="ranking" if needs.data == "rankings" else "pair",
            min_k=min(needs.min_k, 2),
        )
        check_needs(cfg.objective.name, needs, records)
        self.cache = PreferenceCache(self.components.pipe, self.components.family, cfg.data)
        skipped_file = self.run_dir / "skipped_rows.jsonl"
        try:
            with acc.main_process_first():
                self.cache.build(
                    records, report, show_progress=self.show_progress and acc.is_local_main_process
                )
        except DataError as exc:  # too many bad rows, or none usable: the file still lists every one
            if acc.is_main_process and report.skipped:
                report.write_jsonl(skipped_file)
                raise DataError(f"{exc}\nevery skipped row, with its reason: {skipped_file}") from exc
            raise
        self.read_report = report
        if acc.is_main_process and (report.skipped or report.notes):
            print(f"[data] {report.summary()}", file=sys.stderr)
            report.write_jsonl(skipped_file)

    def _register_hooks(self) -> None:
        """accelerate's save_state writes the full UNet by default; for LoRA runs save only the adapter, from the
        main process only (the hook runs on every process)."""
        if self.cfg.model.finetune != "lora":
            return
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        from workbench.models import peft_lora_state_dict

        def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
            for _ in range(len(weights)):
                weights.pop()
            if not self.accelerator.is_main_process:
                return
            unet = self.accelerator.unwrap_model(self.unet)
            state = {k: v.detach().cpu().contiguous() for k, v in peft_lora_state_dict(unet).items()}
            save_file(state, os.path.join(output_dir, "adapter.safetensors"))
            fault_point("save:adapter", self.counters.step)  # training_state/ half written

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
        seeded by (run seed, step): exact resume needs no saved generator state. Every process of a multi-process run
        seeds the same generator and draws for the whole global batch, keeping its own rows (``rows`` of
        :meth:`PreferenceCache.batch`, :class:`samplers.noising.BatchRows`), so N processes draw exactly what one
        process with the global batch draws (before this rule each process seeded with its rank and drew its own
        noise; one-process draws are unchanged). The combination is taken modulo 2^63 (a generator seed is a signed
        64-bit integer; large run seeds such as the Self-NPO launchers' 453645634 would overflow it), which leaves
        every smaller value, and so every earlier run's draws, unchanged."""
        self.noise_generator.manual_seed(((self.cfg.run.seed * 1_000_003) * 1_000_033 + step) % 2**63)

    def _conditioning(self, batch: GroupBatch) -> dict[str, Any]:
        """UNet conditioning for the flat ``[B*K]`` batch: the group's prompt for each of its K images."""
        device = self.accelerator.device
        k = batch.shape[1]
        cond: dict[str, Any] = {"encoder_hidden_states": repeat_per_image(batch.prompt_embeds, k).to(device)}
        if batch.pooled_embeds is not None and batch.time_ids is not None:
            cond["added_cond_kwargs"] = {
                "text_embeds": repeat_per_image(batch.pooled_embeds, k).to(device),
                "time_ids": flatten_groups(batch.time_ids).to(device),  # [B*K, 6]: per image
            }
        return cond

    def _unconditional(self, batch: GroupBatch) -> dict[str, Any]:
        """The unconditional branch's conditioning for the flat ``[B*K]`` batch, as the official Self-NPO scripts
        build it: SDXL, zero prompt and pooled embeddings with the images' own micro-conditioning (``train_xl.py``
        L1034-1039, and SDXL's ``force_zeros_for_empty_prompt``); SD1.5/2.x, the encoded empty prompt
        (``train.py`` L904-910)."""
        cond = self._conditioning(batch)
        if "added_cond_kwargs" in cond:
            return {
                "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]),
                "added_cond_kwargs": {
                    "text_embeds": torch.zeros_like(cond["added_cond_kwargs"]["text_embeds"]),
                    "time_ids": cond["added_cond_kwargs"]["time_ids"],
                },
            }
        empty = self.cache.text_embedding("")["prompt_embeds"].to(cond["encoder_hidden_states"])
        return {"encoder_hidden_states": empty.expand_as(cond["encoder_hidden_states"]).contiguous()}

    def _teacher(self, batch: GroupBatch, cond: dict[str, Any]) -> Any:
        """The reference as a guided teacher for noising methods that need one: ``(x_t, t) -> (conditional,
        unconditional)`` outputs ``[B, K, ...]``, both branches in one batched forward, no gradient."""
        reference, k = self.reference, batch.shape[1]
        if reference is None:
            return None
        both: dict[str, Any] = {}  # built on first use: objectives without a teacher never pay for it

        @torch.no_grad()
        def teacher(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if not both:
                both.update(_cat_conditioning(cond, self._unconditional(batch)))
            x, tt = flatten_groups(x_t), flatten_groups(t)
            n = x.shape[0]
            out = reference.predict(torch.cat([x, x]), torch.cat([tt, tt]), both)
            return unflatten_groups(out[:n], k), unflatten_groups(out[n:], k)

        return teacher

    def predictions(
        self, batch: GroupBatch, *, with_reference: bool = True, rows: BatchRows | None = None
    ) -> Predictions:
        """Noise the groups with the objective's noising method, run the policy on all K images of every group in
        one forward and the reference without gradient. Every tensor of the result is ``[B, K, ...]``. ``rows``:
        the batch's place in the global batch of a multi-process step (noise is drawn for the global batch)."""
        acc = self.accelerator
        k = batch.shape[1]
        x0 = batch.latents.to(acc.device)  # [B, K, C, h, w]
        cond = self._conditioning(batch)

        @torch.no_grad()
        def denoiser(  # the policy, for inversion methods: on all groups, or on `groups` of them
            x_t: torch.Tensor, t: torch.Tensor, groups: torch.Tensor | None = None
        ) -> torch.Tensor:
            c = cond if groups is None else select_groups(cond, groups, k)
            with acc.autocast():
                out = self.unet(flatten_groups(x_t), flatten_groups(t), **c).sample
            return unflatten_groups(out.float(), k)

        noised = self.noise_fn(
            x0,
            self.noise_generator,
            NoisingContext(
                self.noise_scheduler,
                denoiser,
                self.components.prediction_type,
                self._teacher(batch, cond),
                rows,
            ),
        )
        if noised.x0 is not None:  # the method's own clean latent (Self-NPO: the teacher's x0 estimate)
            x0 = noised.x0
        x_t, t = flatten_groups(noised.x_t), flatten_groups(noised.t)
        if self.cfg.train.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        target = training_target(
            self.noise_scheduler,
            flatten_groups(x0),
            flatten_groups(noised.eps),
            t,
            self.components.prediction_type,
        )
        with acc.autocast():
            pred = self.unet(x_t, t, **cond).sample  # all K images of every group in one forward
        ref = None
        if with_reference and self.reference is not None and self.spec.reference_forward:
            ref = self.reference.predict(x_t, t, cond)
        return Predictions(
            policy=unflatten_groups(pred, k),
            reference=None if ref is None else unflatten_groups(ref, k),
            target=unflatten_groups(target, k),
            t=noised.t,
            x_t=noised.x_t,
            x0=x0,
        )

    def compute_loss(
        self, batch: GroupBatch, rows: BatchRows | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.spec.needs.data == "winners":
            batch = first_column(batch)  # only column 0 is used: the others never go through the models
        return self.loss_fn(self.predictions(batch, rows=rows), batch)

    @torch.no_grad()
    def implicit_accuracy(self, *, draws: int = 4, batch_size: int = 16, seed: int = 12345) -> float:
        """The objective's implicit-reward preference accuracy on the cached groups: its spec's ``margin``
        (Diffusion-DPO: paper Supp. S4.1) averaged over ``draws`` fixed noise draws per group, then the fraction of
        groups with a positive margin. Exact ties count half, so a model equal to its reference scores 0.5."""
        margin_fn = self.spec.margin
        if margin_fn is None:
            raise ValueError(f"objective {self.cfg.objective.name} defines no implicit reward margin")
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
                    margins[idx] += (
                        margin_fn(self.predictions(batch), batch).cpu() / draws
                    )  # > 0: prefers column 0
        finally:
            unet.train(was_training)
        return float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean())

    # ---------------------------------------------------------------------------------------------- the loop
    def train(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        self._maybe_resume()
        if acc.is_main_process:  # the run is known to start: its records (a resume keeps the first ones)
            environment = {**environment_info(), "num_processes": acc.num_processes}
            start_records(cfg, self.resume_plan, self.counters.step, environment)
        ga = cfg.train.gradient_accumulation_steps
        bs = cfg.train.batch_size
        # This process's groups of each global micro-batch (world * bs groups, the same on every process).
        world, rank = acc.num_processes, acc.process_index
        rows = BatchRows(start=rank * bs, total=world * bs)
        index_log = self._index_log()
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
        if self.counters.step == 0 and not self._reference_is_base() and acc.is_main_process:
            # No reference that stays the base (none, or an EMA teacher that moves): the policy is the base now.
            self.validator.render_base(acc.unwrap_model(self.unet))
        try:
            while self.counters.step < cfg.train.max_steps:
                if interrupted["flag"]:
                    raise KeyboardInterrupt
                sums: dict[str, float] = {}
                loss_sum, bad = 0.0, False
                self.reseed(self.counters.step)
                # set before the backward passes: under DeepSpeed the optimizer steps inside the last one
                lr_used = self.base_lr * lr_factor(cfg.scheduler, self.counters.step, cfg.train.max_steps)
                set_lr(self.optimizer, lr_used)
                for micro in range(ga):
                    indices = self.cursor.take(world * bs)  # the global micro-batch
                    batch = self.cache.batch(
                        indices,
                        self.noise_generator,
                        empty_prompt_prob=cfg.data.proportion_empty_prompts,
                        hflip=cfg.data.hflip,
                        rows=range(rows.start, rows.start + bs),
                    )
                    if index_log is not None:
                        seen = {"step": self.counters.step, "micro": micro, "process": rank}
                        index_log.write(json.dumps({**seen, "indices": batch.indices.tolist()}) + "\n")
                        index_log.flush()
                    sync = micro == ga - 1
                    ctx = nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(self.unet)
                    with ctx:
                        loss, metrics = self.compute_loss(batch, rows)
                        finite = bool(
                            torch.as_tensor(acc.gather(torch.isfinite(loss.detach()).reshape(1))).all()
                        )
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
                # Clipped for every optimizer, Adafactor included: Salesforce train.py L1162-1164 clips unless
                # --use_adafactor, and its SDXL launcher selects Adafactor through --sdxl (L667), so the published
                # SDXL run clips at max_grad_norm 1.0 on top of Adafactor's own clip_threshold.
                if cfg.train.max_grad_norm is not None:
                    grad_norm = acc.clip_grad_norm_(self.trainable, cfg.train.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                on_step = getattr(self.reference, "on_optimizer_step", None)
                if on_step is not None:  # e.g. an EMA teacher follows the policy
                    on_step(self.accelerator.unwrap_model(self.unet))
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
                    if world > 1:  # the loss and metrics of the global batch: the mean over processes
                        keys = ["train/loss", *sums]
                        mean = acc.reduce(torch.tensor([record[k] for k in keys], device=acc.device), "mean")
                        record.update(zip(keys, torch.as_tensor(mean).tolist()))
                    self._log(record)
                fault_point("step", step)
                bar.update(1)
                shown = {
                    key.rsplit("/", 1)[-1]: f"{sums[key]:.2f}" for key in self.spec.progress if key in sums
                }
                bar.set_postfix(ordered_dict={"loss": f"{loss_sum:.4f}", **shown, "lr": f"{lr_used:.2e}"})
                # The checkpoint first: a failing validation can never cost it.
                if step % cfg.train.checkpoint_every == 0 and step < cfg.train.max_steps:
                    self.save_checkpoint(step)
                if cfg.validation.every and step % cfg.validation.every == 0:
                    self.validate(step)
        except KeyboardInterrupt:
            bar.close()
            if self.counters.step > 0:
                path = self.save_checkpoint(self.counters.step)
                print(f"[train] interrupted: saved {path}; resume with train.resume=latest", file=sys.stderr)
            raise
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            if index_log is not None:
                index_log.close()
        bar.close()
        self.save_final()
        if not cfg.validation.every or self.counters.step % cfg.validation.every:
            self.validate(self.counters.step)
        acc.end_training()
        return self.run_dir

    def _index_log(self) -> Any:
        """With ``WORKBENCH_LOG_INDICES=1``: each process appends the dataset indices of every micro-batch it trains
        on to ``debug/indices_process{N}.jsonl`` in the run directory (tests check the data sharding with it)."""
        if os.environ.get("WORKBENCH_LOG_INDICES", "") not in ("1", "true"):
            return None
        path = self.run_dir / "debug" / f"indices_process{self.accelerator.process_index}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("a")

    def _maybe_resume(self) -> None:
        """Restore the state of ``train.resume`` (a checkpoint folder, or ``latest``). Every checkpoint is checked
        first (:func:`workbench.checkpointing.verify_checkpoint`): a file holding pickled code stops the run with
        a message naming it; with ``latest``, a damaged newest checkpoint is skipped with a warning and the one
        before it is used, a checkpoint named explicitly is used or refused."""
        resume = self.cfg.train.resume
        if not resume:
            return
        rank = self.accelerator.process_index
        if resume == "latest":
            ckpts = list_checkpoints(self.run_dir)
            if not ckpts:
                print(f"[train] resume=latest: no complete checkpoint in {self.run_dir}; starting fresh")
                return
            problems: list[str] = []
            state: ResumeState | None = None
            for path in reversed(ckpts):
                try:
                    state = verify_checkpoint(path, rank)
                    break
                except CorruptFileError as exc:
                    problems.append(str(exc))
                    print(f"[train] warning: skipping checkpoint {path.name}: {exc}", file=sys.stderr)
            if state is None:
                raise CorruptFileError(
                    f"train.resume=latest: no usable checkpoint in {self.run_dir / 'checkpoints'}:\n  "
                    + "\n  ".join(problems)
                    + "\nStart a new run (a new run.name) or restore the files from a copy."
                )
            if problems:
                print(
                    f"[train] warning: resuming from the previous checkpoint, {state.path.name}",
                    file=sys.stderr,
                )
        else:
            path = Path(resume)
            if not (path / COMPLETE).is_file():
                raise TrainingError(
                    f"train.resume: {path} is not a complete checkpoint (no {COMPLETE} marker)"
                )
            state = verify_checkpoint(path, rank)
        if self.resume_plan is not None:
            self.resume_plan.checkpoint = state.path
        with accelerate_view(state.path / "training_state") as folder:
            self.accelerator.load_state(str(folder))
        self.cursor.load_state_dict(state.trainer["data_cursor"])
        self.counters.load_state_dict(state.trainer["counters"])
        if state.rng is not None:
            restore_rng(state.rng)
        else:  # more processes than the checkpoint was written by: this one has no RNG file
            print(
                f"[train] process {rank}: no RNG state in {state.path.name}; its RNGs start fresh",
                file=sys.stderr,
            )
        load_reference = getattr(self.reference, "load", None)
        if load_reference is not None:  # reference state that training changes (an EMA teacher)
            load_reference(state.path / "reference")
        self.accelerator.unwrap_model(self.unet).train()  # modes are not part of the state
        print(f"[train] resumed from {state.path} at step {self.counters.step}", file=sys.stderr)

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

        save_reference = getattr(self.reference, "save", None)
        if save_reference is not None:
            save_reference(directory / "reference")

        unet = self.accelerator.unwrap_model(self.unet)
        if self.cfg.model.finetune == "lora":
            save_lora(unet, directory / "lora", self.components.family)
        else:
            unet.save_pretrained(str(directory / "unet"), safe_serialization=True)

    def save_checkpoint(self, step: int) -> Path:
        """``checkpoints/step_XXXXXX``. A failed write (disk full, read-only folder) stops the run: the partial
        folder is removed, earlier checkpoints are intact, and the weights alone are tried in ``rescued/`` (small for
        a LoRA, and the partial folder's space is free again); the error says what was kept."""
        state = trainer_state(step, self.cursor, self.counters)
        try:
            return save_checkpoint(
                self.accelerator, self.run_dir, step, self._export_weights, self.cfg.train.keep_last, state
            )
        except CheckpointWriteError as exc:
            raise CheckpointWriteError(f"{exc}. {self._after_failed_write(step)}") from exc.__cause__

    def save_final(self) -> Path:
        try:
            return save_final(self.accelerator, self.run_dir, self.counters.step, self._export_weights)
        except CheckpointWriteError as exc:
            raise CheckpointWriteError(
                f"{exc}. {self._after_failed_write(self.counters.step)}"
            ) from exc.__cause__

    def _after_failed_write(self, step: int) -> str:
        """Save what can be saved after a failed write, and say what the run directory holds now."""
        ckpts = list_checkpoints(self.run_dir)
        kept = (
            f"The last good checkpoint, {ckpts[-1]}, is intact" if ckpts else "There is no earlier checkpoint"
        )
        rescued = ""
        if self.accelerator.is_main_process:
            target = self.run_dir / "rescued" / f"step_{step:06d}"
            try:
                self._export_weights(target)
                rescued = f"; the weights of step {step} (not resumable) were saved in {target}"
            except OSError as exc:
                shutil.rmtree(target, ignore_errors=True)
                rescued = f"; the weights of step {step} could not be saved elsewhere either ({exc.strerror or exc})"
        return f"{kept}{rescued}. Free disk space or make the folder writable, then continue with train.resume=latest"

    # -------------------------------------------------------------------------------------------- validation
    def _reference_is_base(self) -> bool:
        """Whether the reference holds the pretrained weights for the whole run (not an EMA teacher that moves)."""
        return self.reference is not None and self.spec.reference == "base"

    def validate(self, step: int) -> Path | None:
        """Base and tuned images for the fixed validation prompts x seeds, from identical initial noise (the
        samplers' rule). Main process only; a failure is reported and training continues."""
        acc = self.accelerator
        if not self.validator.enabled or not acc.is_main_process:
            return None
        base = self.reference.as_unet if self._reference_is_base() and self.reference is not None else None
        record = self.validator.run(step, acc.unwrap_model(self.unet), base)
        if record is not None and len(record) > 1:
            self._log(record)
        path = self.validator.out_dir / f"step_{step:06d}.png"
        return path if path.is_file() else None


def _compile(module: torch.nn.Module) -> None:
    """``train.compile``: ``nn.Module.compile`` (in place, so unwrapping, saving and peft's adapter switches see the
    same module). A graph that fails to compile falls back to eager (dynamo's ``suppress_errors``), with a warning."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    # LoRA-disabled reference forwards, the inversion denoiser and validation each add a guard set (recompile).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    module.compile()


def _cat_conditioning(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two flat conditionings stacked along the batch (``a`` first), nested ``added_cond_kwargs`` included."""
    out: dict[str, Any] = {}
    for key, value in a.items():
        out[key] = _cat_conditioning(value, b[key]) if isinstance(value, dict) else torch.cat([value, b[key]])
    return out


def check_needs(objective: str, needs: Needs, records: list[Any]) -> None:
    """The objective's needs against the rows actually read (the config check only knows the formats)."""
    from workbench.data import DataError

    if not records or needs.data == "none":
        return
    ks = sorted({r.k for r in records})
    if ks[0] < needs.min_k:
        row = next(r for r in records if r.k == ks[0])
        raise DataError(
            f"objective {objective} needs groups of K >= {needs.min_k}; row {row.row_id} has K = {ks[0]}. Drop such "
            "rows or use data with more images per prompt (workbench synth --k)."
        )
    if len(ks) > 1 and not needs.variable_k:
        raise DataError(
            f"objective {objective} needs one group size, but the data has groups of K = {ks}; keep one K per run."
        )
    if needs.soft_labels:
        missing = next((r for r in records if r.pref_prob is None), None)
        if missing is not None:
            raise DataError(
                f"objective {objective} needs soft preference labels; row {missing.row_id} has none "
                "(pair_jsonl prefer_0 / prefer_1)."
            )
    if needs.scores:
        missing = next((r for r in records if not r.scores or len(r.scores) != r.k), None)
        if missing is not None:
            raise DataError(
                f"objective {objective} needs a score per image; row {missing.row_id} has "
                f"{'none' if not missing.scores else len(missing.scores)} for {missing.k} images "
                "(ranking_jsonl 'scores', best first)."
            )


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
