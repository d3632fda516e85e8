"""Export a diffusers SDXL / SD1.5 pipeline as one original-layout checkpoint (what A1111, ComfyUI and Forge load,
and what ``from_single_file`` reads back).

Key layout of the original Stable Diffusion code (CompVis ``ldm`` for SD1.x, Stability ``sgm`` for SDXL):
``model.diffusion_model.*`` (UNet, ``input_blocks`` / ``middle_block`` / ``output_blocks``), ``first_stage_model.*``
(VAE), ``cond_stage_model.transformer.*`` (SD1.x CLIP), ``conditioner.embedders.0.transformer.*`` (SDXL CLIP-L) and
``conditioner.embedders.1.model.*`` (SDXL OpenCLIP bigG, fused ``in_proj`` attention weights).

The mapping is derived from the UNet config (any number of blocks and layers per block), so the same code exports
real SDXL/SD1.5 and the tiny test models. It is the inverse of diffusers' ``convert_ldm_unet_checkpoint`` /
``convert_ldm_vae_checkpoint`` / ``convert_open_clip_checkpoint``; the round trip is tested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def unet_prefix_map(config: Any) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) pairs for a UNet2DConditionModel config."""
    n = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    down_attn = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    pairs: list[tuple[str, str]] = []
    for i in range(n):
        for j in range(layers):
            idx = 1 + i * (layers + 1) + j
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0."))
            if down_attn[i]:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1."))
        if i < n - 1:
            pairs.append(
                (f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (layers + 1)}.0.op.")
            )
        for j in range(layers + 1):
            idx = i * (layers + 1) + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0."))
            if up_attn[i]:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1."))
        if i < n - 1:
            slot = 2 if up_attn[i] else 1
            pairs.append(
                (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (layers + 1) + layers}.{slot}.")
            )
    pairs += [
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    return pairs


def convert_unet(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    prefixes = unet_prefix_map(config)
    out = {}
    for key, value in state.items():
        new = key
        for hf, sd in _UNET_TOP.items():
            if key.startswith(hf + "."):
                new = sd + key[len(hf) :]
                break
        else:
            for hf, sd in prefixes:
                if key.startswith(hf):
                    rest = key[len(hf) :]
                    if "resnets" in hf:
                        for a, b in _RESNET:
                            if rest.startswith(a + "."):
                                rest = b + rest[len(a) :]
                    new = sd + rest
                    break
        out["model.diffusion_model." + new] = value
    return out


def convert_vae(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    n = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        for part in ("encoder", "decoder"):
            new = new.replace(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.")
            new = new.replace(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.")
        for i in range(n):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")
        if ".mid_block.attentions.0." in new:
            new = new.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            for a, b in (
                ("group_norm.", "norm."),
                ("to_q.", "q."),
                ("to_k.", "k."),
                ("to_v.", "v."),
                ("to_out.0.", "proj_out."),
            ):
                new = new.replace(".attn_1." + a, ".attn_1." + b)
            if new.endswith(".weight") and value.ndim == 2:
                value = value.reshape(
                    *value.shape, 1, 1
                )  # linear -> 1x1 conv, as the original VAE stores them
        out["first_stage_model." + new] = value
    return out


def convert_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP text tower keys (fused q/k/v, transposed projection)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    renames = [
        ("text_model.encoder.layers.", "transformer.resblocks."),
        (".layer_norm1.", ".ln_1."),
        (".layer_norm2.", ".ln_2."),
        (".mlp.fc1.", ".mlp.c_fc."),
        (".mlp.fc2.", ".mlp.c_proj."),
        (".self_attn.out_proj.", ".attn.out_proj."),
    ]
    for key, value in state.items():
        if key == "text_model.embeddings.position_ids":
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
            continue
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
            continue
        if key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
            continue
        if key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
            continue
        for proj in ("q_proj", "k_proj", "v_proj"):
            marker = f".self_attn.{proj}."
            if marker in key:
                layer, kind = key.split(marker)
                qkv.setdefault(layer, {}).setdefault(kind, {})[proj[0]] = value
                break
        else:
            new = key
            for a, b in renames:
                new = new.replace(a, b)
            out[new] = value
    for layer, kinds in qkv.items():
        base = layer.replace("text_model.encoder.layers.", "transformer.resblocks.")
        for kind, parts in kinds.items():
            out[f"{base}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _hf_text_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIP text keys with the ``text_model.`` prefix (transformers 5 drops it for CLIPTextModel)."""
    out = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        out[k if k.startswith(("text_model.", "text_projection")) else "text_model." + k] = v
    return out


def pipeline_to_original(pipe: Any) -> dict[str, torch.Tensor]:
    """The original-layout state dict of an SDXL or SD1.5 pipeline."""
    sd: dict[str, torch.Tensor] = {}
    sd.update(convert_unet(pipe.unet.state_dict(), pipe.unet.config))
    sd.update(convert_vae(pipe.vae.state_dict(), pipe.vae.config))
    te = _hf_text_keys(pipe.text_encoder.state_dict())
    if getattr(pipe, "text_encoder_2", None) is not None:
        sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in te.items()})
        te2 = convert_open_clip(_hf_text_keys(pipe.text_encoder_2.state_dict()))
        sd.update({"conditioner.embedders.1.model." + k: v for k, v in te2.items()})
    else:
        sd.update({"cond_stage_model.transformer." + k: v for k, v in te.items()})
    return sd


def save_single_file(pipe: Any, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write the pipeline as one ``.safetensors`` file in the original layout."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
        for k, v in pipeline_to_original(pipe).items()
    }
    save_file(state, str(path))
    return path
