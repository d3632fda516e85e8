"""FLOPs of each phase of a Diffusion-DPO step, and a GPU memory estimate, at real SDXL size, without a GPU.

The UNet, VAE and both text encoders are SDXL base 1.0's architectures (``benchmarks/gpu_check.py``'s configs) built
on PyTorch's meta device: shapes and dtypes only, nothing allocated, so a 2.57 B-parameter model costs nothing here.
One step's phases run on meta tensors under ``torch.utils.flop_counter.FlopCounterMode`` (matrix products,
convolutions, attention; forward and backward):

* the diffusers example's extra work per step: VAE-encode both images of every pair at 1024 px (fp32, as
  ``model.vae_dtype=fp32``) and run both text encoders (the workbench caches both once);
* policy forward over all 2B images (bf16), backward (LoRA: gradients flow through the whole UNet to the adapters,
  no frozen-weight gradients; full fine-tune: weight gradients too), reference forward without gradient.

Memory (GiB, ``2**30`` bytes): resident weights (UNet bf16 for LoRA, fp32 master weights for a full fine-tune, VAE
fp32, text encoders bf16), gradients and optimizer state by optimizer (AdamW 8 bytes per trained parameter,
bitsandbytes 8-bit AdamW 2, Adafactor its factored row and column statistics), a frozen bf16 reference copy for full
fine-tunes, and activations = the bytes autograd saves for backward in the policy forward (counted with
``torch.autograd.graph.saved_tensors_hooks``, each saved tensor once; attention as the flash kernel saves it: q, k,
v, output and log-sum-exp, never the score matrix), with and without gradient checkpointing (then only each block's
inputs are kept, plus one block's activations during its recomputation; estimated as the largest block's share).
Not counted: the CUDA context and allocator fragmentation (typically 1-3 GiB), cuDNN/cuBLAS workspaces.

    python benchmarks/sdxl_estimate.py [--pairs 2]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GIB = 2**30
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _flash_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """SDPA as the CUDA flash kernel runs it (the meta device would otherwise pick the math path, which saves the
    full score matrix for backward)."""
    if args or kwargs.get("attn_mask") is not None:
        raise ValueError("the estimate expects SDXL's unmasked attention")
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]


def build(lora: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from gpu_check import SDXL_UNET, SDXL_VAE
    from gpu_check import clip_text_config as clip
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        te1 = CLIPTextModel(clip(768, 3072, 12, 12, "quick_gelu"))
        te2 = CLIPTextModelWithProjection(clip(1280, 5120, 32, 20, "gelu"))
        unet.to(torch.bfloat16)
        te1.to(torch.bfloat16)
        te2.to(torch.bfloat16)
        if lora:
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.add_adapter(
                LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
            )
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)  # under autocast the adapters' matmuls run in bf16 too
    return {"unet": unet, "vae": vae, "te1": te1, "te2": te2}


def _inputs(n: int) -> dict[str, Any]:
    with torch.device("meta"):
        return {
            "sample": torch.empty(n, 4, 128, 128, dtype=torch.bfloat16),
            "timestep": torch.zeros(n, dtype=torch.long),
            "encoder_hidden_states": torch.empty(n, 77, 2048, dtype=torch.bfloat16),
            "added_cond_kwargs": {
                "text_embeds": torch.empty(n, 1280, dtype=torch.bfloat16),
                "time_ids": torch.empty(n, 6, dtype=torch.bfloat16),
            },
        }


def phases(pairs: int, lora: bool) -> dict[str, Any]:
    """FLOPs per phase and saved-activation bytes for one step with ``pairs`` pairs (2 * pairs images)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = build(lora)
    unet, n = m["unet"], 2 * pairs
    out: dict[str, Any] = {"params": {k: sum(p.numel() for p in v.parameters()) for k, v in m.items()}}
    out["trained"] = (
        sum(p.numel() for p in unet.parameters() if p.requires_grad) if lora else out["params"]["unet"]
    )
    if not lora:
        unet.requires_grad_(True)
    flops: dict[str, float] = {}
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = (
        _flash_sdpa  # diffusers' AttnProcessor2_0 calls F.scaled_dot_product_attention
    )
    try:
        with FlopCounterMode(display=False) as fc, torch.device("meta"):
            f0 = fc.get_total_flops()
            m["vae"].encode(torch.empty(n, 3, 1024, 1024)).latent_dist.sample()
            flops["vae"] = fc.get_total_flops() - f0
            f0 = fc.get_total_flops()
            ids = torch.zeros(pairs, 77, dtype=torch.long)
            m["te1"](ids, output_hidden_states=True)
            m["te2"](ids, output_hidden_states=True)
            flops["text"] = fc.get_total_flops() - f0

            saved: dict[int, int] = {}
            unit_bytes: dict[str, int] = {}  # per checkpointed unit (ResnetBlock2D / BasicTransformerBlock)
            stack: list[str] = []

            def pack(t: torch.Tensor) -> torch.Tensor:
                if id(t) not in saved:
                    saved[id(t)] = t.numel() * t.element_size()
                    if stack:
                        unit_bytes[stack[-1]] = unit_bytes.get(stack[-1], 0) + saved[id(t)]
                return t

            handles = []
            for name, module in unet.named_modules():
                if type(module).__name__ in ("ResnetBlock2D", "BasicTransformerBlock"):
                    handles.append(
                        module.register_forward_pre_hook(lambda mod, a, name=name: stack.append(name))
                    )
                    handles.append(module.register_forward_hook(lambda mod, a, o: stack.pop() and None))

            f0 = fc.get_total_flops()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                pred = unet(**_inputs(n)).sample
            flops["policy_fwd"] = fc.get_total_flops() - f0
            for h in handles:
                h.remove()
            out["activation_bytes"] = sum(saved.values())
            out["largest_unit_bytes"] = max(unit_bytes.values())
            unet.enable_gradient_checkpointing()
            kept: dict[int, int] = {}

            def pack_kept(t: torch.Tensor) -> torch.Tensor:
                kept.setdefault(id(t), t.numel() * t.element_size())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack_kept, lambda t: t):
                unet(**_inputs(n))
            unet.disable_gradient_checkpointing()
            # checkpointed: what stays saved, plus one unit's activations while it is recomputed in backward
            out["activation_ckpt_bytes"] = sum(kept.values()) + out["largest_unit_bytes"]
            f0 = fc.get_total_flops()
            pred.float().pow(2).mean().backward()
            flops["backward"] = fc.get_total_flops() - f0
            f0 = fc.get_total_flops()
            with torch.no_grad():
                if lora:
                    unet.disable_adapters()
                unet(**_inputs(n))
            flops["ref_fwd"] = fc.get_total_flops() - f0
    finally:
        F.scaled_dot_product_attention = original
    out["flops"] = flops
    return out


