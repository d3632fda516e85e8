"""Prompt, seed and sampling settings of a user's own images, read from what the generating tool embedded.

Formats read (PNG text chunks; PIL exposes them as ``Image.info``):

* **A1111 / Forge / SD.Next**: chunk ``parameters``: the prompt, an optional ``Negative prompt: ...`` line, then one
  line of ``Key: value`` pairs (``Steps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1234, Size: 512x512,
  Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, ...``; values may be quoted when they contain commas).
* **ComfyUI**: chunk ``prompt``: the API-format graph ``{node_id: {"class_type", "inputs"}}`` (``workflow`` holds the
  editor graph and is not needed). The sampler node (``KSampler``, ``KSamplerAdvanced``, ``SamplerCustom``) gives
  seed / noise_seed, steps, cfg, sampler_name and scheduler; its ``positive`` / ``negative`` links lead to text
  encoder nodes (``CLIPTextEncode`` ``text``, ``CLIPTextEncodeSDXL`` ``text_g``), followed through links; the
  checkpoint comes from a ``CheckpointLoader*`` node, the size from ``EmptyLatentImage``.
* **diffusers-based tools**: InvokeAI's ``invokeai_metadata`` JSON (``positive_prompt``, ``seed``, ``steps``,
  ``cfg_scale``, ``scheduler``, ``model.name``) and a plain JSON chunk ``workbench`` / ``generation_parameters``
  (``prompt``, ``seed``, ...), which scripts built on diffusers write with ``PngInfo``; diffusers itself embeds
  nothing.

Otherwise a sidecar caption (``NAME.txt`` or ``NAME.caption`` beside the image, kohya / OneTrainer style) gives the
prompt. Unparseable metadata never fails an import: the image is kept and the reason is in ``notes``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class ImageMetadata:
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    checkpoint: str | None = None
    checkpoint_hash: str | None = None
    width: int | None = None
    height: int | None = None
    format: str = "none"  # a1111 | comfyui | invokeai | json | sidecar | none
    notes: list[str] = field(default_factory=list)

    def to_params(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, [])}


# --------------------------------------------------------------------------------------------------- A1111 / Forge
_A1111_PAIR = re.compile(r'\s*([\w \-/+().]+?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> ImageMetadata:
    """The ``parameters`` text A1111 / Forge write (``modules/infotext_utils.py`` layout: prompt lines, optional
    ``Negative prompt:`` lines, last line = ``Key: value, ...``)."""
    lines = text.strip().split("\n")
    meta = ImageMetadata(format="a1111")
    settings: dict[str, str] = {}
    if lines and re.match(r"^\s*Steps:\s*\d", lines[-1]):
        for m in _A1111_PAIR.finditer(lines[-1]):
            value = m.group(2).strip()
            if value.startswith('"') and value.endswith('"') and len(value) >= 2:
                value = json.loads(value) if _is_json_string(value) else value[1:-1]
            settings[m.group(1).strip()] = value
        lines = lines[:-1]
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative_lines = [line[len("Negative prompt:") :].strip()]
        elif negative_lines is not None:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    meta.prompt = "\n".join(prompt_lines).strip() or None
    meta.negative_prompt = "\n".join(negative_lines).strip() if negative_lines is not None else None
    meta.seed = _int(settings.get("Seed"), meta, "Seed")
    meta.steps = _int(settings.get("Steps"), meta, "Steps")
    meta.guidance = _float(settings.get("CFG scale"), meta, "CFG scale")
    meta.sampler = settings.get("Sampler")
    if meta.sampler and settings.get("Schedule type"):
        meta.sampler = f"{meta.sampler} ({settings['Schedule type']})"
    meta.checkpoint = settings.get("Model")
    meta.checkpoint_hash = settings.get("Model hash")
    size = settings.get("Size", "")
    m = re.fullmatch(r"(\d+)x(\d+)", size.strip())
    if m:
        meta.width, meta.height = int(m.group(1)), int(m.group(2))
    return meta


def _is_json_string(value: str) -> bool:
    try:
        return isinstance(json.loads(value), str)
    except json.JSONDecodeError:
        return False


# ---------------------------------------------------------------------------------------------------------- ComfyUI
_SAMPLER_NODES = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")


def parse_comfyui(graph: dict[str, Any]) -> ImageMetadata:
    """The API-format ``prompt`` graph ComfyUI embeds (``{node_id: {"class_type": ..., "inputs": {...}}}``, links
    are ``[node_id, output_index]``)."""
    meta = ImageMetadata(format="comfyui")
    nodes = {str(k): v for k, v in graph.items() if isinstance(v, dict) and "class_type" in v}
    if not nodes:
        meta.notes.append("ComfyUI 'prompt' chunk holds no nodes")
        return meta
    samplers = [(nid, n) for nid, n in nodes.items() if n["class_type"] in _SAMPLER_NODES]
    if not samplers:
        meta.notes.append("ComfyUI graph has no KSampler-like node")
    else:
        if len(samplers) > 1:
            meta.notes.append(
                f"{len(samplers)} sampler nodes; read the first ({samplers[0][1]['class_type']})"
            )
        inputs = samplers[0][1].get("inputs", {})
        seed = inputs.get("seed", inputs.get("noise_seed"))
        meta.seed = _int(_literal(nodes, seed, ("seed", "noise_seed", "value")), meta, "seed")
        meta.steps = _int(_literal(nodes, inputs.get("steps"), ("steps", "value")), meta, "steps")
        meta.guidance = _float(_literal(nodes, inputs.get("cfg"), ("cfg", "value")), meta, "cfg")
        sampler = _literal(nodes, inputs.get("sampler_name"), ("sampler_name",))
        scheduler = _literal(nodes, inputs.get("scheduler"), ("scheduler",))
        if sampler is not None:
            meta.sampler = str(sampler) + (f" ({scheduler})" if scheduler else "")
        meta.prompt = _text(nodes, inputs.get("positive"))
        meta.negative_prompt = _text(nodes, inputs.get("negative"))
    for n in nodes.values():
        inputs = n.get("inputs", {})
        if n["class_type"].startswith("CheckpointLoader") and meta.checkpoint is None:
            name = inputs.get("ckpt_name")
            meta.checkpoint = str(name) if isinstance(name, str) else None
        if n["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage") and meta.width is None:
            meta.width = _int(inputs.get("width"), meta, "width")
            meta.height = _int(inputs.get("height"), meta, "height")
    return meta


def _follow(nodes: dict[str, Any], value: Any) -> dict[str, Any] | None:
    if isinstance(value, list) and len(value) == 2 and str(value[0]) in nodes:
        return nodes[str(value[0])]
    return None


def _literal(nodes: dict[str, Any], value: Any, keys: tuple[str, ...], depth: int = 0) -> Any:
    """A widget value, following a link to a primitive node (``PrimitiveNode``, ``Seed (rgthree)``...)."""
    node = _follow(nodes, value)
    if node is None:
        return value
    if depth > 8:
        return None
    inputs = node.get("inputs", {})
    for key in keys:
        if key in inputs:
            return _literal(nodes, inputs[key], keys, depth + 1)
    return None


def _text(nodes: dict[str, Any], link: Any, depth: int = 0) -> str | None:
    """The prompt text behind a conditioning link: a text encoder's ``text`` (or SDXL's ``text_g``), following
    links through conditioning nodes and string primitives."""
    if isinstance(link, str):
        return link
    node = _follow(nodes, link)
    if node is None or depth > 16:
        return None
    inputs = node.get("inputs", {})
    for key in ("text", "text_g", "positive", "string", "value", "text_l"):
        if key in inputs:
            found = _text(nodes, inputs[key], depth + 1)
            if found is not None:
                return found
    for key in (
        "conditioning",
        "conditioning_1",
        "conditioning_to",
    ):  # ConditioningCombine, ConditioningSetArea..
        if key in inputs:
            found = _text(nodes, inputs[key], depth + 1)
            if found is not None:
                return found
    return None


# ------------------------------------------------------------------------------------------ diffusers-based tools
def parse_json_params(obj: dict[str, Any], fmt: str) -> ImageMetadata:
    """InvokeAI's ``invokeai_metadata`` or a plain ``{"prompt", "seed", ...}`` chunk."""
    meta = ImageMetadata(format=fmt)
    get = lambda *keys: next((obj[k] for k in keys if obj.get(k) is not None), None)  # noqa: E731
    prompt = get("positive_prompt", "prompt", "caption")
    meta.prompt = prompt if isinstance(prompt, str) else None
    negative = get("negative_prompt")
    meta.negative_prompt = negative if isinstance(negative, str) else None
    meta.seed = _int(get("seed"), meta, "seed")
    meta.steps = _int(get("steps", "num_inference_steps"), meta, "steps")
    meta.guidance = _float(get("cfg_scale", "guidance_scale", "guidance", "cfg"), meta, "guidance")
    sampler = get("scheduler", "sampler")
    meta.sampler = str(sampler) if sampler is not None else None
    model = get("model", "checkpoint", "base")
    if isinstance(model, dict):
        meta.checkpoint = model.get("name") or model.get("model_name")
        meta.checkpoint_hash = model.get("hash")
    elif model is not None:
        meta.checkpoint = str(model)
    meta.width = _int(get("width"), meta, "width")
    meta.height = _int(get("height"), meta, "height")
    return meta


