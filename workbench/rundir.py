"""A run directory's safety rules: nothing finished is overwritten, and a resume keeps the run's records.

The trainer calls :func:`check_run_dir` before anything loads or is written (``workbench validate`` calls it too),
then :func:`clear_run_outputs` for ``train.overwrite=true``, and :func:`start_records` once the run is known to start
(after a resume has loaded its checkpoint):

- a run directory that already holds a run (``final/``, a non-empty ``checkpoints/`` or ``metrics.jsonl``) is
  refused without ``train.resume``; the message names the folder and the ways out (``train.resume=latest``,
  ``train.overwrite=true``, a new ``run.name``). ``train.overwrite=true`` removes :data:`RUN_OUTPUTS` and nothing
  else (a file of the user's own in the folder stays).
- a resume is refused when the config differs from the run's ``config.resolved.yaml`` in a key that changes what
  is trained (learning rate, LoRA rank, objective, data, seed, batch size...); the keys of :data:`SAFE_ON_RESUME`
  (length of the run, checkpoint and logging cadence, validation, speed and memory switches, output location)
  may change and the change is recorded in ``resume_log.jsonl``; so may the per-process batch keys when the global
  batch stays the same (a checkpoint of N processes resumed in M). A LoRA rank that differs from the checkpoint's
  adapter is named as such ("rank differs from the checkpoint (checkpoint r=X, config r=Y)"), read from the
  checkpoint's safetensors header before any model is built.
- ``config.resolved.yaml`` and ``environment.json`` describe the run's start and are written once, when it starts;
  a resume keeps them and writes ``config.resolved.resume-<step>.yaml`` plus a ``resume_log.jsonl`` line (the
  checkpoint, the changed keys with their old and new values, the environment).
- on a resume at step ``S``, ``metrics.jsonl`` keeps the lines of steps ``<= S`` (the steps after the checkpoint
  are trained again and logged again) and drops a line cut short by a kill; it is rewritten atomically, so after a
  kill and a resume every step is logged once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.checkpointing import COMPLETE, list_checkpoints
from workbench.config import ConfigError, RunConfig, resolved_yaml, validate_data

#: What a training run writes into its directory; ``train.overwrite=true`` removes these (and
#: ``config.resolved.resume-*.yaml``), nothing else.
RUN_OUTPUTS = (
    "final",
    "final.tmp",
    "checkpoints",
    "rescued",
    "metrics.jsonl",
    "tensorboard",
    "validation",
    "skipped_rows.jsonl",
    "debug",
    "config.resolved.yaml",
    "environment.json",
    "resume_log.jsonl",
)

#: Config keys (and key prefixes) a resume may change: they decide how long the run goes on, how often it saves,
#: logs and validates, how fast and in how much memory a step runs, and where outputs go, but not what a step
#: computes. Changing ``train.max_steps`` also stretches a decaying lr schedule from the resumed step on.
SAFE_ON_RESUME = (
    "train.max_steps",
    "train.resume",
    "train.overwrite",
    "train.checkpoint_every",
    "train.keep_last",
    "train.log_every",
    "train.max_nonfinite_steps",
    "train.num_workers",
    "train.gradient_checkpointing",
    "train.compile",
    "train.channels_last",
    "train.attention",
    "logging",
    "validation",
    "run.output_dir",
    "run.name",
    "data.cache.dir",
)

_ABSENT = "<absent>"


@dataclass
class ResumePlan:
    """What :func:`check_run_dir` found for a resume: the checkpoint it will start from (None: none yet, the run
    starts at step 0), the run's recorded config and the safe keys that changed since (``key -> (old, new)``)."""

    checkpoint: Path | None
    saved_config: Path | None = None
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def step(self) -> int | None:
        """The step of the checkpoint (``step_XXXXXX``), or None."""
        name = self.checkpoint.name if self.checkpoint is not None else ""
        digits = name.removeprefix("step_")
        return int(digits) if name.startswith("step_") and digits.isdigit() else None


def prior_outputs(run_dir: Path) -> list[str]:
    """The outputs that show ``run_dir`` already holds a run: ``final/``, a non-empty ``checkpoints/``,
    ``metrics.jsonl``."""
    found = []
    if (run_dir / "final").exists():
        found.append("final/")
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        found.append("checkpoints/")
    if (run_dir / "metrics.jsonl").exists():
        found.append("metrics.jsonl")
    return found


def _finished_step(run_dir: Path) -> int | None:
    """The step recorded in ``final/COMPLETE`` (``step N``), or None."""
    try:
        text = (run_dir / "final" / COMPLETE).read_text()
    except OSError:
        return None
    parts = text.split()
    return int(parts[1]) if len(parts) == 2 and parts[0] == "step" and parts[1].isdigit() else None