def adafactor_state(unet_shapes: list[torch.Size]) -> int:
    """transformers.Adafactor (relative_step=False, no first moment): row + column second moments for matrices (and
    conv kernels, factored over the last two dims), the full second moment for vectors; fp32."""
    n = 0
    for s in unet_shapes:
        if len(s) >= 2:
            lead = 1
            for d in s[:-2]:
                lead *= d
            n += lead * (s[-1] + s[-2])
        else:
            n += s.numel()
    return 4 * n


def memory(pairs: int) -> dict[str, dict[str, float]]:
    lora, full = phases(pairs, lora=True), phases(pairs, lora=False)
    shapes = [p.shape for p in build(lora=False)["unet"].parameters()]
    unet_n, vae_n = full["params"]["unet"], full["params"]["vae"]
    te_n = full["params"]["te1"] + full["params"]["te2"]
    frozen = 4 * vae_n + 2 * te_n  # VAE fp32, text encoders bf16 (resident for validation / caching)
    r = lora["trained"]
    # LoRA: the UNet in bf16, the adapters in fp32 with their gradients and AdamW's two moments (16 bytes each).
    # Full fine-tune: fp32 master weights, the frozen bf16 reference copy, and under bf16 autocast a cached bf16 copy
    # of every weight for the step; gradients (fp32) appear during backward as activations are freed, so the peak is
    # the larger of the two (with set_to_none=True there are no gradients during the forward).
    n = unet_n
    rows = {
        "lora_adamw": (2 * n + 16 * r + frozen, lora, 0),
        "full_adamw": (4 * n + 8 * n + 2 * n + 2 * n + frozen, full, 4 * n),
        "full_adamw_8bit": (4 * n + 2 * n + 2 * n + 2 * n + frozen, full, 4 * n),
        "full_adafactor": (4 * n + adafactor_state(shapes) + 2 * n + 2 * n + frozen, full, 4 * n),
    }
    out = {}
    for name, (static, ph, grads) in rows.items():
        out[name] = {
            "static_gib": static / GIB,
            "peak_gib": (static + max(ph["activation_bytes"], grads)) / GIB,
            "peak_ckpt_gib": (static + max(ph["activation_ckpt_bytes"], grads)) / GIB,
        }
    out["_phases"] = {"lora": lora, "full": full}  # type: ignore[assignment]
    return out


