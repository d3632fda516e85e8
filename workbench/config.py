"""Run configuration: the single place where every field, default and its documentation lives.

YAML is parsed by OmegaConf (PyYAML would read ``lr: 5e-4`` as a string) and ``a.b=c`` command-line overrides are
merged on top; the result is validated by pydantic v2 models with ``extra="forbid"`` and discriminated unions on
``name`` (objective, optimizer, scheduler, noising). Configs select registered names; they never name import paths.
"""

from __future__ import annotations

import difflib
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from samplers.noising import NOISING, noising_config
from trainers import OBJECTIVES
from workbench.registry import Registry


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------------- run + model
class RunSection(_Strict):
    output_dir: str = Field(default="runs", description="Parent folder of run directories.")
    name: str = Field(default="run", description="Run directory name under output_dir.")
    seed: int = Field(default=0, description="Global seed: noise, timesteps, data order, LoRA init.")
    deterministic: bool = Field(
        default=False, description="torch.use_deterministic_algorithms (CPU exact-resume tests)."
    )


class LoraSection(_Strict):
    rank: int = Field(default=8, ge=1, description="LoRA rank r.")
    alpha: float = Field(default=8.0, gt=0, description="LoRA alpha; scale = alpha / rank.")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="UNet module names (peft target_modules). The diffusers DPO example uses attention only.",
    )
    init: Literal["gaussian", "default"] = Field(
        default="gaussian",
        description="peft init_lora_weights: both zero-initialise B, so the LoRA starts as identity.",
    )


class ModelSection(_Strict):
    source: str = Field(
        ..., description="A diffusers folder, a hub id, or a single-file checkpoint (.safetensors/.ckpt)."
    )
    family: Literal["auto", "sdxl", "sd15"] = Field(default="auto", description="sd15 also covers SD2.x.")
    single_file_config: str | None = Field(
        default=None,
        description="For single files: a diffusers folder or hub id whose configs describe the checkpoint.",
    )
    vae: str | None = Field(
        default=None, description="Separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix): folder or id."
    )
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        default="auto", description="auto = the scheduler config's prediction_type."
    )
    finetune: Literal["lora", "full"] = Field(
        default="lora", description="LoRA adapters, or all UNet weights."
    )
    lora: LoraSection = Field(default_factory=LoraSection)
    vae_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        default="fp32", description="fp32 avoids the stock SDXL VAE's fp16 NaNs (diffusers SDXL DPO script)."
    )
    text_encoder_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    reference_dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto",
        description="Full fine-tune only: dtype of the frozen reference UNet copy. auto = the policy's compute "
        "dtype (train.mixed_precision, fp32 without it), as Salesforce train.py casts ref_unet to weight_dtype; "
        "a lower one saves memory but moves the step-0 DPO logit off 0 (a warning says so).",
    )


# ---------------------------------------------------------------------------------------------------------- data
class DataSource(_Strict):
    format: Literal["pickapic_parquet", "pair_jsonl", "ranking_jsonl", "image_folder", "app_votes"] = Field(
        ...,
        description="pickapic_parquet: jpg_0/jpg_1/label_0/label_1/caption (file or folder of shards); "
        "image_folder: images with same-name .txt captions, no preferences (self_npo, sft); "
        "app_votes: the vote store of `workbench app` (votes.sqlite), its active votes as pairs.",
    )
    path: str
    labels: Literal["human", "scorer"] = Field(
        default="human",
        description="human: the file's labels (label_0 / prefer_0). scorer: the soft labels and order written by "
        "`workbench relabel` / `workbench synth` (soft_label_0 / soft_label_1; SmPO's smoothing).",
    )
    allow_outside_paths: bool = Field(
        default=False,
        description="pair_jsonl / ranking_jsonl: image paths must resolve inside the JSONL file's folder (symlinks "
        "followed); rows naming a path outside (../../etc/passwd, an absolute path elsewhere) are skipped and "
        "reported. image_folder: symlinks leading out of the folder are skipped. true: trust this source's paths "
        "wherever they point.",
    )