def check_run_dir(cfg: RunConfig) -> ResumePlan | None:
    """Refuse (:class:`ConfigError`) a run that would overwrite a finished one or resume under a different config.
    Reads only small files (the recorded config, safetensors headers). Returns the resume plan, or None for a fresh
    run."""
    run_dir = cfg.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file; choose another run.name or run.output_dir")
    found = prior_outputs(run_dir)
    resume = cfg.train.resume
    if not resume:
        if found and not cfg.train.overwrite:
            raise ConfigError(
                f"run directory {run_dir} already holds a run ({', '.join(found)}); training into it would replace "
                "it. Continue it with train.resume=latest, replace it with train.overwrite=true (removes "
                f"{', '.join(RUN_OUTPUTS)}), or give a new run.name"
            )
        return None
    if resume == "latest":
        ckpts = list_checkpoints(run_dir)
        checkpoint = ckpts[-1] if ckpts else None
        finished = _finished_step(run_dir)
        if finished is not None and finished >= cfg.train.max_steps:
            raise ConfigError(
                f"train.resume=latest: {run_dir} finished at step {finished} (final/), and train.max_steps is "
                f"{cfg.train.max_steps}: there is nothing to resume. Raise train.max_steps to train on, or give a new "
                "run.name (train.overwrite=true instead of train.resume replaces the run)"
            )
        if checkpoint is None and (run_dir / "final").exists():
            raise ConfigError(
                f"train.resume=latest: {run_dir} holds a finished run (final/) but no complete checkpoint to resume "
                "from; replace it with train.overwrite=true (without train.resume), or give a new run.name"
            )
    else:
        checkpoint = Path(resume)
        inside = run_dir.resolve() in checkpoint.resolve().parents
        if found and not inside:
            raise ConfigError(
                f"train.resume={resume} is not a checkpoint of {run_dir}, which already holds a run "
                f"({', '.join(found)}); resume into a new run.name, or resume {run_dir} itself with "
                "train.resume=latest"
            )
    if checkpoint is None:
        return ResumePlan(None)
    problems: list[str] = []
    rank = checkpoint_lora_rank(checkpoint) if cfg.model.finetune == "lora" else None
    if rank is not None and rank != cfg.model.lora.rank:
        problems.append(
            f"model.lora.rank: rank differs from the checkpoint (checkpoint r={rank}, config r={cfg.model.lora.rank})"
        )
    saved = _recorded_config(checkpoint, run_dir)
    changed: dict[str, tuple[Any, Any]] = {}
    if saved is not None:
        recorded = _load_recorded(saved)
        same_global = _same_global_batch(recorded, cfg, saved.parent / "environment.json")
        for key, (old, new) in config_changes(recorded, cfg.model_dump(mode="json")).items():
            if key == "train.resume":  # always differs from the run's start; the checkpoint is recorded
                continue
            if is_safe_on_resume(key) or (key in _PER_PROCESS_BATCH and same_global):
                changed[key] = (old, new)
            elif key in _PER_PROCESS_BATCH:
                problems.append(f"{key}: {_show(old)} -> {_show(new)} ({same_global.reason})")
            elif not (key == "model.lora.rank" and problems):
                problems.append(f"{key}: {_show(old)} -> {_show(new)}")
    if problems:
        where = f"the run's {saved}" if saved is not None else f"the checkpoint {checkpoint}"
        raise ConfigError(
            f"train.resume: this config differs from {where} in keys a resume cannot change:\n  "
            + "\n  ".join(problems)
            + "\nResume with the run's values, or start a new run (a new run.name; train.overwrite=true without "
            f"train.resume replaces this one). Keys a resume may change: {', '.join(SAFE_ON_RESUME)}"
        )
    return ResumePlan(checkpoint, saved, changed)


#: Per-process batch keys: a resume may change them when the global batch (batch_size x gradient_accumulation_steps
#: x processes) stays the same, e.g. a 2-process checkpoint resumed in one process with twice the batch_size.
_PER_PROCESS_BATCH = ("train.batch_size", "train.gradient_accumulation_steps")


@dataclass
class _GlobalBatch:
    same: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.same


def _same_global_batch(recorded: dict[str, Any], cfg: RunConfig, environment: Path) -> _GlobalBatch:
    """Whether the run's global batch (its ``environment.json`` records its process count; 1 where it does not)
    equals this launch's (``WORLD_SIZE``, which ``accelerate launch`` sets for every process; 1 without it)."""
    try:
        processes = int(json.loads(environment.read_text()).get("num_processes", 1))
    except (OSError, ValueError, AttributeError):
        processes = 1
    train = recorded.get("train", {})
    try:
        before = (
            int(train.get("batch_size", 1)) * int(train.get("gradient_accumulation_steps", 1)) * processes
        )
    except (TypeError, ValueError):
        return _GlobalBatch(False, "the run's batch settings cannot be read")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    now = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world
    if before == now:
        return _GlobalBatch(True)
    return _GlobalBatch(
        False,
        f"global batch {before} -> {now}: batch_size x gradient_accumulation_steps x processes must stay the same",
    )


