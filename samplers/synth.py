"""Synthetic preference data: prompts -> K samples each (one or several checkpoints) -> scorer or ensemble ->
rankings (best-first) and pairs -> a dataset on disk, sharded and resumable.

Layout of an output folder::

    synth.json                      the plan (checked on resume: a different plan refuses to mix into the folder)
    images/SHARD/pPROMPT_kK.png     every sample
    pairs/shard-SHARD.parquet       Pick-a-Pic v2 layout: jpg_0, jpg_1 (PNG bytes), label_0, label_1, caption,
                                    plus score_0/1, seed_0/1, checkpoint_0/1, prompt_index, scorer
                                    and, once every shard is done, soft_label_0/1 (SmPO's smoothed labels from the
                                    scores, min / max over all shards: samplers.relabel)
    rankings/shard-SHARD.jsonl      {"prompt", "images" (best-first, relative to the file), "scores", "phi",
                                    "scorer_scores" {scorer: per image}, ...}, all lists in the "images" order
    done/shard-SHARD.json           written last: the shard is complete and is skipped on resume
    rankings.jsonl                  all shards merged (paths relative to the folder), written when all are done

Ranking (``rank_by``): ``score`` orders a prompt's samples by the scorer's (or the ensemble's) value, written as
``scores``; ``phi`` is the Syn-Pic recipe (Karthik et al. 2024, arXiv 2410.18013, Algorithm 1, what RankDPO trains
on): ``phi_i = wins_i / (n (K - 1))``, ``wins_i`` counting the (scorer, other sample) comparisons sample i wins over
the n scorers (an ensemble's members, or the one scorer), and ``scores`` is phi. Every line carries ``phi`` and each
scorer's raw scores (``scorer_scores``) whichever key ranks. Ties, explicitly: a tie between two samples under one
scorer counts 1/2 to each (``rewards.ensemble.win_rate``; Algorithm 1's strict ``>`` would give both nothing, so phi
would no longer sum to K / 2 per scorer); samples tied in phi keep sample order in the file and have no pair
(``preference_pairs`` needs a positive gap; RankDPO gives tied images their mean rank and no pair term); a prompt
whose samples all tie is dropped by the ranking reader (``data.drop_ties``).

Sample ``k`` of a prompt comes from checkpoint ``k % len(checkpoints)`` with seed ``first_seed + k`` (initial noise
by the shared rule in :mod:`samplers.noise`). Shard ``c`` holds prompts ``[c * shard_size, (c + 1) * shard_size)``;
under ``accelerate launch`` process ``i`` of ``n`` takes the shards with ``c % n == i``, so the split and the resume
points do not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from samplers.generate import from_uint8, png_bytes, save_png
from samplers.jobs import generate_images
from workbench.paths import writable_folder

PairMode = Literal["best-worst", "all"]
RankBy = Literal["score", "phi"]


# ----------------------------------------------------------------------------------------------------- pure rules
def ranking(scores: Sequence[float]) -> list[int]:
    """Indices best-first (higher score first; equal scores keep sample order)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def synpic_phi(table: Sequence[Sequence[float]]) -> list[float]:
    """Syn-Pic phi of one prompt's K samples from ``table[s][i]`` (scorer s's score of sample i): ``phi_i =
    wins_i / (n (K - 1))`` over the n scorers, a tie counting 1/2 (see the module docstring)."""
    import torch

    from rewards.ensemble import win_rate

    t = torch.tensor([list(row) for row in table], dtype=torch.float64)  # [n, K]
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 2:
        raise ValueError(f"synpic_phi needs a [n scorers, K >= 2 samples] table, got shape {tuple(t.shape)}")
    return [float(v) for v in win_rate(t, [""] * t.shape[1])]