def report(pairs: int = 2) -> None:
    mem = memory(pairs)
    ph = mem.pop("_phases")
    lora = ph["lora"]  # type: ignore[index]
    full = ph["full"]  # type: ignore[index]
    f = lora["flops"]
    ours = f["policy_fwd"] + f["backward"] + f["ref_fwd"]
    base = ours + f["vae"] + f["text"]
    print(
        f"\n== real SDXL size (meta device): {pairs} pairs ({2 * pairs} images) at 1024 px, LoRA r8 on attention"
    )
    print(f"UNet {lora['params']['unet'] / 1e9:.3f} B params, LoRA {lora['trained'] / 1e6:.2f} M trained")
    print(f"{'phase':12s} {'TFLOP':>9s} {'share of baseline':>18s}")
    for k in ("vae", "text", "policy_fwd", "backward", "ref_fwd"):
        print(f"{k:12s} {f[k] / 1e12:9.3f} {100 * f[k] / base:17.1f}%")
    print(
        f"baseline step {base / 1e12:.2f} TFLOP, ours {ours / 1e12:.2f} TFLOP: at equal FLOP/s ours is "
        f"{base / ours:.2f}x faster (the most that caching the encoders can give)"
    )
    ff = full["flops"]
    print(f"full fine-tune backward {ff['backward'] / 1e12:.2f} TFLOP (LoRA {f['backward'] / 1e12:.2f})")
    print(f"\nmemory estimate ({pairs} pairs, bf16 activations; GiB):")
    print(
        f"activations saved for backward: LoRA {lora['activation_bytes'] / GIB:.1f}, full "
        f"{full['activation_bytes'] / GIB:.1f}; with gradient checkpointing LoRA "
        f"{lora['activation_ckpt_bytes'] / GIB:.1f}, full {full['activation_ckpt_bytes'] / GIB:.1f}"
    )
    print(
        "static = weights + optimizer state + frozen copies + encoders; peak adds activations (or gradients)"
    )
    print(f"{'setting':18s} {'static':>8s} {'peak':>8s} {'peak, grad ckpt':>16s}")
    for name, v in mem.items():
        print(f"{name:18s} {v['static_gib']:8.1f} {v['peak_gib']:8.1f} {v['peak_ckpt_gib']:16.1f}")


GPUS = {"24 GB": 24, "40 GB": 40, "48 GB": 48, "80 GB": 80, "141 GB (H200)": 141}
CUDA_OVERHEAD_GIB = (
    2.0  # CUDA context, workspaces, allocator slack (the H200 runs measured 1.4 GiB above the estimate)
)


def shipped_configs() -> list[dict[str, Any]]:
    """Peak-memory estimate per device for every ``configs/sdxl/*.yaml`` as shipped (its per-device batch, images per
    group, precision, optimizer, reference and gradient checkpointing), from the per-image activations measured above
    (2 pairs, divided by 4) and the per-parameter byte counts of :func:`memory`."""
    from workbench.config import load_config

    lora, full = phases(2, lora=True), phases(2, lora=False)
    n = full["params"]["unet"]
    shapes = [p.shape for p in build(lora=False)["unet"].parameters()]
    rows = []
    for path in sorted((ROOT / "configs/sdxl").glob("*.yaml")):
        cfg = load_config(path, [])
        m, t = cfg.model, cfg.train
        k = {"rankdpo": 4, "self_npo": 1, "sft": 1}.get(
            cfg.objective.name, 2
        )  # images per group through the UNet
        images = t.batch_size * k
        half = 2 if t.mixed_precision != "no" else 4
        enc = {"fp32": 4, "fp16": 2, "bf16": 2}
        frozen = enc.get(str(m.vae_dtype), 4) * full["params"]["vae"] + enc.get(
            str(m.text_encoder_dtype), 2
        ) * (full["params"]["te1"] + full["params"]["te2"])
        opt = cfg.optimizer.name
        ph = lora if m.finetune == "lora" else full
        key = "activation_ckpt_bytes" if t.gradient_checkpointing else "activation_bytes"
        act = ph[key] / 4 * images
        if m.finetune == "lora":
            per = {"adamw": 16, "adamw_8bit": 10, "adafactor": 12}[opt]
            static, grads = half * n + per * lora["trained"] + frozen, 0
        else:
            state = {"adamw": 8 * n, "adamw_8bit": 2 * n, "adafactor": adafactor_state(shapes)}[opt]
            ref_dtype = str(getattr(m, "reference_dtype", "auto"))
            ref = (4 if ref_dtype == "fp32" else 2) * n if cfg.objective.name != "sft" else 0
            static, grads = (
                4 * n + state + ref + half * n + frozen,
                4 * n,
            )  # + autocast's half-precision weight copies
        peak = (static + max(act, grads)) / GIB + CUDA_OVERHEAD_GIB
        fits = [g for g, cap in GPUS.items() if peak <= cap * 1e9 / GIB]
        rows.append(
            {
                "config": path.name,
                "setup": f"{m.finetune}, {opt}, {t.batch_size} x {k} images, ckpt {'on' if t.gradient_checkpointing else 'off'}",
                "peak_gib": peak,
                "smallest_gpu": fits[0] if fits else "none (lower train.batch_size)",
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--configs", action="store_true", help="estimate every configs/sdxl/*.yaml as shipped")
    args = p.parse_args()
    if args.configs:
        print(f"{'config':18s} {'setup':52s} {'peak GiB':>9s}  smallest GPU that fits")
        for r in shipped_configs():
            print(f"{r['config']:18s} {r['setup']:52s} {r['peak_gib']:9.1f}  {r['smallest_gpu']}")
        return
    report(args.pairs)


if __name__ == "__main__":
    main()