def is_safe_on_resume(key: str) -> bool:
    return any(key == safe or key.startswith(safe + ".") for safe in SAFE_ON_RESUME)


def _recorded_config(checkpoint: Path, run_dir: Path) -> Path | None:
    """The ``config.resolved.yaml`` of the run a checkpoint belongs to (``RUN/checkpoints/step_N``), else of
    ``run_dir``."""
    for folder in (checkpoint.parent.parent, run_dir):
        path = folder / "config.resolved.yaml"
        if path.is_file():
            return path
    return None


def _load_recorded(path: Path) -> dict[str, Any]:
    """A recorded config as the current schema reads it (fields added since get their defaults); as plain YAML
    where the current schema refuses it."""
    from omegaconf import OmegaConf

    data: Any = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    try:
        return validate_data(data, source=str(path)).model_dump(mode="json")
    except ConfigError:
        return data if isinstance(data, dict) else {}


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, dict) and node:
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(node, list) and any(isinstance(v, dict) for v in node):
        for i, v in enumerate(node):
            _flatten(v, f"{prefix}.{i}", out)
    else:
        out[prefix] = node


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ, ``key -> (old, new)`` (``"<absent>"`` where one side lacks the key); lists
    of mappings (``data.sources``) compare item by item."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(old, "", a)
    _flatten(new, "", b)
    return {
        k: (a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, _ABSENT) != b.get(k, _ABSENT)
    }


def _show(value: Any) -> str:
    return value if value == _ABSENT else json.dumps(value)


def checkpoint_lora_rank(checkpoint: Path) -> int | None:
    """The LoRA rank of a checkpoint's adapter (the first dimension of its ``lora_A`` / ``lora_down`` weights), read
    from the safetensors header only; None where the checkpoint has no readable adapter file."""
    from safetensors import safe_open

    for name in ("training_state/adapter.safetensors", "lora/pytorch_lora_weights.safetensors"):
        path = checkpoint / name
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if "lora_A" in key or "lora_down" in key:
                        return int(f.get_slice(key).get_shape()[0])
        except Exception:  # an unreadable file is the loader's to report (it names the file)
            return None
    return None


def clear_run_outputs(run_dir: Path) -> list[str]:
    """``train.overwrite=true``: remove :data:`RUN_OUTPUTS` (and ``config.resolved.resume-*.yaml``) from
    ``run_dir``; returns and prints what was removed."""
    removed = []
    paths = [run_dir / name for name in RUN_OUTPUTS] + sorted(run_dir.glob("config.resolved.resume-*.yaml"))
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(path.name + "/")
        elif path.exists() or path.is_symlink():
            path.unlink()
            removed.append(path.name)
    if removed:
        print(f"[train] train.overwrite=true: removed {', '.join(removed)} from {run_dir}", file=sys.stderr)
    return removed


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader (or a kill) never sees a
    half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the lines of ``metrics.jsonl`` with ``step <= step`` (a resume at ``step`` logs the later ones again);
    lines that do not parse (the last line of a killed run) are dropped too. Rewritten atomically; returns the
    number of lines dropped."""
    if not path.is_file():
        return 0
    kept: list[str] = []
    dropped = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record.get("step", 0)) <= step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        write_atomic(path, "".join(kept))
    return dropped


def start_records(cfg: RunConfig, plan: ResumePlan | None, step: int, environment: dict[str, Any]) -> None:
    """Write the run's records once it is known to start (main process only): a fresh run writes
    ``config.resolved.yaml`` and ``environment.json``; a resume at ``step`` keeps them, writes
    ``config.resolved.resume-<step>.yaml``, appends a line to ``resume_log.jsonl`` and trims ``metrics.jsonl``."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.resolved.yaml"
    if plan is not None:
        dropped = truncate_metrics(run_dir / "metrics.jsonl", step)
        if dropped:
            print(
                f"[train] metrics.jsonl: dropped {dropped} line(s) after step {step} (they are logged again)",
                file=sys.stderr,
            )
    if plan is None or step == 0 or not config_path.is_file():
        write_atomic(config_path, resolved_yaml(cfg))
        write_atomic(run_dir / "environment.json", json.dumps(environment, indent=2))
    if plan is None or step == 0:
        return
    write_atomic(run_dir / f"config.resolved.resume-{step:06d}.yaml", resolved_yaml(cfg))
    entry = {
        "step": step,
        "checkpoint": str(plan.checkpoint) if plan.checkpoint is not None else None,
        "compared_with": str(plan.saved_config) if plan.saved_config is not None else None,
        "changed": {k: [old, new] for k, (old, new) in plan.changed.items()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment,
    }
    with (run_dir / "resume_log.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    if plan.changed:
        shown = ", ".join(f"{k}: {_show(old)} -> {_show(new)}" for k, (old, new) in plan.changed.items())
        print(f"[train] resumed with changed keys (recorded in resume_log.jsonl): {shown}", file=sys.stderr)