def preference_pairs(
    scores: Sequence[float], mode: PairMode = "best-worst", min_gap: float = 0.0
) -> list[tuple[int, int]]:
    """(winner, loser) sample indices. ``best-worst``: the top against the bottom sample; ``all``: every pair. A
    pair is kept only when the winner's score exceeds the loser's by more than ``min_gap`` (ties are never pairs)."""
    order = ranking(scores)
    if mode == "best-worst":
        candidates = [(order[0], order[-1])] if len(order) >= 2 else []
    elif mode == "all":
        candidates = [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]
    else:
        raise ValueError(f"pairs mode {mode!r} is unknown; use 'best-worst' or 'all'")
    return [(w, lo) for w, lo in candidates if scores[w] - scores[lo] > min_gap]


def winner_first(prompt: str, winner: int, loser: int) -> bool:
    """Whether the winner goes in column ``jpg_0``: a stable coin per (prompt, pair), so that both positions occur
    (as in Pick-a-Pic) and readers must honour ``label_0``/``label_1``."""
    return hashlib.blake2b(f"{prompt}\x00{winner}\x00{loser}".encode(), digest_size=1).digest()[0] % 2 == 0


def shards_of(n_prompts: int, shard_size: int, process_index: int = 0, num_processes: int = 1) -> list[range]:
    """Prompt index ranges of the shards this process owns."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    n_shards = (n_prompts + shard_size - 1) // shard_size
    return [
        range(c * shard_size, min((c + 1) * shard_size, n_prompts))
        for c in range(n_shards)
        if c % num_processes == process_index
    ]


# -------------------------------------------------------------------------------------------------- orchestration
@dataclass
class SynthPlan:
    base: str
    checkpoints: list[Any]  # samplers.Checkpoint
    prompts: list[str]
    k: int
    sampling: Any  # samplers.SamplingConfig
    scorer: str  # name recorded in the data (a scorer name or "ensemble(...)")
    out_dir: Path
    pairs: PairMode = "best-worst"
    min_gap: float = 0.0
    first_seed: int = 0
    shard_size: int = 32
    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "fp32"
    prompt_set: str = "custom"
    rank_by: RankBy = "score"
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What must match for a resumed run to continue an existing folder."""
        return {
            "base": self.base,
            "checkpoints": [c.identity() for c in self.checkpoints],
            "n_prompts": len(self.prompts),
            "prompts_sha256": hashlib.sha256("\n".join(self.prompts).encode()).hexdigest(),
            "k": self.k,
            "sampling": self.sampling.to_dict(),
            "scorer": self.scorer,
            "pairs": self.pairs,
            "min_gap": self.min_gap,
            "first_seed": self.first_seed,
            "shard_size": self.shard_size,
            **({"rank_by": self.rank_by} if self.rank_by != "score" else {}),  # older folders still resume
        }


@dataclass
class SynthResult:
    out_dir: Path
    shards_done: int
    shards_skipped: int
    pairs: int
    seconds: float


