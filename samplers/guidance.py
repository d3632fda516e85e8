"""Inference with a negative model (Diffusion-NPO): the unconditional branch of classifier-free guidance comes from a
*negative* UNet, the conditional branch from the positive one.

Sources: Wang et al., "Diffusion-NPO: Negative Preference Optimization for Better Preference Aligned Generation of
Diffusion Models" (ICLR 2025); official code ``G-U-N/Diffusion-NPO``: ``gen.py`` / ``gen_xl.py`` and
``pipeline_stable_diffusion(_xl)_double_unet.py`` (summary in ``research/objectives.md`` section 6.2).

Guidance (``pipeline_stable_diffusion(_xl)_double_unet.py``), at every step::

    eps_uncond = negative_unet(x_t, t, c_neg)                 # c_neg: negative / empty prompt embedding
    eps_text   = positive_unet(x_t, t, c)
    eps        = eps_uncond + w * (eps_text - eps_uncond)      # plain CFG, negative model only in the uncond slot

We do not re-implement the loop: the stock diffusers SD / SDXL pipelines call their UNet once per step on the batch
``[uncond half; cond half]`` (``torch.cat([latents] * 2)``, ``prompt_embeds = cat([negative, positive])``, and for
SDXL ``added_cond_kwargs = {"text_embeds": cat([neg_pooled, pooled]), "time_ids": cat([neg_ids, ids])}``), then do
``noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)`` and the CFG formula above, then ``guidance_rescale``
on the combined prediction. :class:`NegativeGuidanceUNet` stands in for the UNet and sends the first half to the
negative model and the second half to the positive one, so the pipeline's own CFG (and ``guidance_rescale``) gives
exactly the double-UNet pipeline's prediction.

Negative weights (``gen.py`` for SD1.5: ``mix_models(base, pos, merge_weight)`` then ``load_lora_weights(npo)`` +
``fuse_lora()``; ``gen_xl.py`` for SDXL: tensor-wise ``npo + (1 - merge_weight) * (dpo - origin)``)::

    theta_neg = theta_base + delta_npo + (1 - m) * (theta_pos - theta_base)       m = merge weight in [0, 1]

with ``delta_npo = theta_npo - theta_base`` (an NPO model is trained from the base). ``m = 0`` (the default of the
official ``gen.sh``): negative = positive + NPO offset; ``m = 1``: negative = base + NPO offset. With no positive
checkpoint ``theta_pos = theta_base``, so negative = base + NPO offset.

Memory rule (:func:`negative_guidance_pipeline`):

* NPO is a LoRA and the positive model is the base or a LoRA: ONE UNet (the base pipeline's, shared) carries peft
  adapters ``"npo"`` (and ``"pos"``), switched per half with ``set_adapters``: positive half = ``["pos"]`` at 1.0
  (or adapters disabled when there is no positive LoRA), negative half = ``["npo", "pos"]`` at ``[1.0, 1 - m]``.
  A LoRA adds ``scale * B @ A`` to a layer, so these adapter weights give exactly the formula above.
* a full UNet checkpoint is involved (positive or NPO): a second UNet holds ``theta_neg``, computed by the formula
  from state dicts (a LoRA's ``theta - theta_base`` is peft's ``get_delta_weight``, i.e. ``scale * B @ A``).
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from samplers.generate import with_sampler

POSITIVE_ADAPTER = "pos"
NEGATIVE_ADAPTER = "npo"
_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


# ------------------------------------------------------------------------------------------------- the UNet wrapper
def _split(x: Any, batch: int) -> tuple[Any, Any]:
    """``(first half, second half)`` of every batch-sized tensor in ``x`` (dicts, lists and tuples recursively);
    anything else (a scalar timestep, ``None``, a scale) goes unchanged to both halves."""
    if isinstance(x, torch.Tensor):
        if x.ndim >= 1 and x.shape[0] == batch:
            return x[: batch // 2], x[batch // 2 :]
        return x, x
    if isinstance(x, dict):
        pairs = {k: _split(v, batch) for k, v in x.items()}
        return {k: a for k, (a, _) in pairs.items()}, {k: b for k, (_, b) in pairs.items()}
    if isinstance(x, (list, tuple)):
        pairs = [_split(v, batch) for v in x]
        return type(x)(a for a, _ in pairs), type(x)(b for _, b in pairs)
    return x, x


class NegativeGuidanceUNet(nn.Module):
    """A UNet stand-in: under classifier-free guidance the first (unconditional) half of the batch goes to
    ``negative``, the second (conditional) half to ``positive``; without guidance everything goes to ``positive``.

    ``negative`` may be ``positive`` itself with ``before_negative`` / ``before_positive`` switching its LoRA
    adapters; the wrapper always leaves the positive state active after a call. Every batch-sized tensor argument
    is split (``encoder_hidden_states``, a ``timestep`` tensor of batch size, ``added_cond_kwargs``' ``text_embeds`` /
    ``time_ids``, residuals, masks); the outputs are concatenated in order and returned as a UNet returns them
    (an object with ``.sample``, or a 1-tuple with ``return_dict=False``). Other attributes (``config``, ``dtype``,
    ``device``, ``add_embedding``, ...) are the positive UNet's.

    Whether the batch is doubled is :attr:`guided`: pipelines from :func:`negative_guidance_pipeline` set it from
    their ``guidance_scale`` for every call (diffusers' rule: guidance > 1 and no ``time_cond_proj_dim``). Left at
    ``None``, a batch counts as doubled when it is even and its two halves of ``sample`` are identical (what
    ``torch.cat([latents] * 2)`` gives).
    """

    def __init__(
        self,
        positive: nn.Module,
        negative: nn.Module,
        *,
        before_positive: Callable[[], None] | None = None,
        before_negative: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.positive = positive
        self.shared = negative is positive
        if not self.shared:
            self.negative = negative
        self.before_positive = before_positive
        self.before_negative = before_negative
        self.guided: bool | None = None
        self.calls = {"positive": 0, "negative": 0}  # forward calls per model (for checks and tests)

    @property
    def negative_model(self) -> nn.Module:
        return self.positive if self.shared else self.negative

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            positive = super().__getattr__("positive")
            return getattr(positive, name)

    def _is_doubled(self, sample: torch.Tensor) -> bool:
        if self.guided is not None:
            return self.guided
        n = sample.shape[0]
        return n % 2 == 0 and torch.equal(sample[: n // 2], sample[n // 2 :])

    def _run(self, which: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        hook = self.before_positive if which == "positive" else self.before_negative
        if hook is not None:
            hook()
        model = self.positive if which == "positive" else self.negative_model
        self.calls[which] += 1
        out = model(*args, **{**kwargs, "return_dict": False})
        return out[0] if isinstance(out, (tuple, list)) else out.sample

    def forward(
        self, sample: torch.Tensor, timestep: Any, *args: Any, return_dict: bool = True, **kwargs: Any
    ) -> Any:
        same_model = self.shared and self.before_positive is None and self.before_negative is None
        if same_model:
            # negative is positive in the same state: one batched call, bit for bit the pipeline's plain CFG (two
            # half-batch calls agree with it only up to batched-kernel round-off)
            if self._is_doubled(sample):
                self.calls["negative"] += 1
            pred = self._run("positive", (sample, timestep, *args), kwargs)
        elif self._is_doubled(sample):
            n = sample.shape[0]
            if n % 2:
                raise ValueError(f"guidance is on but the UNet batch ({n}) is not [uncond half; cond half]")
            (s_neg, s_pos), (t_neg, t_pos) = _split(sample, n), _split(timestep, n)
            a_neg, a_pos = _split(args, n)
            k_neg, k_pos = _split(kwargs, n)
            uncond = self._run("negative", (s_neg, t_neg, *a_neg), k_neg)
            cond = self._run(
                "positive", (s_pos, t_pos, *a_pos), k_pos
            )  # last: the positive state stays active
            pred = torch.cat([uncond, cond])
        else:
            pred = self._run("positive", (sample, timestep, *args), kwargs)
        if not return_dict:
            return (pred,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=pred)


# -------------------------------------------------------------------------------------- pipelines that set `guided`
class _NegativeGuidedMixin:
    """Sets the wrapper's :attr:`NegativeGuidanceUNet.guided` from this call's ``guidance_scale``."""

    unet: Any

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = super().__call__  # pyright: ignore[reportAttributeAccessIssue]
        unet = self.unet
        if not isinstance(unet, NegativeGuidanceUNet):
            return call(*args, **kwargs)
        bound = inspect.signature(call).bind(*args, **kwargs)
        bound.apply_defaults()
        scale = bound.arguments.get("guidance_scale", 1.0)
        # the pipelines' own do_classifier_free_guidance
        guided = bool(scale > 1) and getattr(unet.config, "time_cond_proj_dim", None) is None
        before, unet.guided = unet.guided, guided
        try:
            return call(*args, **kwargs)
        finally:
            unet.guided = before


@functools.cache
def _guided_class(cls: type) -> type:
    return type(f"NegativeGuided{cls.__name__}", (_NegativeGuidedMixin, cls), {})


# --------------------------------------------------------------------------------------------------- checkpoints
@dataclass(frozen=True)
class _Weights:
    kind: str  # "lora" or "full"
    folder: Path
    weight_name: str | None = None  # LoRA file inside folder


def _classify(checkpoint: str | Path) -> _Weights:
    """What :func:`workbench.models.apply_checkpoint` accepts, resolved to a LoRA file or a full UNet folder."""
    from samplers.checkpoints import resolve_checkpoint_path

    path = resolve_checkpoint_path(checkpoint)
    if path.is_dir():
        for sub in ("lora", "unet"):
            if (path / sub).is_dir():
                return _classify(path / sub)
        if (path / _LORA_WEIGHT_NAME).is_file():
            return _Weights("lora", path, _LORA_WEIGHT_NAME)
        if (path / "config.json").is_file():
            return _Weights("full", path)
        raise ValueError(f"{path}: no {_LORA_WEIGHT_NAME}, lora/, unet/ or UNet weights (config.json) inside")
    if path.suffix == ".safetensors":
        return _Weights("lora", path.parent, path.name)
    raise ValueError(f"{path}: expected a folder or a .safetensors LoRA file")


def _clean_key(key: str) -> str:
    return key.replace(".base_layer.", ".")


def base_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's own weights with peft's wrappers looked through (``x.base_layer.weight -> x.weight``, no
    ``lora_*`` tensors): theta_base of a UNet that carries (unfused) adapters."""
    return {_clean_key(k): v for k, v in unet.state_dict().items() if ".lora_" not in k}


def lora_deltas(unet: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """``theta - theta_base`` of adapter ``adapter`` at its current scale, per weight key (``scale * B @ A``, peft's
    ``get_delta_weight``, what ``fuse_lora`` adds)."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            delta = module.get_delta_weight(adapter)  # pyright: ignore[reportAttributeAccessIssue]
            out[f"{name}.weight"] = delta.detach()
    if not out:
        raise ValueError(f"the UNet has no LoRA adapter {adapter!r}")
    return out


def _load_unet(w: _Weights, like: nn.Module) -> nn.Module:
    from diffusers import UNet2DConditionModel

    dtype = next(like.parameters()).dtype
    device = next(like.parameters()).device
    unet: Any = UNet2DConditionModel.from_pretrained(str(w.folder), torch_dtype=dtype)
    return unet.to(device)


def _load_adapter(pipe: Any, w: _Weights, name: str) -> None:
    pipe.load_lora_weights(str(w.folder), weight_name=w.weight_name, adapter_name=name)


class _FullDelta(Mapping[str, torch.Tensor]):
    """``theta_full - theta_base`` of a full UNet, key by key on demand (no second full copy in memory)."""

    def __init__(self, model: nn.Module, base: Mapping[str, torch.Tensor]) -> None:
        self.own = base_state(model)
        self.base = base
        mismatch = set(base) ^ set(self.own)
        if mismatch:
            raise ValueError(
                f"full UNet checkpoint does not match the base UNet's layout: {sorted(mismatch)[:3]}"
            )

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.own[key].float() - self.base[key].float()

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


@torch.no_grad()
def merge_negative_state(
    base: Mapping[str, torch.Tensor],
    npo_delta: Mapping[str, torch.Tensor],
    pos_delta: Mapping[str, torch.Tensor] | None,
    merge: float,
    *,
    into: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``theta_neg = theta_base + delta_npo + (1 - merge) * (theta_pos - theta_base)`` key by key, accumulated in
    float32, in each base tensor's dtype; keys missing from a delta have a zero delta. With ``into`` (a state dict
    of the negative UNet) each result is copied into it as soon as it is computed, one tensor at a time."""
    out: dict[str, torch.Tensor] = {}
    for k, b in base.items():
        acc = b.float()
        if k in npo_delta:
            acc = acc + npo_delta[k].float()
        if pos_delta is not None and k in pos_delta:
            acc = acc + (1.0 - merge) * pos_delta[k].float()
        if into is not None:
            into[k].copy_(acc)
            out[k] = into[k]
        else:
            out[k] = acc.to(b.dtype)
    return out


def negative_guidance_pipeline(
    base_pipe: Any,
    *,
    negative: str | Path,
    positive: str | Path | None = None,
    merge: float = 0.0,
    sampler: str = "euler",
) -> Any:
    """A pipeline sharing ``base_pipe``'s modules whose UNet is a :class:`NegativeGuidanceUNet`: uncond branch =
    theta_neg (see the module docstring), cond branch = ``positive`` (``None``: the base model). Use it with
    :func:`samplers.sample` (and :func:`samplers.with_sampler`) as any pipeline.

    ``negative`` (the NPO checkpoint) and ``positive`` are anything :func:`workbench.models.apply_checkpoint`
    accepts: a LoRA folder (diffusers format), a kohya LoRA ``.safetensors``, a full UNet folder or a training run.
    ``merge`` is the official ``merge_weight`` (0: negative = positive + NPO offset; 1: base + NPO offset).

    ``base_pipe`` must hold the clean base UNet. Its UNet is shared: LoRA adapters ``"pos"`` / ``"npo"`` are loaded
    into it where the memory rule says so; after every call the positive adapter state is the active one (so
    ``base_pipe`` itself then renders the positive model).
    """
    if not 0.0 <= merge <= 1.0:
        raise ValueError(f"merge must be in [0, 1], got {merge}")
    base_unet = base_pipe.unet
    if isinstance(base_unet, NegativeGuidanceUNet) or getattr(base_unet, "peft_config", None):
        raise ValueError(
            "base_pipe must hold the plain base UNet (no adapters, no negative guidance applied)"
        )
    neg_w = _classify(negative)
    pos_w = None if positive is None else _classify(positive)
    one_unet = neg_w.kind == "lora" and (pos_w is None or pos_w.kind == "lora")

    if one_unet:
        _load_adapter(base_pipe, neg_w, NEGATIVE_ADAPTER)
        if pos_w is not None:
            _load_adapter(base_pipe, pos_w, POSITIVE_ADAPTER)
        unet = base_unet

        def to_positive() -> None:
            if pos_w is None:
                unet.disable_adapters()
            else:
                unet.enable_adapters()
                unet.set_adapters([POSITIVE_ADAPTER], [1.0])

        def to_negative() -> None:
            unet.enable_adapters()
            if pos_w is None:
                unet.set_adapters([NEGATIVE_ADAPTER], [1.0])
            else:
                unet.set_adapters([NEGATIVE_ADAPTER, POSITIVE_ADAPTER], [1.0, 1.0 - merge])

        to_positive()
        wrapper = NegativeGuidanceUNet(unet, unet, before_positive=to_positive, before_negative=to_negative)
    else:
        with torch.no_grad():
            theta_base = base_state(base_unet)  # views of the base's parameters (adapters never change them)
            # negative model: the NPO UNet itself (full) or a copy of the base carrying delta_npo (LoRA)
            if neg_w.kind == "full":
                neg_unet = _load_unet(neg_w, base_unet)
                npo_delta: Mapping[str, torch.Tensor] = _FullDelta(neg_unet, theta_base)
            else:
                neg_unet = copy.deepcopy(base_unet)
                scratch = with_sampler(base_pipe, sampler, unet=neg_unet)
                _load_adapter(scratch, neg_w, NEGATIVE_ADAPTER)
                npo_delta = {k: v.clone() for k, v in lora_deltas(neg_unet, NEGATIVE_ADAPTER).items()}
                neg_unet.unload_lora()  # pyright: ignore[reportCallIssue]
            # positive model: the base, the base UNet with adapter "pos" (shared), or a second full UNet
            pos_delta: Mapping[str, torch.Tensor] | None
            if pos_w is None:
                pos_unet, pos_delta = base_unet, None
            elif pos_w.kind == "lora":
                _load_adapter(base_pipe, pos_w, POSITIVE_ADAPTER)
                pos_unet, pos_delta = base_unet, lora_deltas(base_unet, POSITIVE_ADAPTER)
                theta_base = base_state(base_unet)
            else:
                pos_unet = _load_unet(pos_w, base_unet)
                pos_delta = _FullDelta(pos_unet, theta_base)
            target = base_state(neg_unet)
            if set(target) != set(theta_base):
                raise ValueError("the negative UNet's layout does not match the base UNet's")
            merge_negative_state(theta_base, npo_delta, pos_delta, merge, into=target)
            del npo_delta, pos_delta, target
            neg_unet.requires_grad_(False).eval()
        wrapper = NegativeGuidanceUNet(pos_unet, neg_unet)

    new = with_sampler(base_pipe, sampler, unet=wrapper)
    new.__class__ = _guided_class(type(new))
    return new


@torch.no_grad()
def negative_unet_for(
    positive: nn.Module,
    theta_base: Mapping[str, torch.Tensor],
    negative: str | Path,
    merge: float,
    *,
    pipe: Any,
    sampler: str = "euler",
    positive_is_base: bool = False,
) -> NegativeGuidanceUNet:
    """Negative-model guidance around an in-memory positive UNet (training validation, where the positive model is
    the policy being trained): ``theta_neg = theta_base + delta_npo + (1 - m)(theta_pos - theta_base)`` with
    ``theta_pos`` the positive module's current weights (a LoRA policy: its base weights plus its adapters' deltas;
    a full one: its weights) and ``theta_base`` the pretrained weights (views are fine: nothing here writes them).

    The negative model is a separate UNet built from the merged state dict (on the meta device first, so no random
    initialisation is paid); ``positive`` is used as it is, adapters included. ``pipe`` lends its ``load_lora_weights``
    to read a LoRA ``negative`` (any checkpoint :func:`negative_guidance_pipeline` accepts). ``positive_is_base``: the
    positive module renders the base weights (a LoRA UNet with its adapters switched off), so ``theta_pos`` is
    ``theta_base`` whatever adapters it carries."""
    from diffusers import UNet2DConditionModel

    if not 0.0 <= merge <= 1.0:
        raise ValueError(f"merge must be in [0, 1], got {merge}")
    neg_w = _classify(negative)
    plain: Any = positive
    config = plain.config
    pos_delta: Mapping[str, torch.Tensor] | None
    if positive_is_base:
        pos_delta = None
    elif getattr(plain, "peft_config", None):
        pos_delta = {}
        for adapter in plain.active_adapters():
            for k, d in lora_deltas(plain, adapter).items():
                pos_delta[k] = pos_delta[k] + d if k in pos_delta else d
    else:
        pos_delta = _FullDelta(plain, theta_base)
    with torch.device("meta"):
        scratch: Any = UNet2DConditionModel.from_config(config)
    dtype = next(iter(theta_base.values())).dtype
    if neg_w.kind == "full":
        neg_full = _load_unet(neg_w, plain)
        npo_delta: Mapping[str, torch.Tensor] = _FullDelta(neg_full, theta_base)
    else:
        scratch.load_state_dict(
            dict(theta_base), assign=True
        )  # the base weights, shared, to read the LoRA into
        view = with_sampler(pipe, sampler, unet=scratch)
        _load_adapter(view, neg_w, NEGATIVE_ADAPTER)
        npo_delta = {k: v.clone() for k, v in lora_deltas(scratch, NEGATIVE_ADAPTER).items()}
        del view, scratch
        with torch.device("meta"):
            scratch = UNet2DConditionModel.from_config(config)
    theta_neg = merge_negative_state(theta_base, npo_delta, pos_delta, merge)
    scratch.load_state_dict({k: v.to(dtype) for k, v in theta_neg.items()}, assign=True)
    scratch.requires_grad_(False).eval()
    wrapper = NegativeGuidanceUNet(positive, scratch)
    return wrapper


def guided_view(pipe: Any, unet: NegativeGuidanceUNet, sampler: str) -> Any:
    """``pipe`` with ``unet`` in place of its UNet and ``sampler``, which tells the wrapper from its
    ``guidance_scale`` whether each call's batch is doubled (diffusers' rule), as :func:`negative_guidance_pipeline`
    does."""
    new = with_sampler(pipe, sampler, unet=unet)
    new.__class__ = _guided_class(type(new))
    return new
