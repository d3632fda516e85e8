"""Reference models: what the policy is compared against, registered by name.

A reference predicts without gradient for the same ``(x_t, t, conditioning)`` as the policy and can stand in for
the policy's UNet while base images are rendered (validation grids show base beside tuned). Registered:

* ``lora_disabled``: the policy's own UNet with its LoRA adapters switched off, so no second copy is held
  (diffusers ``train_diffusion_dpo*.py``: ``unet.disable_adapters()`` around the reference forward);
* ``frozen_copy``: a frozen deep copy of the pretrained UNet for full fine-tunes (Salesforce ``train.py`` keeps
  ``ref_unet`` in ``weight_dtype``, the mixed-precision dtype), in ``model.reference_dtype``.

* ``ema``: an exponential moving average of the policy, ``theta_ema <- d * theta_ema + (1 - d) * theta``, updated
  after every optimizer step (Self-NPO's teacher: G-U-N/Diffusion-NPO ``Self-NPO/train.py``, decay 0.999), saved with
  every checkpoint (``reference/ema.safetensors``) and restored on resume.

An objective's spec asks for ``"base"`` (the pretrained weights; resolved by :func:`reference_for` to one of the two
above from ``model.finetune``), for a registered name such as ``"ema"``, or for no reference. Optional hooks a
reference may have, which the loop calls when present: ``on_optimizer_step(policy)``, ``save(directory)``,
``load(directory)``; ``reference_options`` on the spec passes keyword options (e.g. the EMA decay) from the
objective's config.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch

from samplers.generate import cast_floats
from workbench.registry import Registry

Cond = dict[str, Any]


class Reference(Protocol):
    """A reference model. ``predict`` runs without gradient; ``as_unet`` yields a module to render with."""

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor: ...

    def as_unet(self) -> Any: ...  # a context manager yielding a UNet-like module


ReferenceFactory = Callable[..., Reference]
REFERENCES: Registry[ReferenceFactory] = Registry("reference")


class LoraDisabled:
    """The policy's UNet with adapters off. ``forward`` is the (possibly accelerate-wrapped) policy module, whose
    ``__call__`` keeps DDP/FSDP hooks; ``unet`` is the unwrapped peft-carrying model."""

    def __init__(
        self, *, unet: Any, forward: Callable[..., Any], autocast: Callable[[], Any], **_: Any
    ) -> None:
        self.unet, self.forward, self.autocast = unet, forward, autocast

    @contextmanager
    def _disabled(self) -> Iterator[None]:
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        with self._disabled(), self.autocast():
            return self.forward(x_t, t, **cond).sample.float()

    @contextmanager
    def as_unet(self) -> Iterator[Any]:
        with self._disabled():
            yield self.unet


class FrozenCopy:
    """A frozen copy of the pretrained UNet in ``dtype`` (taken before any training step)."""

    def __init__(
        self, *, unet: torch.nn.Module, dtype: torch.dtype, autocast: Callable[[], Any], **_: Any
    ) -> None:
        self.module = copy.deepcopy(unet).to(dtype=dtype).requires_grad_(False).eval()
        self.dtype, self.autocast = dtype, autocast

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        with self.autocast():
            return self.module(x_t.to(self.dtype), t, **cast_floats(cond, self.dtype)).sample.float()

    @contextmanager
    def as_unet(self) -> Iterator[Any]:
        yield self.module


class EMATeacher(FrozenCopy):
    """An exponential moving average of the policy (a frozen copy at step 0, then ``update`` after each optimizer
    step). Only the weights the policy trains move; the others stay equal to the policy's frozen ones."""

    FILE = "ema.safetensors"

    def __init__(
        self,
        *,
        unet: torch.nn.Module,
        dtype: torch.dtype,
        autocast: Callable[[], Any],
        decay: float = 0.999,
        **_: Any,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        super().__init__(unet=unet, dtype=dtype, autocast=autocast)
        self.decay = decay
        self.trained = [n for n, p in unet.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def on_optimizer_step(self, policy: torch.nn.Module) -> None:
        """``theta_ema <- d * theta_ema + (1 - d) * theta`` for every trained weight (in fp32, stored in ``dtype``)."""
        mine = dict(self.module.named_parameters())
        for name, p in policy.named_parameters():
            if name in mine and p.requires_grad:
                ema = mine[name]
                ema.copy_((ema.float() * self.decay + p.detach().float() * (1 - self.decay)).to(ema.dtype))

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        params = dict(self.module.named_parameters())
        save_file(
            {n: params[n].detach().cpu().contiguous() for n in self.trained}, str(directory / self.FILE)
        )

    @torch.no_grad()
    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        path = directory / self.FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the checkpoint has no EMA teacher state (saved by a run without it?)"
            )
        params = dict(self.module.named_parameters())
        for name, value in load_file(str(path)).items():
            if name not in params:
                raise ValueError(
                    f"{path}: weight {name!r} is not in this model; was it saved by another config?"
                )
            params[name].copy_(value.to(params[name].dtype))


# Registered as statements (not decorators) so that type checkers keep them as classes.
REFERENCES.register("lora_disabled")(LoraDisabled)
REFERENCES.register("frozen_copy")(FrozenCopy)
REFERENCES.register("ema")(EMATeacher)


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype the policy computes in: the autocast dtype under mixed precision, fp32 otherwise."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


_PRECISION = {torch.float32: 2, torch.bfloat16: 1, torch.float16: 1}


def reference_dtype(configured: str, mixed_precision: str) -> torch.dtype:
    """``model.reference_dtype``: ``auto`` = the policy's compute dtype (Salesforce casts ``ref_unet`` to the
    training ``weight_dtype``). A lower precision than the policy computes in is allowed (memory) with a warning:
    at beta 5000, bf16 reference errors move the step-0 logit far from 0 (the loss is no longer ln 2)."""
    policy = compute_dtype(mixed_precision)
    if configured == "auto":
        return policy
    chosen = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[configured]
    if _PRECISION[chosen] < _PRECISION[policy]:
        print(
            f"[train] warning: model.reference_dtype={configured} is less precise than the policy's compute dtype "
            f"({str(policy).removeprefix('torch.')}, train.mixed_precision={mixed_precision}); the DPO logit at "
            "step 0 will not be 0. Use model.reference_dtype=auto unless memory forces it.",
            file=sys.stderr,
        )
    return chosen


def reference_for(kind: str | None, finetune: str) -> str | None:
    """Resolve a spec's reference kind to a registered reference name."""
    if kind is None:
        return None
    if kind == "base":
        return "lora_disabled" if finetune == "lora" else "frozen_copy"
    return kind