# ------------------------------------------------------------------------------------------------------- dispatch
def read_metadata(path: str | Path) -> ImageMetadata:
    """What the file embeds (A1111 > ComfyUI > InvokeAI > JSON), else its sidecar caption, else nothing."""
    from PIL import Image

    path = Path(path)
    with Image.open(path) as im:
        info = {k: v for k, v in im.info.items() if isinstance(k, str) and isinstance(v, str)}
        size = im.size
    meta = _from_chunks(info)
    if meta.prompt is None:
        for suffix in (".txt", ".caption"):
            sidecar = path.with_suffix(suffix)
            if sidecar.is_file():
                caption = sidecar.read_text(encoding="utf-8", errors="replace").strip()
                if caption:
                    meta.prompt = caption
                    if meta.format == "none":
                        meta.format = "sidecar"
                    else:
                        meta.notes.append(f"prompt from {sidecar.name}")
                    break
    if meta.width is None:
        meta.width, meta.height = size
    return meta


def _from_chunks(info: dict[str, str]) -> ImageMetadata:
    if "parameters" in info:
        return parse_a1111(info["parameters"])
    if "prompt" in info:
        try:
            graph = json.loads(info["prompt"])
        except json.JSONDecodeError:
            graph = None
        if isinstance(graph, dict):
            return parse_comfyui(graph)
        meta = ImageMetadata(format="none")
        meta.notes.append("a 'prompt' chunk that is not a ComfyUI graph")
        return meta
    for key, fmt in (
        ("invokeai_metadata", "invokeai"),
        ("workbench", "json"),
        ("generation_parameters", "json"),
    ):
        if key in info:
            try:
                obj = json.loads(info[key])
            except json.JSONDecodeError:
                meta = ImageMetadata()
                meta.notes.append(f"chunk {key!r} is not JSON")
                return meta
            if isinstance(obj, dict):
                return parse_json_params(obj, fmt)
    return ImageMetadata()


def _int(value: Any, meta: ImageMetadata, name: str) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        meta.notes.append(f"{name}={value!r} is not an integer")
        return None


def _float(value: Any, meta: ImageMetadata, name: str) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(str(value).strip())
    except ValueError:
        meta.notes.append(f"{name}={value!r} is not a number")
        return None
