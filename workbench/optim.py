"""Optimizers and the learning-rate schedule of a run.

The schedule is a pure function of the optimizer step (:func:`lr_factor`), applied to the param groups before each
optimizer step by the loop. It is deliberately not an ``accelerate``-prepared scheduler: accelerate's
``AcceleratedScheduler`` steps its scheduler once per process per optimizer step (``split_batches=False``), so on N
processes warm-up and decay ran N times too fast; the reference scripts compensate by multiplying the warm-up by
``num_processes`` (SalesforceAIResearch/DiffusionDPO ``train.py`` L898-902: ``num_warmup_steps=args.lr_warmup_steps
* accelerator.num_processes``). A function of the step is also exact on resume with nothing to save.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from workbench.config import RunConfig


def build_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    if opt.name == "adamw":
        kernel: dict[str, Any] = {
            "auto": {},
            "foreach": {"foreach": True},
            "fused": {"fused": True},
            "for-loop": {"foreach": False},
        }[opt.implementation]
        return torch.optim.AdamW(
            params, lr=lr, betas=opt.betas, weight_decay=opt.weight_decay, eps=opt.eps, **kernel
        )
    if opt.name == "adamw_8bit":
        try:
            import bitsandbytes as bnb  # pyright: ignore[reportMissingImports]  # optional: pip install '.[gpu]'
        except ImportError as exc:
            raise ValueError("optimizer.name=adamw_8bit needs bitsandbytes: pip install '.[gpu]'") from exc
        return bnb.optim.AdamW8bit(params, lr=lr, betas=opt.betas, weight_decay=opt.weight_decay, eps=opt.eps)
    from transformers.optimization import Adafactor

    # Salesforce train.py L667-674 (chosen for --sdxl or --use_adafactor).
    return Adafactor(
        params,
        lr=lr,
        weight_decay=opt.weight_decay,
        clip_threshold=opt.clip_threshold,
        scale_parameter=False,
        relative_step=False,
    )


def base_lr(cfg: RunConfig, num_processes: int) -> float:
    """``optimizer.lr``, times ``grad_accum * batch_size * num_processes`` with ``train.scale_lr`` (Salesforce
    train.py L662-665)."""
    lr = cfg.optimizer.lr
    if cfg.train.scale_lr:
        lr *= cfg.train.gradient_accumulation_steps * cfg.train.batch_size * num_processes
    return lr


def lr_factor(scheduler: Any, step: int, total_steps: int) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based: the first step is step 0).

    ``constant``: 1. ``constant_with_warmup``: ``(step + 1) / warmup`` while ``step < warmup``, then 1.
    ``cosine``: the same warm-up, then ``min + (1 - min) * (1 + cos(pi * progress)) / 2``.
    """
    warmup = int(getattr(scheduler, "warmup_steps", 0))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if scheduler.name == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return scheduler.min_lr_ratio + (1 - scheduler.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