class CacheSection(_Strict):
    enabled: bool = True
    dir: str = Field(
        default=".cache/workbench", description="VAE latents + text embeddings, keyed by content and model."
    )


class DataSection(_Strict):
    sources: list[DataSource] = Field(..., min_length=1)
    resolution: int = Field(default=1024, ge=8, description="Square training resolution (pixels).")
    crop: Literal["center", "random"] = Field(
        default="center", description="One joint crop for all images of a group; random: see random_crops."
    )
    random_crops: int | None = Field(
        default=None,
        ge=1,
        description="crop=random: random crops cached per group (None = 4), each VAE-encoded once with its own "
        "SDXL crop offset; every step draws one of them from the batch generator (cost: N x encode time and "
        "disk). 1 = one crop, drawn when the cache is built. crop=center has exactly one (None or 1).",
    )
    hflip: bool = Field(
        default=False,
        description="Flip both images of a group together (one draw per group per step); the flipped view's "
        "SDXL crop offset is measured in the flipped image.",
    )
    proportion_empty_prompts: float = Field(
        default=0.2, ge=0, le=1, description="Salesforce train.py default 0.2."
    )
    drop_ties: bool = Field(
        default=True,
        description="Drop ties: Pick-a-Pic label_0 == 0.5 (as the official code does), pair JSONL prefer_0 == "
        "prefer_1, rankings whose best and worst scores are equal. Partial ties in a ranking are kept (the "
        "scores carry them). Kept ties get pref_prob 0.5.",
    )
    max_bad_fraction: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="Stop with an error when more than this fraction of rows is unreadable.",
    )
    max_samples: int | None = Field(default=None, ge=1, description="Use only the first N groups.")
    cache: CacheSection = Field(default_factory=CacheSection)

    @model_validator(mode="after")
    def _crops(self) -> DataSection:
        if self.crop == "center" and (self.random_crops or 1) > 1:
            raise ValueError(
                f"random_crops={self.random_crops} needs crop=random (a centre crop is always the same); "
                "set data.crop=random or remove data.random_crops"
            )
        return self

    @property
    def n_crops(self) -> int:
        """Crops cached per group: ``random_crops`` resolved (4 for random crops unless set, 1 for centre)."""
        if self.crop == "center":
            return 1
        return self.random_crops if self.random_crops is not None else 4


# ---------------------------------------------------------------------------------------------------- optimizers
class AdamW(_Strict):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=1e-2, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    implementation: Literal["auto", "foreach", "fused", "for-loop"] = Field(
        default="auto",
        description="torch.optim.AdamW's kernel: auto = torch's default (foreach on CUDA, a per-tensor loop on "
        "CPU); foreach / fused force one (fused: CUDA or CPU, torch >= 2.4). Ignored by adamw_8bit.",
    )


class AdamW8bit(AdamW):
    """bitsandbytes' 8-bit AdamW (optimizer states in 8 bit); the same fields as AdamW."""

    name: Literal["adamw_8bit"] = "adamw_8bit"  # pyright: ignore[reportIncompatibleVariableOverride]  # the discriminator narrows AdamW's name


class Adafactor(_Strict):
    """transformers.Adafactor as the Salesforce SDXL run uses it (relative_step=False, scale_parameter=False)."""

    name: Literal["adafactor"] = "adafactor"
    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=1e-2, ge=0)
    clip_threshold: float = 1.0


Optimizer = Annotated[AdamW | AdamW8bit | Adafactor, Field(discriminator="name")]


class Constant(_Strict):
    name: Literal["constant"] = "constant"


class ConstantWithWarmup(_Strict):
    name: Literal["constant_with_warmup"] = "constant_with_warmup"
    warmup_steps: int = Field(default=0, ge=0, description="In optimizer steps.")


class Cosine(_Strict):
    name: Literal["cosine"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)


Scheduler = Annotated[Constant | ConstantWithWarmup | Cosine, Field(discriminator="name")]


