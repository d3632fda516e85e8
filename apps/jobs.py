"""The personal fine-tune as a background job: a Diffusion-DPO LoRA trained for one user from synthetic pairs that
their personal scorer labels, plus their own votes, in a separate process that outlives the page and the server.

Recipe (research/tools_and_ui.md section 3.6; the workbench's own commands do every step):

1. ``votes``: the user's active votes as image-pair JSONL (expanded as the store's export does,
   :func:`apps.store.expand_pairs`: a best-of-K vote gives K - 1 pairs, a ranking all its pairs), without ties (no
   DPO pair) and without the blind before/after rounds (the evaluation set is never trained on). **Up-weighting by
   repetition**: the trainer reads no per-row weight, so each real pair is written ``vote_repeat`` times into
   ``votes/weighted.jsonl`` (with the default ~120 synthetic pairs and a dozen real ones, a repeat of 4 makes the
   user's own choices about 1 in 4 of the pairs drawn instead of 1 in 12).
2. ``synth``: ``workbench synth`` on the user's prompts (those in their votes) followed by a broad prompt set, K
   samples per prompt from the base the app serves, scored by the user's personal scorer (a snapshot of
   ``<store dir>/users/<user>/scorer.json`` copied into the job), the pairs of a prompt kept only where the
   scorer's predicted margin exceeds ``min_margin`` (the personal scorer is in log-odds units, so a margin m means
   the scorer predicts the user prefers the first image with probability sigmoid(m); 1.0 -> 0.73). By default one
   group of K = 16 per prompt and only its best/worst pair (:class:`JobOptions`; the validation choice).
3. ``train``: ``workbench train`` on the toy recipe (``configs/toy/dpo.yaml``: LoRA r8, beta 2000) or the app's
   ``personal_config``, with ``model.source`` = the app's base and both sources above.
4. ``done``: ``run/final`` is the LoRA; the app offers it as checkpoint ``personal-<user>-<job>`` in Compare and the
   arena (:func:`register_finished`).

On disk, under ``<store dir>/users/<user>/jobs/<job id>/``::

    job.json      what was asked (user, options, base, prompts) -- written once by the app
    status.json   phase (queued, votes, synth, train, done, failed, cancelled), pid, started, updated, finished,
                  error, message, counts; written under a file lock by the app and the job
    log.txt       the job's stdout and stderr (a failure's message is its tail)
    scorer.json   the personal scorer the job used
    votes/  synth/  run/   the exported votes, the synthetic dataset, the training run (metrics.jsonl, final/)

Progress (:func:`read_job`) is read from these files only, so it survives a page reload and a server restart: a
job whose process died without writing a final phase is reported as failed. The driver is this module
(``python -m apps.jobs JOB_DIR``), started in its own session so that cancelling it (SIGTERM to its process group;
the trainer saves a checkpoint and stops) never touches the server.
"""

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from apps.handlers import AppContext, InputError
from apps.personal import scorer_path, user_dir

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = REPO / "configs" / "toy" / "dpo.yaml"
PHASES = ("queued", "votes", "synth", "train", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")
#: Popen handles of the jobs this server started (reaped on read, so a finished child is no zombie)
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
_START_LOCK = threading.Lock()  # two quick clicks start one job


@dataclass
class JobOptions:
    """What a job trains on and how long; every field is shown in ``job.json``."""

    steps: int = (
        200  # optimizer steps (train.max_steps); the defaults are the toy recipe tests/test_app_loop.py chose
    )
    min_margin: float = 1.0  # keep a synthetic pair when the personal scorer's margin exceeds this (log-odds)
    vote_repeat: int = 4  # each of the user's real pairs is written this many times (the up-weighting)
    # The recipe (chosen on the validation split, benchmarks/personal_job_recipe.py): one group of K = 16 samples
    # per prompt and its best/worst pair under the personal scorer; the best of 16 is far more on-taste than the best
    # of 4, so each pair is a cleaner lesson (win rate 0.650 [0.553, 0.736] vs 0.549 for K = 4 best/worst).
    samples: int = 16  # K samples per prompt in synth
    pairs: str = "best-worst"  # which pairs of the K: "best-worst" (one per group) or "all" (`synth --pairs`)
    seed_groups: int = 1  # groups of K samples per prompt, each with its own seeds (more diverse pairs)
    broad_prompts: str | None = None  # prompt set added to the user's prompts (default: toy:train / parti)
    broad_max: int = 120  # at most this many prompts of the broad set (a seeded sample)
    synth_steps: int | None = None  # sampler steps for the synthetic images (default: the app's)
    guidance: float | None = None  # (default: the app's)
    lr: float | None = None  # optimizer.lr override (default: the config's)
    beta: float | None = None  # objective.beta override (default: the config's)
    sft_weight: float | None = (
        None  # objective.sft_weight (winner-MSE term beside DPO; default: the config's)
    )
    batch_size: int | None = None  # pairs per step (default: the config's)
    config: str | None = None  # training YAML (default: configs/toy/dpo.yaml on the toy base)
    seed: int = 0  # run.seed and the broad-prompt sample
    first_seed: int = 1_000_000  # sample k of seed group g uses seed first_seed + 1000 g + k

    def check(self) -> "JobOptions":
        rules = [
            (1 <= self.steps <= 100_000, "steps must be between 1 and 100000"),
            (self.min_margin >= 0, "min_margin must be >= 0 (log-odds of the personal scorer)"),
            (1 <= self.vote_repeat <= 100, "vote_repeat must be between 1 and 100"),
            (2 <= self.samples <= 16, "samples (K per prompt) must be between 2 and 16"),
            (1 <= self.seed_groups <= 64, "seed_groups must be between 1 and 64"),
            (0 <= self.broad_max <= 100_000, "broad_max must be >= 0"),
            (self.lr is None or self.lr > 0, "lr must be > 0"),
            (self.beta is None or self.beta > 0, "beta must be > 0"),
            (self.pairs in ("all", "best-worst"), "pairs must be 'all' or 'best-worst'"),
            (self.sft_weight is None or self.sft_weight >= 0, "sft_weight must be >= 0"),
            (self.batch_size is None or self.batch_size >= 1, "batch_size must be >= 1"),
        ]
        for ok, message in rules:
            if not ok:
                raise InputError(f"personal fine-tune: {message}")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(
                f"personal fine-tune: unknown option(s) {unknown}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)


@dataclass
class JobView:
    """A job as the page shows it, read from its folder."""

    job_id: str
    user: str
    phase: str
    alive: bool
    message: str = ""
    error: str | None = None
    log_tail: str = ""
    step: int = 0
    max_steps: int = 0
    loss: float | None = None  # mean over the last logged steps (up to 10)
    implicit_acc: float | None = None  # dpo/implicit_acc, same window
    seconds_left: float | None = None
    elapsed: float | None = None
    result: str | None = None  # run/final once done
    checkpoint: str | None = None  # the name the app offers it under
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.phase in FINAL

    def summary(self) -> str:
        """One Markdown paragraph: phase, progress, loss, accuracy, time left, or the failure."""
        head = f"**job {self.job_id}** · {self.phase}"
        if self.phase == "train" or self.step:
            head += f" · step {self.step}/{self.max_steps}"
            if self.loss is not None:
                head += f" · loss {self.loss:.4f}"
            if self.implicit_acc is not None:
                head += f" · implicit accuracy {self.implicit_acc:.2f}"
            if self.seconds_left is not None and self.phase == "train":
                head += f" · about {_duration(self.seconds_left)} left"
        if self.elapsed is not None:
            head += f" · {_duration(self.elapsed)} elapsed"
        lines = [head]
        if self.message:
            lines.append(self.message)
        if self.counts:
            lines.append(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in self.counts.items()))
        if self.phase == "done" and self.checkpoint:
            lines.append(
                f"result: checkpoint **{self.checkpoint}** (in Compare and the arena), `{self.result}`"
            )
        if self.error:
            lines.append(f"**error:** {self.error}")
            if self.log_tail:
                lines.append(f"```\n{self.log_tail}\n```")
        return "\n\n".join(lines)


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


# --------------------------------------------------------------------------------------------------------- paths
def jobs_dir(ctx: AppContext | str | Path, user: str) -> Path:
    """``<store dir>/users/<user>/jobs``: one folder per job (``ctx``: the app context or the database path)."""
    return user_dir(ctx, user) / "jobs"


def checkpoint_name(user: str, job_id: str) -> str:
    return f"personal-{re.sub(r'[^A-Za-z0-9_.-]+', '_', user)}-{job_id}"


# -------------------------------------------------------------------------------------------------- status file
@contextlib.contextmanager
def _locked(job_dir: Path) -> Iterator[None]:
    with (job_dir / "status.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_status(job_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((job_dir / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def update_status(
    job_dir: Path, *, only_if_phase: Sequence[str] | None = None, **changes: Any
) -> dict[str, Any]:
    """Read-modify-write ``status.json`` under a lock (atomically replaced); ``only_if_phase``: leave it alone
    unless its phase is one of these. Returns the status now on disk."""
    with _locked(job_dir):
        status = read_status(job_dir)
        if only_if_phase is not None and status.get("phase") not in only_if_phase:
            return status
        status.update(changes, updated=time.time())
        tmp = job_dir / "status.json.tmp"
        tmp.write_text(json.dumps(status, indent=2))
        os.replace(tmp, job_dir / "status.json")
        return status


def _alive(pid: int | None, job_dir: Path) -> bool:
    """Whether ``pid`` is this job's driver and still running (not a zombie, not a reused pid)."""
    if not pid:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:  # started by this server: its Popen knows (even before the child's exec)
        if child.poll() is None:
            return True
        _CHILDREN.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            return False
        return state != "Z" and str(Path(job_dir).resolve()) in cmdline  # the driver gets the resolved path
    return True


# ---------------------------------------------------------------------------------------------------- the app side
def start_job(ctx: AppContext, user: str, options: JobOptions | None = None) -> JobView:
    """Check what the job needs (a fitted scorer, votes, a training config), write the job folder and start the
    driver in its own session. Refuses a second running job for the same user."""
    with _START_LOCK:
        return _start(ctx, user, (options or JobOptions()).check())


def _start(ctx: AppContext, user: str, options: JobOptions) -> JobView:
    from apps.personal import EVAL_SOURCE

    scorer = scorer_path(ctx, user)
    if not scorer.is_file():
        raise InputError(
            f"no personal scorer for {user!r} yet ({scorer}): fit it on the Personalise tab first (it needs 4 votes)"
        )
    votes = [
        v for v in ctx.store.votes(user_id=user) if v.round.source != EVAL_SOURCE
    ]  # blind rounds: held out
    if not votes:
        raise InputError(f"{user!r} has no votes yet; vote in the arena first")
    for view in list_jobs(ctx, user):
        if not view.finished:
            raise InputError(f"job {view.job_id} of {user!r} is still {view.phase}: wait for it or cancel it")
    config = Path(options.config) if options.config else _default_config(ctx)
    if not config.is_file():
        raise InputError(f"personal fine-tune config {config} not found (JobOptions.config)")
    s = ctx.settings
    from workbench.commands.generate import resolve_base

    job_id = time.strftime("%Y%m%d-%H%M%S") + f"-{os.urandom(2).hex()}"
    job_dir = jobs_dir(ctx, user) / job_id
    job_dir.mkdir(parents=True)
    user_prompts = list(dict.fromkeys(v.round.prompt for v in votes))
    spec = {
        "job_id": job_id,
        "user": user,
        "created": time.time(),
        "db": str(Path(s.db).resolve()),
        "base": str(resolve_base(s.base)),
        "toy": s.base == "toy",
        "config": str(config.resolve()),
        "checkpoint": checkpoint_name(user, job_id),
        "user_prompts": user_prompts,
        "sampler": s.sampler,
        "synth_steps": options.synth_steps or s.steps,
        "guidance": options.guidance if options.guidance is not None else s.guidance,
        "device": s.device,
        "options": asdict(options),
    }
    (job_dir / "job.json").write_text(json.dumps(spec, indent=2))
    (job_dir / "scorer.json").write_bytes(scorer.read_bytes())
    update_status(job_dir, phase="queued", pid=None, started=time.time(), error=None, message="starting")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with (job_dir / "log.txt").open("ab") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "apps.jobs", str(job_dir.resolve())],
                cwd=job_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: cancel stops it and its children, never the server
            )
    except OSError as exc:
        update_status(job_dir, phase="failed", finished=time.time(), error=f"could not start the job: {exc}")
        return read_job(job_dir)
    _CHILDREN[child.pid] = child
    update_status(job_dir, only_if_phase=("queued",), pid=child.pid)
    return read_job(job_dir)