def run_synth(
    plan: SynthPlan,
    scorer: Callable[..., Any],
    load: Callable[[Any], Any],
    *,
    process_index: int = 0,
    num_processes: int = 1,
) -> SynthResult:
    """Generate, score and write every shard this process owns and that is not done yet."""
    import torch

    out = writable_folder(plan.out_dir, "out_dir")
    _check_plan(out / "synth.json", plan, write=process_index == 0)
    if plan.k < 2:
        raise ValueError(f"k must be >= 2 samples per prompt to form preferences, got {plan.k}")
    pipes: dict[str, Any] = {}

    def pipe_of(ckpt: Any) -> Any:
        if ckpt.name not in pipes:
            pipes[ckpt.name] = load(ckpt)
        return pipes[ckpt.name]

    t0 = time.perf_counter()
    done = skipped = n_pairs = 0
    for shard in shards_of(len(plan.prompts), plan.shard_size, process_index, num_processes):
        c = shard.start // plan.shard_size
        tag = f"{c:05d}"
        if (out / "done" / f"shard-{tag}.json").exists():
            skipped += 1
            continue
        ts = time.perf_counter()
        images: dict[tuple[int, int], np.ndarray] = {}  # (prompt index, k) -> image
        for ci, ckpt in enumerate(plan.checkpoints):
            ks = [k for k in range(plan.k) if k % len(plan.checkpoints) == ci]
            items = [(p, k) for p in shard for k in ks]
            batches = generate_images(
                lambda c_=ckpt: pipe_of(c_),
                [plan.prompts[p] for p, _ in items],
                [plan.first_seed + k for _, k in items],
                plan.sampling,
                batch_size=plan.batch_size,
                desc=f"synth shard {tag} {ckpt.name}",
            )
            for idx, imgs in batches:
                for i, img in zip(idx, imgs):
                    images[items[i]] = img
        # score whole prompt groups together (ensembles that rank within a prompt need all K at once)
        scores: dict[tuple[int, int], float] = {}
        members: dict[tuple[int, int], dict[str, float]] = {}  # each scorer's raw score (Syn-Pic phi's table)
        group = max(1, plan.batch_size // plan.k)
        shard_list = list(shard)
        for g in range(0, len(shard_list), group):
            keys = [(p, k) for p in shard_list[g : g + group] for k in range(plan.k)]
            x = from_uint8([images[key] for key in keys]).to(plan.device)
            texts = [plan.prompts[p] for p, _ in keys]
            with torch.no_grad():
                # an ensemble: its members' scores, then their combination
                if hasattr(scorer, "member_scores"):
                    ensemble: Any = scorer
                    per = ensemble.member_scores(x, texts)
                    s = ensemble.combine(per, texts).float().cpu().numpy()
                else:
                    s = scorer(x, texts).float().cpu().numpy()
                    per = {plan.scorer: torch.from_numpy(s)}
            scores.update(zip(keys, s.tolist()))
            for i, key in enumerate(keys):
                members[key] = {name: float(v[i]) for name, v in per.items()}
        n_pairs += _write_shard(out, tag, plan, shard_list, images, scores, members)
        _atomic_write(
            out / "done" / f"shard-{tag}.json",
            json.dumps({"prompts": [shard.start, shard.stop], "seconds": round(time.perf_counter() - ts, 2)}),
        )
        done += 1
    if process_index == 0 and merge_rankings(out, len(plan.prompts), plan.shard_size) is not None:
        from samplers.relabel import finalise_synth_pairs

        # SmPO soft labels: min / max over every shard's scores
        finalise_synth_pairs(out / "pairs", plan.scorer)
    return SynthResult(out, done, skipped, n_pairs, time.perf_counter() - t0)


def _write_shard(
    out: Path,
    tag: str,
    plan: SynthPlan,
    prompt_ids: list[int],
    images: dict[tuple[int, int], np.ndarray],
    scores: dict[tuple[int, int], float],
    members: dict[tuple[int, int], dict[str, float]],
) -> int:
    rows: dict[str, list[Any]] = {
        c: []
        for c in (
            "jpg_0",
            "jpg_1",
            "label_0",
            "label_1",
            "caption",
            "score_0",
            "score_1",
            "seed_0",
            "seed_1",
            "checkpoint_0",
            "checkpoint_1",
            "prompt_index",
            "scorer",
        )
    }
    rank_lines = []
    n_ckpt = len(plan.checkpoints)
    for p in prompt_ids:
        prompt = plan.prompts[p]
        paths = [save_png(images[(p, k)], out / "images" / tag / f"p{p:06d}_k{k}.png") for k in range(plan.k)]
        names = list(members[(p, 0)])
        table = {name: [members[(p, k)][name] for k in range(plan.k)] for name in names}
        phi = synpic_phi(list(table.values()))
        s = phi if plan.rank_by == "phi" else [scores[(p, k)] for k in range(plan.k)]
        order = ranking(s)
        rank_lines.append(
            json.dumps(
                {
                    "prompt": prompt,
                    "images": [os.path.relpath(paths[k], out / "rankings") for k in order],
                    "scores": [s[k] for k in order],
                    "phi": [phi[k] for k in order],
                    "scorer_scores": {name: [v[k] for k in order] for name, v in table.items()},
                    "seeds": [plan.first_seed + k for k in order],
                    "checkpoints": [plan.checkpoints[k % n_ckpt].name for k in order],
                    "prompt_index": p,
                    "scorer": plan.scorer,
                }
            )
        )
        encoded: dict[int, bytes] = {}
        for w, lo in preference_pairs(s, plan.pairs, plan.min_gap):
            first, second = (w, lo) if winner_first(prompt, w, lo) else (lo, w)
            for k in (first, second):
                if k not in encoded:
                    encoded[k] = png_bytes(images[(p, k)])
            rows["jpg_0"].append(encoded[first])
            rows["jpg_1"].append(encoded[second])
            rows["label_0"].append(1.0 if first == w else 0.0)
            rows["label_1"].append(1.0 if second == w else 0.0)
            rows["caption"].append(prompt)
            rows["score_0"].append(s[first])
            rows["score_1"].append(s[second])
            rows["seed_0"].append(plan.first_seed + first)
            rows["seed_1"].append(plan.first_seed + second)
            rows["checkpoint_0"].append(plan.checkpoints[first % n_ckpt].name)
            rows["checkpoint_1"].append(plan.checkpoints[second % n_ckpt].name)
            rows["prompt_index"].append(p)
            rows["scorer"].append(plan.scorer)
    n_rows = write_pickapic_parquet(out / "pairs" / f"shard-{tag}.parquet", rows)
    _atomic_write(out / "rankings" / f"shard-{tag}.jsonl", "".join(line + "\n" for line in rank_lines))
    return n_rows


def write_pickapic_parquet(path: Path, columns: dict[str, list[Any]]) -> int:
    """Write pairs in the Pick-a-Pic v2 layout (``jpg_0``/``jpg_1`` encoded image bytes, ``label_0``/``label_1``,
    ``caption``, any extra columns) atomically; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    missing = {"jpg_0", "jpg_1", "label_0", "label_1", "caption"} - set(columns)
    if missing:
        raise ValueError(f"Pick-a-Pic columns missing: {sorted(missing)}")
    binary = {k: pa.array(columns[k], pa.binary()) for k in ("jpg_0", "jpg_1")}
    table = pa.table({**columns, **binary})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return table.num_rows


def merge_rankings(out: Path, n_prompts: int, shard_size: int) -> Path | None:
    """Concatenate the shard rankings into ``rankings.jsonl`` (paths rebased to ``out``) once every shard is done."""
    n_shards = (n_prompts + shard_size - 1) // shard_size
    tags = [f"{c:05d}" for c in range(n_shards)]
    if not all((out / "done" / f"shard-{t}.json").exists() for t in tags):
        return None
    lines = []
    for t in tags:
        for line in (out / "rankings" / f"shard-{t}.jsonl").read_text(encoding="utf-8").splitlines():
            obj = json.loads(line)
            obj["images"] = [os.path.normpath(os.path.join("rankings", p)) for p in obj["images"]]
            lines.append(json.dumps(obj))
    path = out / "rankings.jsonl"
    _atomic_write(path, "".join(line + "\n" for line in lines))
    return path


def _check_plan(path: Path, plan: SynthPlan, *, write: bool) -> None:
    identity = json.loads(json.dumps(plan.identity(), default=str))
    if path.exists():
        existing = json.loads(path.read_text(encoding="utf-8"))
        if existing.get("identity") != identity:
            diff = sorted(k for k in identity if existing.get("identity", {}).get(k) != identity[k])
            raise ValueError(
                f"{path.parent} holds a synth run with a different plan (differs in: {', '.join(diff)}); "
                "resume with the same arguments or pass a new --out"
            )
    elif write:
        _atomic_write(
            path, json.dumps({"identity": identity, "prompt_set": plan.prompt_set, **plan.extra}, indent=2)
        )


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