def registry_union(registry: Registry[Any]) -> Any:
    """The discriminated union (on ``name``) of the config models registered in ``registry``."""
    return Annotated[
        Union[tuple(entry.config_cls for _, entry in registry.items())],  # noqa: UP007
        Field(discriminator="name"),
    ]


# Built from the registries, so a new noising method or objective needs only its module and one import;
# refresh_schema rebuilds them when a registry changes after import.
Noising = registry_union(NOISING)
ObjectiveConfig = registry_union(OBJECTIVES)


# ------------------------------------------------------------------------------------------ train / val / logging
class TrainSection(_Strict):
    max_steps: int = Field(..., ge=1, description="Optimizer steps.")
    batch_size: int = Field(default=1, ge=1, description="Groups (pairs) per device per micro-step.")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    scale_lr: bool = Field(
        default=False,
        description="lr *= grad_accum * batch_size * num_processes (the official launchers' --scale_lr).",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return (
            "no" if value is False else value
        )  # YAML 1.1 reads a bare `no` (also `train.mixed_precision=no`) as false

    gradient_checkpointing: bool = False
    compile: bool = Field(
        default=False,
        description="torch.compile the UNet (nn.Module.compile, default inductor backend). The first steps pay the "
        "compilation (seconds on a GPU, minutes on a small CPU); a graph that fails to compile runs eager with a "
        "warning. Measured in benchmarks/dpo_step.py.",
    )
    channels_last: bool = Field(
        default=False,
        description="UNet weights and inputs in channels-last memory format (NHWC convolutions).",
    )
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="None disables clipping.")
    attention: Literal["sdpa", "xformers"] = Field(
        default="sdpa", description="xformers when installed and configured."
    )
    checkpoint_every: int = Field(default=500, ge=1)
    keep_last: int = Field(default=3, ge=1, description="Checkpoints kept; older ones are deleted.")
    resume: str | None = Field(default=None, description="'latest' or a checkpoint directory.")
    overwrite: bool = Field(
        default=False,
        description="Train into a run directory that already holds a run (final/, checkpoints/ or metrics.jsonl): "
        "its outputs are removed first (see workbench.rundir.RUN_OUTPUTS). Without it such a run is refused.",
    )
    max_nonfinite_steps: int = Field(
        default=5, ge=1, description="Stop after this many non-finite losses in a row."
    )
    log_every: int = Field(default=1, ge=1)
    num_workers: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _resume_or_overwrite(self) -> TrainSection:
        if self.resume and self.overwrite:
            raise ValueError(
                "train.resume and train.overwrite=true contradict each other (continue the run, or replace it); "
                "give one of them"
            )
        return self


class ValidationSection(_Strict):
    every: int = Field(default=0, ge=0, description="Validate every N steps (0 = only at the end).")
    prompts: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0, 1])
    num_inference_steps: int = Field(default=20, ge=1)
    guidance_scale: float = Field(default=5.0, ge=0)
    sampler: str = Field(
        default="euler",
        description="A registered sampler (workbench ls samplers); images come from samplers.sample.",
    )
    scorers: list[str] = Field(
        default_factory=list, description="Registered scorer names logged as reward/<name>."
    )
    scorer_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    negative: str | None = Field(
        default=None,
        description="An NPO / Self-NPO checkpoint (LoRA or full UNet, or a run) in the unconditional branch of CFG "
        "for both rows: theta_neg = theta_base + delta_npo + (1 - m)(theta_pos - theta_base), theta_pos = the policy "
        "(tuned row) or the base (base row).",
    )
    negative_merge: float = Field(
        default=0.0, ge=0.0, le=1.0, description="m in the formula above (official 0)."
    )


class LoggingSection(_Strict):
    tensorboard: bool = True
    wandb_project: str | None = None