def _default_config(ctx: AppContext) -> Path:
    configured = ctx.settings.personal_config
    if configured:
        return Path(configured)
    if ctx.settings.base != "toy":
        raise InputError(
            "the personal fine-tune needs a training config for this base: set personal_config in the app's "
            "settings (a LoRA Diffusion-DPO YAML such as configs/sdxl/dpo.yaml) or JobOptions.config"
        )
    return TOY_CONFIG


def read_job(job_dir: Path, *, tail_lines: int = 15) -> JobView:
    """The job's state from its folder: phase, and while training the step, loss, implicit accuracy and time left
    from the trainer's ``metrics.jsonl``. A job whose process is gone without a final phase is marked failed."""
    job_dir = Path(job_dir)
    try:
        spec = json.loads((job_dir / "job.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{job_dir}: not a job folder ({exc})") from None
    status = read_status(job_dir)
    phase = str(status.get("phase", "queued"))
    alive = _alive(status.get("pid"), job_dir)
    if (
        phase not in FINAL
        and not alive
        and (status.get("pid") or time.time() - status.get("started", 0) > 60)
    ):
        status = update_status(
            job_dir,
            only_if_phase=(phase,),
            phase="failed",
            finished=time.time(),
            error=f"the job's process (pid {status.get('pid')}) ended without finishing ({phase} phase); "
            "the server may have been stopped with it, or it was killed",
        )
        phase = str(status.get("phase"))
    view = JobView(
        job_id=spec["job_id"],
        user=spec["user"],
        phase=phase,
        alive=alive,
        message=str(status.get("message") or ""),
        error=status.get("error"),
        counts=dict(status.get("counts") or {}),
        result=status.get("result"),
        checkpoint=spec.get("checkpoint") if phase == "done" else None,
    )
    started, end = status.get("started"), status.get("finished") or time.time()
    view.elapsed = end - started if started else None
    view.max_steps = int(spec["options"]["steps"])
    _read_metrics(job_dir / "run" / "metrics.jsonl", view)
    if phase == "synth":
        group = status.get("synth_group") or [1, 1]
        progress = _synth_progress(job_dir / "synth" / f"g{int(group[0]) - 1}")
        if progress:
            view.message = f"seed group {group[0]}/{group[1]}: {progress}"
    if view.error:
        view.log_tail = log_tail(job_dir, tail_lines)
    return view


def _read_metrics(path: Path, view: JobView, window: int = 10) -> None:
    if not path.is_file():
        return
    records = []
    for line in path.read_text().splitlines()[-200:]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written
    if not records:
        return
    last = records[-window:]
    view.step = int(last[-1].get("step", 0))
    view.loss = sum(float(r["train/loss"]) for r in last) / len(last) if "train/loss" in last[-1] else None
    accs = [float(r["dpo/implicit_acc"]) for r in last if "dpo/implicit_acc" in r]
    view.implicit_acc = sum(accs) / len(accs) if accs else None
    rates = [float(r["train/steps_per_s"]) for r in last if r.get("train/steps_per_s")]
    if rates and view.phase == "train":
        seconds_per_step = sum(1 / r for r in rates) / len(rates)
        view.seconds_left = max(0, view.max_steps - view.step) * seconds_per_step


def _synth_progress(out: Path) -> str | None:
    plan = out / "synth.json"
    if not plan.is_file():
        return None
    try:
        data = json.loads(plan.read_text())
        total = -(-len(data["prompts"]) // int(data["shard_size"]))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    done = len(list((out / "done").glob("*.json"))) if (out / "done").is_dir() else 0
    return f"synthetic pairs: {done}/{total} shards of {len(data['prompts'])} prompts"


def log_tail(job_dir: Path, lines: int = 15) -> str:
    """The last lines of the job's log (progress-bar redraws collapsed to their last state)."""
    try:
        text = (Path(job_dir) / "log.txt").read_bytes().decode(errors="replace")  # keep the \r of redraws
    except OSError:
        return ""
    rows = [r.rstrip("\r").rsplit("\r", 1)[-1] for r in text.split("\n")]  # splitlines() splits at \r too
    return "\n".join([r for r in rows if r.strip()][-lines:])


def list_jobs(ctx: AppContext, user: str) -> list[JobView]:
    """The user's jobs, newest first (read from disk: they survive a server restart)."""
    root = jobs_dir(ctx, user)
    if not root.is_dir():
        return []
    return [read_job(d) for d in sorted(root.iterdir(), reverse=True) if (d / "job.json").is_file()]


def cancel_job(ctx: AppContext, user: str, job_id: str, *, wait: float = 20.0) -> JobView:
    """SIGTERM to the job's process group (the trainer saves a checkpoint and stops), SIGKILL after ``wait``
    seconds; the job ends as ``cancelled``."""
    job_dir = jobs_dir(ctx, user) / job_id
    if not (job_dir / "job.json").is_file():
        raise InputError(f"no job {job_id!r} for {user!r}")
    status = read_status(job_dir)
    if status.get("phase") in FINAL:
        return read_job(job_dir)
    update_status(job_dir, cancel_requested=True)
    pid = status.get("pid")
    if pid and _alive(pid, job_dir):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while _alive(pid, job_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid, job_dir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            time.sleep(0.2)
            _alive(pid, job_dir)  # reap
    update_status(
        job_dir,
        only_if_phase=tuple(p for p in PHASES if p not in FINAL),
        phase="cancelled",
        finished=time.time(),
        message="cancelled",
    )
    return read_job(job_dir)


def register_finished(ctx: AppContext, views: Sequence[JobView] | None = None) -> list[str]:
    """Offer every finished job's LoRA to Compare and the arena (in the running renderer); returns the names
    added now. ``views``: the jobs to look at (default: every user's jobs on disk, as at server start)."""
    if views is None:
        root = Path(ctx.settings.db).parent / "users"
        views = [
            read_job(d)
            for d in sorted(root.glob("*/jobs/*"))
            if (d / "job.json").is_file() and read_status(d).get("phase") == "done"
        ]
    add = getattr(ctx.renderer, "add", None)
    if add is None:
        return []
    from samplers import parse_checkpoints

    added = []
    known = set(ctx.renderer.names())
    for view in views:
        if view.phase != "done" or not view.checkpoint or not view.result or view.checkpoint in known:
            continue
        if not (Path(view.result) / "COMPLETE").is_file():
            continue
        (ckpt,) = parse_checkpoints([f"{view.checkpoint}={view.result}"])
        add(ckpt)
        known.add(view.checkpoint)
        added.append(view.checkpoint)
    return added


def wait_for(job_dir: Path, *, timeout: float, poll: float = 1.0) -> JobView:
    """Poll until the job is finished (tests and scripts); raises TimeoutError with its last state."""
    deadline = time.monotonic() + timeout
    while True:
        view = read_job(job_dir)
        if view.finished:
            return view
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"job {view.job_id} still {view.phase} after {timeout:.0f} s: {view.summary()}"
            )
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------------------- UI
JOB_COLUMNS = ["job", "phase", "step", "loss", "implicit acc", "checkpoint"]


def job_rows(views: Sequence[JobView]) -> list[list[Any]]:
    return [
        [
            v.job_id,
            v.phase,
            f"{v.step}/{v.max_steps}",
            "" if v.loss is None else round(v.loss, 4),
            "" if v.implicit_acc is None else round(v.implicit_acc, 3),
            v.checkpoint or "",
        ]
        for v in views
    ]


def job_panel(ctx: AppContext, user: Any, checkpoint_boxes: Sequence[Any] = ()) -> Any:
    """The personal fine-tune's controls (call inside a tab; the Personalise tab does): options, Start, Cancel, and
    the user's latest job streamed from its folder every 2 s (a ``gr.Timer``), so progress shows after a page
    reload or a server restart too. ``checkpoint_boxes`` (Compare's and the arena's checkpoint lists) get the
    finished LoRA as a new choice. Finished jobs already on disk are offered when the panel is built."""
    import gradio as gr

    from apps.app import _guard, _user

    register_finished(ctx)
    d = JobOptions()
    with gr.Accordion("Personal fine-tune (a background job)", open=True) as panel:
        gr.Markdown(
            "Trains a Diffusion-DPO LoRA for you in a separate process: synthetic pairs of the base's samples on "
            "your prompts and a broad prompt set, kept where your personal scorer's margin is large, plus your own "
            "votes repeated. Fit your scorer first. The result appears as a checkpoint in Compare, the arena and "
            "the blind rounds above."
        )
        with gr.Row():
            steps = gr.Number(
                value=d.steps, precision=0, minimum=1, label="training steps", elem_id="job-steps"
            )
            margin = gr.Number(value=d.min_margin, minimum=0, label="min scorer margin (log-odds)")
            repeat = gr.Number(value=d.vote_repeat, precision=0, minimum=1, label="your votes repeated")
            samples = gr.Number(
                value=d.samples, precision=0, minimum=2, label="samples per prompt", elem_id="job-samples"
            )
            groups = gr.Number(
                value=d.seed_groups,
                precision=0,
                minimum=1,
                label="seed groups per prompt",
                elem_id="job-groups",
            )
            broad = gr.Number(
                value=d.broad_max, precision=0, minimum=0, label="broad prompts", elem_id="job-prompts"
            )
        with gr.Row():
            start = gr.Button("Start personal fine-tune", variant="primary", elem_id="job-start")
            cancel = gr.Button("Cancel job", variant="stop", elem_id="job-cancel")
        status = gr.Markdown(elem_id="job-status")
        table = gr.Dataframe(headers=JOB_COLUMNS, label="your jobs", interactive=False, elem_id="job-table")
        timer = gr.Timer(2.0)

    def show(name: str | None, request: gr.Request | None) -> list[Any]:
        try:
            who = _user(name, request)
            views = list_jobs(ctx, who)
        except InputError as exc:
            return [str(exc), [], *(gr.update() for _ in checkpoint_boxes)]
        added = register_finished(ctx, views)
        text = views[0].summary() if views else f"no personal fine-tune for {who} yet"
        choices = ctx.renderer.names()
        boxes = [gr.update(choices=choices) if added else gr.update() for _ in checkpoint_boxes]
        return [text, job_rows(views), *boxes]

    outputs = [status, table, *checkpoint_boxes]

    @_guard
    def on_start(name, n_steps, min_margin, n_repeat, k, n_groups, n_broad, request: gr.Request):
        try:
            options = JobOptions(
                steps=int(n_steps),
                min_margin=float(min_margin),
                vote_repeat=int(n_repeat),
                samples=int(k),
                seed_groups=int(n_groups),
                broad_max=int(n_broad),
            )
        except (TypeError, ValueError):
            raise InputError("personal fine-tune: fill in every option with a number") from None
        start_job(ctx, _user(name, request), options)
        return show(name, request)

    start.click(
        on_start,
        [user, steps, margin, repeat, samples, groups, broad],
        outputs,
        api_name="job_start",
        show_progress="minimal",
    )

    @_guard
    def on_cancel(name, request: gr.Request):
        who = _user(name, request)
        running = [v for v in list_jobs(ctx, who) if not v.finished]
        if not running:
            raise InputError("no running job to cancel")
        cancel_job(ctx, who, running[0].job_id, wait=10.0)
        return show(name, request)

    cancel.click(on_cancel, [user], outputs, api_name="job_cancel")

    def on_tick(name, request: gr.Request):
        return show(name, request)

    timer.tick(on_tick, [user], outputs, api_name="job_status", show_progress="hidden")
    return panel


# ------------------------------------------------------------------------------------------------- the job side
class _Cancelled(Exception):
    pass


def run_job(job_dir: Path) -> int:
    """The driver: votes -> synth -> train, each step one workbench command run in this process; the status file
    follows every phase, and any failure ends the job as ``failed`` with its message."""
    job_dir = Path(job_dir).resolve()
    spec = json.loads((job_dir / "job.json").read_text())
    opts = JobOptions.from_dict(spec["options"])

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    update_status(job_dir, pid=os.getpid())
    try:
        _phase(job_dir, "votes", "exporting your votes")
        vote_pairs = _export_votes(job_dir, spec, opts)
        _phase(job_dir, "synth", "rendering and scoring synthetic samples", counts={"your_pairs": vote_pairs})
        synth_pairs = _synth(job_dir, spec, opts)
        counts = {"your_pairs": vote_pairs, "repeat": opts.vote_repeat, "synthetic_pairs": synth_pairs}
        if synth_pairs + vote_pairs == 0:
            raise ValueError(
                f"no training pairs: no synthetic pair has a personal-scorer margin above {opts.min_margin} and "
                "your votes gave no pairs; lower min_margin or vote more"
            )
        _phase(job_dir, "train", "training the LoRA", counts=counts)
        final = _train(job_dir, spec, opts, with_votes=vote_pairs > 0, with_synth=synth_pairs > 0)
        update_status(job_dir, phase="done", finished=time.time(), result=str(final), message="finished")
        return 0
    except (KeyboardInterrupt, _Cancelled):
        update_status(job_dir, phase="cancelled", finished=time.time(), message="cancelled")
        print("[job] cancelled", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # the job's failure is reported on the page, whatever it is
        import traceback

        traceback.print_exc()
        update_status(job_dir, phase="failed", finished=time.time(), error=f"{type(exc).__name__}: {exc}")
        return 1


def _phase(job_dir: Path, phase: str, message: str, **extra: Any) -> None:
    if read_status(job_dir).get("cancel_requested"):
        raise _Cancelled
    update_status(job_dir, phase=phase, message=message, **extra)
    print(f"[job] {phase}: {message}", file=sys.stderr, flush=True)


def _export_votes(job_dir: Path, spec: dict[str, Any], opts: JobOptions) -> int:
    """The user's pairs as image-pair JSONL (``votes/pairs.jsonl``, images by their path in the store), expanded
    as the store's export does (:func:`apps.store.expand_pairs`), without ties (no DPO pair) and without the blind
    before/after rounds (:data:`apps.personal.EVAL_SOURCE`: the evaluation set is never trained on); then each
    pair ``vote_repeat`` times into ``votes/weighted.jsonl``. Returns the number of distinct pairs."""
    from apps.personal import EVAL_SOURCE
    from apps.store import VoteStore, expand_pairs

    rows = []
    for vote in VoteStore(spec["db"]).votes(user_id=spec["user"]):
        if vote.round.source == EVAL_SOURCE:
            continue
        for pair in expand_pairs(vote):
            if pair.label_first == 0.5:
                continue
            first, second = (vote.round.items[s].path for s in (pair.first, pair.second))
            row = {
                "image_0": str(first),
                "image_1": str(second),
                "prefer_0": pair.label_first,
                "prefer_1": 1.0 - pair.label_first,
                "prompt": vote.round.prompt,
                "user_id": vote.user_id,
                "vote_id": vote.vote_id,
            }
            rows.append(json.dumps(row) + "\n")
    out = job_dir / "votes"
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.jsonl").write_text("".join(rows))
    (out / "weighted.jsonl").write_text("".join(r for r in rows for _ in range(opts.vote_repeat)))
    print(
        f"[job] votes: {len(rows)} pairs from your votes, each written {opts.vote_repeat} times",
        file=sys.stderr,
    )
    return len(rows)


def _prompts(spec: dict[str, Any], opts: JobOptions) -> list[str]:
    import random

    from workbench.prompts import load_prompts

    broad_spec = opts.broad_prompts or ("toy:train" if spec.get("toy") else "parti")
    broad = load_prompts(broad_spec) if opts.broad_max else []
    broad = random.Random(opts.seed).sample(broad, min(opts.broad_max, len(broad)))
    return list(dict.fromkeys([*spec["user_prompts"], *broad]))


def _cli(argv: list[str]) -> None:
    from workbench.cli import main

    print(f"[job] workbench {' '.join(argv)}", file=sys.stderr, flush=True)
    rc = main(argv)
    if rc == 130:
        raise KeyboardInterrupt
    if rc != 0:
        raise RuntimeError(f"`workbench {argv[0]}` exited with code {rc}: {_last_error(Path.cwd())}")


def _last_error(job_dir: Path) -> str:
    """The last ``error: ...`` line the command printed (the CLI's message for bad config or data)."""
    sys.stderr.flush()
    for line in reversed(log_tail(job_dir, 200).splitlines()):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    return "see the log below"


def _synth(job_dir: Path, spec: dict[str, Any], opts: JobOptions) -> int:
    """``workbench synth`` once per seed group, into ``synth/g<i>/`` (group g's sample k has seed
    ``first_seed + 1000 g + k``); returns the pairs written."""
    prompts = _prompts(spec, opts)
    prompt_file = job_dir / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    scorer = job_dir / "scorer.json"
    if "," in str(scorer):
        raise ValueError(
            f"{scorer}: the job folder's path contains a comma, which a scorer spec cannot carry"
        )
    for g in range(opts.seed_groups):
        update_status(job_dir, synth_group=[g + 1, opts.seed_groups])
        argv = ["synth", "--base", spec["base"], "--prompts", str(prompt_file), "-k", str(opts.samples)]
        argv += ["-s", f"personal:path={scorer}", "--pairs", opts.pairs, "--min-gap", str(opts.min_margin)]
        argv += ["--first-seed", str(opts.first_seed + 1000 * g), "--shard-size", "16"]
        argv += ["--sampler", spec["sampler"], "--steps", str(spec["synth_steps"])]
        argv += ["--guidance", str(spec["guidance"]), "-o", str(job_dir / "synth" / f"g{g}")]
        argv += ["--device", spec.get("device", "auto"), "--batch-size", "32"]
        _cli(argv)
    import pyarrow.parquet as pq

    files = sorted((job_dir / "synth").glob("g*/pairs/*.parquet"))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _train(
    job_dir: Path, spec: dict[str, Any], opts: JobOptions, *, with_votes: bool, with_synth: bool
) -> Path:
    sources = []
    if with_synth:
        # every seed group's shards (the reader takes a folder's .parquet files recursively)
        sources.append({"format": "pickapic_parquet", "path": str(job_dir / "synth")})
    if with_votes:
        # its image paths point into the app's own store, outside the job folder: this file is ours to trust
        sources.append(
            {
                "format": "pair_jsonl",
                "path": str(job_dir / "votes" / "weighted.jsonl"),
                "allow_outside_paths": True,
            }
        )
    overrides = [
        f"run.output_dir={job_dir}",
        "run.name=run",
        f"run.seed={opts.seed}",
        f"model.source={spec['base']}",
        f"data.sources={json.dumps(sources)}",
        f"train.max_steps={opts.steps}",
        f"train.checkpoint_every={opts.steps}",
        "validation.every=0",
        "logging.tensorboard=false",
        f"data.cache.dir={job_dir / 'cache'}",
    ]
    if opts.lr is not None:
        overrides.append(f"optimizer.lr={opts.lr}")
    if opts.beta is not None:
        overrides.append(f"objective.beta={opts.beta}")
    if opts.sft_weight is not None:
        overrides.append(f"objective.sft_weight={opts.sft_weight}")
    if opts.batch_size is not None:
        overrides.append(f"train.batch_size={opts.batch_size}")
    _cli(["train", spec["config"], *overrides, "--no-progress"])
    final = job_dir / "run" / "final"
    if not (final / "COMPLETE").is_file():
        raise RuntimeError(f"training ended without {final / 'COMPLETE'}")
    return final


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(
            "usage: python -m apps.jobs JOB_DIR (started by the app's personal fine-tune button)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    raise SystemExit(run_job(Path(sys.argv[1])))
