"""Reference models: what the policy is compared against, registered by name.

A reference predicts without gradient for the same ``(x_t, t, conditioning)`` as the policy and can stand in for
the policy's UNet while base images are rendered (validation grids show base beside tuned). Registered:

* ``lora_disabled``: the policy's own UNet with its LoRA adapters switched off, so no second copy is held
  (diffusers ``train_diffusion_dpo*.py``: ``unet.disable_adapters()`` around the reference forward);
* ``frozen_copy``: a frozen deep copy of the pretrained UNet for full fine-tunes (Salesforce ``train.py`` keeps
  ``ref_unet`` in ``weight_dtype``, the mixed-precision dtype), in ``model.reference_dtype``.

An objective's spec asks for ``"base"`` (the pretrained weights; resolved by :func:`reference_for` to one of the two
above from ``model.finetune``) or for no reference. An EMA teacher (Self-NPO) registers here in its own issue.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from workbench.registry import Registry

Cond = dict[str, Any]


class Reference(Protocol):
    """A reference model. ``predict`` runs without gradient; ``as_unet`` yields a module to render with."""

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor: ...

    def as_unet(self) -> Any: ...  # a context manager yielding a UNet-like module


ReferenceFactory = Callable[..., Reference]
REFERENCES: Registry[ReferenceFactory] = Registry("reference")


def _cast_cond(cond: Cond, dtype: torch.dtype) -> Cond:
    out: Cond = {}
    for k, v in cond.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = v.to(dtype)
        elif isinstance(v, dict):
            out[k] = _cast_cond(v, dtype)  # SDXL added_cond_kwargs
        else:
            out[k] = v
    return out


@REFERENCES.register("lora_disabled")
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


@REFERENCES.register("frozen_copy")
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
            return self.module(x_t.to(self.dtype), t, **_cast_cond(cond, self.dtype)).sample.float()

    @contextmanager
    def as_unet(self) -> Iterator[Any]:
        yield self.module


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