class RunConfig(_Strict):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection
    data: DataSection
    objective: ObjectiveConfig  # pyright: ignore[reportInvalidTypeForm]  # a union built from the registry at import
    optimizer: Optimizer = Field(default_factory=AdamW)
    scheduler: Scheduler = Field(default_factory=Constant)
    noising: Noising | None = Field(  # pyright: ignore[reportInvalidTypeForm]  # same
        None, description="None = the objective's own noising (its spec's default, e.g. forward for DPO)."
    )
    train: TrainSection
    validation: ValidationSection = Field(default_factory=ValidationSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    @model_validator(mode="after")
    def _objective_matches_data(self) -> RunConfig:
        """The objective's needs against the data's structure (what the formats can hold); the readers check the
        rows themselves (K, soft labels, scores) when the data is read."""
        name = self.objective.name
        needs = OBJECTIVES.get(name).needs
        for i, src in enumerate(self.data.sources):
            kind = SOURCE_KINDS[src.format]
            if kind == "images" and needs.data not in ("winners", "none"):
                raise ValueError(
                    f"objective {name} needs {needs.data}; data.sources[{i}] is image_folder (captioned images "
                    "without preferences), which only objectives that use no preference (self_npo) or only the "
                    "preferred images (sft) can train on. Use pair or ranking data."
                )
            if needs.data == "rankings" and kind == "pairs":
                raise ValueError(
                    f"objective {name} needs rankings (groups of K >= {needs.min_k} images, best first); data.sources[{i}] is "
                    f"{src.format} ({kind}). Use ranking_jsonl data (workbench synth writes rankings.jsonl) or a "
                    "pairwise objective."
                )
            if needs.soft_labels and src.format == "pickapic_parquet" and src.labels != "scorer":
                raise ValueError(
                    f"objective {name} needs soft preference labels; data.sources[{i}] is pickapic_parquet, whose "
                    f"human labels are 0 / 0.5 / 1. Score its pairs (`workbench relabel {src.path} --scorer NAME`) "
                    f"and set data.sources[{i}].labels: scorer, or use pair_jsonl with fractional prefer_0 / prefer_1."
                )
            if src.labels == "scorer" and src.format == "ranking_jsonl":
                raise ValueError(
                    f"data.sources[{i}].labels: scorer applies to pairs (pickapic_parquet, pair_jsonl); "
                    "ranking_jsonl is ordered by its own scores"
                )
        spec = OBJECTIVES.get(name)
        if spec.noising_options is not None:  # an explicit noising: section must not contradict the objective
            noising_config(spec.noising, spec.noising_options(self.objective), self.noising)
        if self.validation.sampler:
            from samplers.schedulers import SAMPLERS

            if self.validation.sampler not in SAMPLERS:
                raise ValueError(
                    f"validation.sampler {self.validation.sampler!r} is not registered; known: {', '.join(SAMPLERS)}"
                )
        if self.validation.scorers or self.validation.scorer_options:
            from rewards import SCORERS

            for name in self.validation.scorers:
                if name not in SCORERS:
                    raise ValueError(
                        f"validation.scorers: {name!r} is not a registered scorer; known: {', '.join(SCORERS)} "
                        "(workbench ls scorers); options go in validation.scorer_options.NAME"
                    )
            for name in self.validation.scorer_options:
                if name not in self.validation.scorers:
                    raise ValueError(
                        f"validation.scorer_options.{name}: {name!r} is not in validation.scorers "
                        f"({', '.join(self.validation.scorers) or 'empty'}); add it there or remove the options"
                    )
        return self


#: what each data format can hold: pairs (two images and a label), rankings (K >= 2 images, best first) or images
#: (one captioned image, no preference).
SOURCE_KINDS = {
    "pickapic_parquet": "pairs",
    "pair_jsonl": "pairs",
    "ranking_jsonl": "rankings",
    "image_folder": "images",
    "app_votes": "pairs",
}


# ------------------------------------------------------------------------------------------------------- loading
class ConfigError(ValueError):
    """A config problem, with a message naming the dotted path, the bad value and what is allowed."""


def _allowed_fields(loc: tuple[Any, ...], data: Any) -> list[str] | None:
    """Field names allowed at ``loc`` (the parent of an unknown key), following discriminated unions by ``name``."""
    model, _ = _model_at(loc, data)
    return list(model.model_fields) if model is not None else None


def _model_at(loc: tuple[Any, ...], data: Any) -> tuple[type[BaseModel] | None, list[type[BaseModel]]]:
    """The model at ``loc`` (unions resolved by the ``name`` in ``data``) and, when ``loc`` is a discriminated union,
    all of its variants (else ``[]``)."""
    model: Any = RunConfig
    node = data
    variants: list[type[BaseModel]] = []
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None, []
        field = model.model_fields.get(str(part))
        if field is None:
            return None, []
        node = node.get(part) if isinstance(node, dict) else None
        variants = _variants(field.annotation)
        model = _resolve(field.annotation, node)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model, variants
    return None, []


def _members(annotation: Any) -> list[Any]:
    """The types a field may hold: unions (``Union[A, B]``, ``A | B``, ``Optional``) and ``Annotated`` flattened,
    ``None`` left out."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [m for a in get_args(annotation) if a is not type(None) for m in _members(a)]
    return [annotation]


def _variants(annotation: Any) -> list[type[BaseModel]]:
    """The members of a union tagged by ``name`` (``[]`` for anything else)."""
    members = _members(annotation)
    return [m for m in members if _tag(m) is not None] if len(members) > 1 else []


def _tag(model: Any) -> str | None:
    if isinstance(model, type) and issubclass(model, BaseModel) and "name" in model.model_fields:
        return model.model_fields["name"].default
    return None


def _resolve(annotation: Any, node: Any) -> Any:
    """The model a field holds, choosing a union member by the ``name`` in ``node``."""
    members = _members(annotation)
    if len(members) == 1:
        return members[0]
    name = node.get("name") if isinstance(node, dict) else None
    return next((m for m in members if _tag(m) is not None and _tag(m) == name), None)


def _unknown_key_message(parent: tuple[Any, ...], key: str, data: Any) -> str:
    """``a.b.key: unknown key...`` with a close match, and for union variants the variant's keys, which other
    variants do have the key, and the two ways out (delete it with ``~a.b.key``, or choose such a variant)."""
    path = ".".join(str(p) for p in (*parent, key))
    model, variants = _model_at(parent, data)
    allowed = list(model.model_fields) if model is not None else []
    hint = difflib.get_close_matches(key, allowed, n=1)
    did = f" Did you mean {'.'.join(map(str, [*parent, hint[0]]))!r}?" if hint else ""
    tag = _tag(model)
    if not variants or tag is None:
        return f"{path}: unknown key.{did} Allowed keys here: {', '.join(allowed)}."
    where = ".".join(str(p) for p in parent)
    owners = [str(_tag(v)) for v in variants if key in v.model_fields]
    msg = f"{path}: unknown key for {where} {tag!r}.{did}"
    if owners:
        msg += (
            f" {key} belongs to {' / '.join(owners)}: remove it with ~{path}, or choose "
            f"{where}.name={' / '.join(owners)}."
        )
    return msg + f" Allowed keys for {tag}: {', '.join(allowed)}."


def format_validation_error(err: ValidationError, data: Any) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(
            p for p in e["loc"] if not (isinstance(p, str) and p in {"function-after", "tagged-union"})
        )
        # pydantic puts the union tag in the location (e.g. objective.diffusion_dpo.beta); drop it for readability.
        clean: list[Any] = []
        for i, p in enumerate(loc):
            if i > 0 and isinstance(p, str) and _is_tag(loc[:i], p, data):
                continue
            clean.append(p)
        path = ".".join(str(p) for p in clean) or "(root)"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(_unknown_key_message(tuple(clean[:-1]), str(clean[-1]), data))
        elif e["type"] == "missing":
            lines.append(f"{path}: required field is missing.")
        elif e["type"] == "union_tag_invalid":
            ctx = e.get("ctx", {})
            lines.append(
                f"{path}.name: {ctx.get('tag')!r} is not known; allowed: {ctx.get('expected_tags')}."
            )
        elif e["type"] == "union_tag_not_found":
            parent, _ = _model_at(tuple(clean[:-1]), data)
            field = parent.model_fields.get(str(clean[-1])) if parent is not None and clean else None
            tags = [str(_tag(v)) for v in _variants(field.annotation)] if field is not None else []
            msg = f"{path}: needs a 'name' key choosing the variant"
            if tags:
                msg += f": one of {', '.join(tags)} (e.g. {path}.name={tags[0]})"
            if path == "noising":
                msg += "; or remove the section (~noising) to use the objective's own noising"
            lines.append(msg + ".")
        elif e["type"] == "value_error":  # a validator's own message names its fields; no dump of the input
            text = str(e.get("ctx", {}).get("error", e["msg"]))
            lines.append(text if path == "(root)" else f"{path}: {text}")
        else:
            lines.append(f"{path}: {e['msg']} (got {value!r}).")
    return "invalid config:\n  " + "\n  ".join(lines)


def _is_tag(parent: tuple[Any, ...], part: str, data: Any) -> bool:
    node = data
    for p in parent:
        node = node.get(p) if isinstance(node, dict) else None
    return isinstance(node, dict) and node.get("name") == part and part not in node


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read YAML with OmegaConf, apply ``a.b=c`` overrides, validate. Raises :class:`ConfigError`."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        merged = OmegaConf.load(path)
        for item in overrides:
            if item.startswith("~"):
                _delete_key(merged, item)
                continue
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ConfigError(
                    f"override {item!r} must look like key.sub=value (list items: key.0.sub=value)"
                )
            try:  # YAML typing: 5e-4 is a float, [a, b] a list
                value = OmegaConf.from_dotlist([f"v={raw}"])["v"]
            except yaml.YAMLError as exc:
                problem = getattr(exc, "problem", None) or str(exc)
                raise ConfigError(
                    f"override {item!r}: the value {raw!r} is not valid YAML ({problem}); quote it if it is text, "
                    "e.g. key='[a'"
                ) from None
            except OmegaConfBaseException as exc:  # ${...}: the value is read alone, without the config
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ConfigError(
                    f"override {item!r}: cannot read the value {raw!r} ({reason}); interpolations (${{...}}) "
                    "in overrides cannot refer to the config; write the value itself"
                ) from None
            try:
                OmegaConf.update(merged, key, value, merge=False)
            except (TypeError, ValueError, IndexError, OmegaConfBaseException) as exc:
                raise ConfigError(f"override {item!r}: cannot set {key}: {exc}") from exc
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: could not parse YAML/overrides: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error_message(path, exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte offset {exc.start}); re-save the file as UTF-8"
        ) from None
    return validate_data(data, source=str(path))


def _yaml_error_message(path: Path, exc: Exception) -> str:
    """``FILE:LINE:COLUMN: YAML syntax error: problem (context at LINE:COLUMN)``, 1-based like editors count."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f"{path}: YAML syntax error: {exc}"
    problem = getattr(exc, "problem", None) or "syntax error"
    msg = f"{path}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        msg += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return msg


def check_environment(cfg: RunConfig) -> None:
    """What the schema cannot see: packages a valid config needs in this environment, the data paths, the resume
    folder (``workbench validate`` and ``workbench train`` call it before anything loads). Raises
    :class:`ConfigError`."""
    import importlib.util

    if cfg.optimizer.name == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "optimizer.name=adamw_8bit needs bitsandbytes, which is not installed: pip install '.[gpu]' "
            "(or pip install bitsandbytes; it needs a CUDA GPU), or choose optimizer.name=adamw"
        )
    for i, src in enumerate(cfg.data.sources):
        problem = _data_path_problem(src.format, Path(src.path))
        if problem:
            raise ConfigError(
                f"data.sources[{i}].path: {src.path} {problem} (a relative path is read from the current folder, "
                f"{Path.cwd()}); fix the path, or create the data first"
            )
    resume = cfg.train.resume
    if resume and resume != "latest" and not Path(resume).is_dir():
        hint = "latest" if difflib.get_close_matches(resume, ["latest"], n=1, cutoff=0.6) else None
        did = "Did you mean train.resume=latest? " if hint else ""
        raise ConfigError(
            f"train.resume: {resume} is not a folder. {did}Give train.resume=latest (the newest complete checkpoint "
            f"of {cfg.run_dir}) or a checkpoint folder such as {cfg.run_dir / 'checkpoints' / 'step_000500'}"
        )


def _data_path_problem(fmt: str, path: Path) -> str | None:
    """What is wrong with a data source's path for its format, or None (the readers check the rows)."""
    if not path.exists():
        return "does not exist"
    if fmt == "image_folder" and not path.is_dir():
        return "is not a folder (an image_folder source is a folder of images with .txt captions)"
    if fmt in ("pair_jsonl", "ranking_jsonl", "app_votes") and not path.is_file():
        return f"is not a file (a {fmt} source is one file)"
    if fmt == "pickapic_parquet" and path.is_dir() and next(path.rglob("*.parquet"), None) is None:
        return "is a folder without .parquet files"
    return None


def _delete_key(merged: Any, item: str) -> None:
    """``~a.b.c`` removes ``c`` from ``a.b`` (Hydra's spelling), e.g. a key the newly chosen variant lacks."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    key = item[1:]
    if "=" in key or not key:
        raise ConfigError(
            f"override {item!r}: a deletion takes a key and no value, e.g. ~scheduler.warmup_steps"
        )
    parent_key, _, last = key.rpartition(".")
    parent = OmegaConf.select(merged, parent_key) if parent_key else merged
    if isinstance(parent, DictConfig) and last in parent:
        del parent[last]
    elif isinstance(parent, ListConfig) and last.isdigit() and int(last) < len(parent):
        del parent[int(last)]
    else:
        raise ConfigError(f"override {item!r}: {key} is not set, so there is nothing to delete")


_SCHEMA_VERSIONS = (OBJECTIVES.version, NOISING.version)


def refresh_schema() -> None:
    """Rebuild the ``objective`` and ``noising`` unions when their registries changed since import (an objective
    or noising method registered later, e.g. from a test or a user's own module, needs nothing else)."""
    global _SCHEMA_VERSIONS
    current = (OBJECTIVES.version, NOISING.version)
    if current == _SCHEMA_VERSIONS:
        return
    objective, noising = registry_union(OBJECTIVES), registry_union(NOISING)
    RunConfig.model_fields["objective"] = FieldInfo.from_annotation(objective)  # pyright: ignore[reportArgumentType]  # an Annotated union is a valid annotation
    RunConfig.model_fields["noising"] = FieldInfo.from_annotated_attribute(
        Optional[noising],  # noqa: UP045  # pyright: ignore[reportArgumentType]  # same
        RunConfig.model_fields["noising"],
    )
    RunConfig.model_rebuild(force=True)
    _SCHEMA_VERSIONS = current


def validate_data(data: Any, source: str = "<config>") -> RunConfig:
    refresh_schema()
    bools = _booleans_as_numbers(RunConfig, data, ())
    if bools:
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(bools))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc, data)}") from None


def _booleans_as_numbers(model: Any, node: Any, loc: tuple[str, ...]) -> list[str]:
    """``train.max_steps: true``: pydantic's lax mode reads a boolean as 1 for int and float fields; refuse it
    (the rest of the schema stays lax: YAML lists for tuples, ints for floats). Follows nested models and unions."""
    if not (isinstance(model, type) and issubclass(model, BaseModel) and isinstance(node, dict)):
        return []
    problems: list[str] = []
    for key, value in node.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            continue
        members = _members(field.annotation)
        if isinstance(value, bool):
            if bool not in members and any(m in (int, float) for m in members):
                kind = "an integer" if int in members else "a number"
                problems.append(
                    f"{'.'.join((*loc, key))}: expected {kind}, got the boolean {str(value).lower()}."
                )
        else:
            problems += _booleans_as_numbers(_resolve(field.annotation, value), value, (*loc, key))
    return problems


def resolved_yaml(cfg: RunConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(cfg.model_dump(mode="json")))
