"""The objective gym: every registered objective trained on the toy world with the same budget and seeds, each
evaluated against the base on prompts and seeds no recipe was tuned on.

Splits (``workbench.toy.world``):

* preference data: off-policy rendered centring pairs (winner = the prompt's shape centred, loser = the same scene
  off-centre; ``workbench demo``'s data) over the 105 ``gym_train`` prompts, or on-policy samples scored by an
  ensemble (the mitigation rows);
* validation (recipe choice): the 15 ``val`` prompts (kept out of every row's preference data) x seeds 2000-2007;
* held-out (the reported table): the 24 ``heldout`` prompts x seeds 1000-1012, the demo's evaluation items. Only
  the final table reads them: the recipe of each row and the mitigation choice are made on the validation split.

Each row trains one recipe (a YAML under ``configs/toy/`` plus overrides) with training seed 0, then base and every
row are rendered from identical initial noise (the samplers' rule; Euler, 10 steps, CFG 5) and scored by the target
reward ``toy/centering`` and the guard-rail ``toy/fidelity``. Differences are tuned minus base, with 95 % intervals
from the paired bootstrap that resamples prompts with all their seeds (``workbench.stats.compare_to_base``), and the
per-prompt win rate (a prompt wins when its mean difference over its seeds is > 0).

Usage::

    python benchmarks/objective_gym.py                      # the objective rows (sft, diffusion_dpo)
    python benchmarks/objective_gym.py --mitigations        # + the DPO fidelity-cost mitigations
    python benchmarks/objective_gym.py --rows diffusion_dpo --out runs/gym   # a subset; finished rows are reused

Trained rows are reused when ``OUT/rows/NAME/final/COMPLETE`` exists and the recipe is unchanged (``--fresh``
retrains); generated images are cached (``$WORKBENCH_CACHE/generations``), so a rerun only evaluates what is new.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET, GUARD = "toy/centering", "toy/fidelity"
VAL_SEEDS = list(range(2000, 2008))
TEST_SEEDS = list(range(1000, 1013))


@dataclass(frozen=True)
class Row:
    """One gym row: a recipe. ``data`` is ``rendered`` (off-policy centring pairs) or ``ensemble`` (on-policy samples
    of the base, best vs worst under the z-score ensemble of centring and fidelity)."""

    config: str
    overrides: tuple[str, ...] = ()
    data: str = "rendered"
    note: str = ""
    group: str = (
        "objective"  # "objective" rows: one per registered objective; "mitigation" rows: DPO variants
    )


#: The mitigation rows vary the previous demo recipe (300 steps, row "dpo 300 steps"); the DPO row is the toy recipe
#: as chosen from them on the validation split (configs/toy/dpo.yaml: 200 steps).
DPO300 = "train.max_steps=300"
ROWS: dict[str, Row] = {
    "sft": Row("configs/toy/sft.yaml", note="SFT on the winners (Diffusion-DPO train.py --sft)"),
    "diffusion_dpo": Row("configs/toy/dpo.yaml", note="the toy recipe: beta 2000, lr 5e-4, 200 steps"),
    "dpo 300 steps": Row(
        "configs/toy/dpo.yaml",
        (DPO300,),
        note="the previous demo recipe: the mitigations' baseline",
        group="mitigation",
    ),
    "dpo+sft_weight=0.5": Row(
        "configs/toy/dpo.yaml",
        (DPO300, "objective.sft_weight=0.5"),
        note="winner-MSE regulariser",
        group="mitigation",
    ),
    "dpo+sft_weight=2": Row(
        "configs/toy/dpo.yaml",
        (DPO300, "objective.sft_weight=2.0"),
        note="winner-MSE regulariser",
        group="mitigation",
    ),
    # At beta 2000 the DPO gradient on err_w is 0.5 * beta * sigmoid(-inside) ~ 500x that of err_w itself at the
    # start, so weights of order 1 cannot matter; 100 and 1000 bracket the DPO term's scale.
    "dpo+sft_weight=100": Row(
        "configs/toy/dpo.yaml",
        (DPO300, "objective.sft_weight=100.0"),
        note="winner-MSE regulariser",
        group="mitigation",
    ),
    "dpo+sft_weight=1000": Row(
        "configs/toy/dpo.yaml",
        (DPO300, "objective.sft_weight=1000.0"),
        note="winner-MSE regulariser",
        group="mitigation",
    ),
    "dpo lr=2.5e-4": Row(
        "configs/toy/dpo.yaml",
        (DPO300, "optimizer.lr=2.5e-4"),
        note="half the learning rate",
        group="mitigation",
    ),
    "dpo 200 steps": Row(
        "configs/toy/dpo.yaml", ("train.max_steps=200",), note="fewer steps", group="mitigation"
    ),
    "dpo ensemble pairs": Row(
        "configs/toy/dpo.yaml",
        (DPO300,),
        data="ensemble",
        note="on-policy K=4 best/worst by z(centring) + z(fidelity)",
        group="mitigation",
    ),
}


@dataclass
class Trained:
    name: str
    run_dir: Path
    seconds: float
    reused: bool
    data: dict[str, Any] = field(default_factory=dict)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


# --------------------------------------------------------------------------------------------------------- data
def rendered_pairs(out: Path, n: int, seed: int) -> tuple[Path, dict[str, Any]]:
    from workbench.commands.demo import render_pairs

    path = out / "data" / f"rendered_{n}_{seed}.parquet"
    if not path.is_file():
        info = render_pairs(path, n, seed, split="gym_train")
        (path.with_suffix(".json")).write_text(json.dumps(info))
    return path, json.loads(path.with_suffix(".json").read_text())


def ensemble_pairs(out: Path, rounds: int) -> tuple[Path, dict[str, Any]]:
    """On-policy pairs: ``rounds`` x (105 gym_train prompts x K = 4 base samples, seeds 4r..4r+3), each group's best
    and worst under the z-score ensemble of toy/centering and toy/fidelity (``workbench synth``)."""
    from workbench.cli import main as cli

    root = out / "data" / "ensemble"
    t = time.perf_counter()
    for r in range(rounds):
        args = ["synth", "--base", "toy", "--prompts", "toy:gym_train", "-k", "4", "--first-seed", str(4 * r)]
        args += ["--scorer", TARGET, "--scorer", GUARD, "--ensemble", "zscore", "--steps", "10"]
        args += ["--guidance", "5", "--batch-size", "64", "-o", str(root / f"round{r}")]
        if cli(args) != 0:
            raise RuntimeError(f"workbench synth failed: {' '.join(args)}")
    return root, {"rounds": rounds, "k": 4, "prompts": 105, "seconds": round(time.perf_counter() - t, 1)}


# ---------------------------------------------------------------------------------------------------- training
def train_row(name: str, row: Row, out: Path, data_path: Path, base: str, fresh: bool) -> Trained:
    from workbench.config import load_config, resolved_yaml
    from workbench.train import train

    run_dir = out / "rows" / _slug(name)
    if row.data == "ensemble":
        sources = ", ".join(
            f"{{format: pickapic_parquet, path: {json.dumps(str(p.resolve()))}}}"
            for p in sorted(data_path.glob("round*/pairs"))
        )
    else:
        sources = f"{{format: pickapic_parquet, path: {json.dumps(str(data_path.resolve()))}}}"
    overrides = [
        f"model.source={json.dumps(str(Path(base).resolve()))}",
        f"data.sources=[{sources}]",
        f"run.output_dir={json.dumps(str(run_dir.parent.resolve()))}",
        f"run.name={run_dir.name}",
        "run.seed=0",
        *row.overrides,
    ]
    cfg = load_config(ROOT / row.config, overrides)
    recipe = resolved_yaml(cfg)
    stamp = run_dir / "gym_row.json"
    if not fresh:  # a finished row with the same recipe (whatever its name) is reused
        for other in sorted((out / "rows").glob("*/gym_row.json")):
            info = json.loads(other.read_text())
            if (other.parent / "final" / "COMPLETE").is_file() and _recipe_key(info["recipe"]) == _recipe_key(
                recipe
            ):
                return Trained(name, other.parent, float(info["seconds"]), True)
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"[gym] training {name}: {row.config} {' '.join(row.overrides)}", flush=True)
    t = time.perf_counter()
    train(cfg, show_progress=False)
    seconds = time.perf_counter() - t
    stamp.write_text(json.dumps({"recipe": recipe, "seconds": seconds}))
    return Trained(name, run_dir, seconds, False)


def _recipe_key(recipe_yaml: str) -> str:
    """A resolved recipe without its run name, folder and checkpoint bookkeeping (none of which changes the trained
    weights): what decides whether a trained row can be reused."""
    import yaml

    data = yaml.safe_load(recipe_yaml)
    for section, key in (
        ("run", "name"),
        ("run", "output_dir"),
        ("train", "checkpoint_every"),
        ("train", "keep_last"),
    ):
        data.get(section, {}).pop(key, None)
    return json.dumps(data, sort_keys=True)


# -------------------------------------------------------------------------------------------------- evaluation
def evaluate(trained: list[Trained], base: str, out: Path, split: str, seeds: list[int]) -> dict[str, Any]:
    """Base and every row on ``split`` x ``seeds``: per row and scorer, ``compare_to_base`` figures."""
    from samplers import Checkpoint, SamplingConfig, default_cache_dir, parse_checkpoints
    from workbench.evaluation import EvalPlan, run_eval
    from workbench.prompts import toy_prompts
    from workbench.stats import compare_to_base

    prompts = toy_prompts(split)
    ckpts = [
        Checkpoint("base"),
        *parse_checkpoints([f"{_slug(t.name)}={t.run_dir / 'final'}" for t in trained]),
    ]
    plan = EvalPlan(
        base=base,
        checkpoints=ckpts,
        prompts=prompts,
        seeds=seeds,
        sampling=SamplingConfig(sampler="euler", steps=10, guidance=5.0),
        scorers=[TARGET, GUARD],
        out_dir=out / "eval" / split,
        prompt_set=f"toy:{split}",
        batch_size=48,
        cache_dir=default_cache_dir(),
    )
    result = run_eval(plan)
    item_prompts = [p for p, _ in plan.items]
    table: dict[str, Any] = {}
    for t in trained:
        scores = result.scores[_slug(t.name)]
        table[t.name] = {
            s: compare_to_base(scores[s], result.scores["base"][s], item_prompts) for s in (TARGET, GUARD)
        }
        table[t.name]["base_mean"] = {s: float(result.scores["base"][s].mean()) for s in (TARGET, GUARD)}
    return {
        "split": split,
        "n_prompts": len(prompts),
        "seeds": seeds,
        "rows": table,
        "report": str(result.html_path),
    }


def _iv(d: dict[str, Any]) -> str:
    return f"{d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def _rate(w: dict[str, Any]) -> str:
    b = w["bootstrap"]
    return f"{b['estimate']:.2f} [{b['low']:.2f}, {b['high']:.2f}] ({w['wins']}/{w['losses']})"


def guard_significant_loss(figures: dict[str, Any]) -> bool:
    return figures[GUARD]["delta"]["high"] < 0


def format_table(ev: dict[str, Any], trained: list[Trained], title: str) -> str:
    head = [
        "row",
        f"{TARGET} delta [95% CI]",
        "prompts won [95% CI] (W/L)",
        f"{GUARD} delta [95% CI]",
        "fidelity prompts won",
        "train s",
    ]
    lines = [f"{title}: {ev['n_prompts']} prompts x {len(ev['seeds'])} seeds, prompt-clustered intervals", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for t in trained:
        r = ev["rows"][t.name]
        cells = [
            t.name,
            _iv(r[TARGET]["delta"]),
            _rate(r[TARGET]["prompt_win_rate"]),
            _iv(r[GUARD]["delta"]),
            _rate(r[GUARD]["prompt_win_rate"]),
            f"{t.seconds:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    base = next(iter(ev["rows"].values()))["base_mean"] if ev["rows"] else {}
    if base:
        lines.append("")
        lines.append(f"base means: {TARGET} {base[TARGET]:.3f}, {GUARD} {base[GUARD]:.3f}")
    return "\n".join(lines)


def choose(ev: dict[str, Any], names: list[str]) -> str | None:
    """The row with the largest target gain whose guard-rail loss is not significant (its interval's upper end is not
    below 0), among rows whose target gain is significant; None if there is none."""
    ok = [
        n
        for n in names
        if ev["rows"][n][TARGET]["delta"]["low"] > 0 and not guard_significant_loss(ev["rows"][n])
    ]
    return max(ok, key=lambda n: ev["rows"][n][TARGET]["delta"]["estimate"]) if ok else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", default=None, help="comma-separated row names (default: the objective rows)"
    )
    parser.add_argument(
        "--mitigations", action="store_true", help="add the DPO fidelity-cost mitigation rows"
    )
    parser.add_argument("--out", default="runs/gym")
    parser.add_argument("--pairs", type=int, default=1000, help="rendered pairs (seed 0)")
    parser.add_argument(
        "--ensemble-rounds", type=int, default=3, help="x 105 prompts x K=4 on-policy samples"
    )
    parser.add_argument("--fresh", action="store_true", help="retrain rows even when a finished run matches")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="override every row's steps (smoke runs only)"
    )
    parser.add_argument("--val-seeds", type=int, default=len(VAL_SEEDS), help="seeds per validation prompt")
    parser.add_argument("--test-seeds", type=int, default=len(TEST_SEEDS), help="seeds per held-out prompt")
    args = parser.parse_args(argv)

    import torch

    from workbench.commands.generate import resolve_base

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    names = args.rows.split(",") if args.rows else [n for n, r in ROWS.items() if r.group == "objective"]
    if args.mitigations and not args.rows:
        names += [n for n, r in ROWS.items() if r.group == "mitigation"]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    out = Path(args.out)
    base = resolve_base("toy")
    t0 = time.perf_counter()
    rendered, rendered_info = rendered_pairs(out, args.pairs, 0)
    print(
        f"[gym] {rendered_info['pairs']} rendered pairs over {rendered_info['prompts']} gym_train prompts",
        flush=True,
    )
    ensemble: tuple[Path, dict[str, Any]] | None = None
    trained: list[Trained] = []
    for name in names:
        row = ROWS[name]
        if args.max_steps is not None:
            row = Row(
                row.config,
                (*row.overrides, f"train.max_steps={args.max_steps}"),
                row.data,
                row.note,
                row.group,
            )
        if row.data == "ensemble" and ensemble is None:
            ensemble = ensemble_pairs(out, args.ensemble_rounds)
            print(f"[gym] ensemble pairs: {ensemble[1]}", flush=True)
        data_path = ensemble[0] if row.data == "ensemble" and ensemble else rendered
        done = train_row(name, row, out, data_path, base, args.fresh)
        done.data = (ensemble[1] if row.data == "ensemble" and ensemble else rendered_info) | {
            "kind": row.data
        }
        print(f"[gym] {name}: {'reused' if done.reused else 'trained'} ({done.seconds:.0f} s)", flush=True)
        trained.append(done)

    val = evaluate(trained, base, out, "val", VAL_SEEDS[: args.val_seeds])
    test = evaluate(trained, base, out, "heldout", TEST_SEEDS[: args.test_seeds])
    text = [
        format_table(val, trained, "validation (recipe choice)"),
        "",
        format_table(test, trained, "held-out (reported)"),
    ]
    mitigations = [n for n in names if ROWS[n].group == "mitigation"]
    if len(mitigations) > 1:
        pick = choose(val, mitigations)  # the DPO toy recipe (diffusion_dpo) is this choice
        if pick is None:
            text.append(
                "\nchoice (validation): no DPO recipe has a significant centring gain without a significant "
                "fidelity loss; the demo keeps its recipe"
            )
        else:
            held = test["rows"][pick]
            text.append(
                f"\nchoice (validation): {pick!r}, the largest centring gain whose fidelity loss is not significant; "
                f"held-out: centring {_iv(held[TARGET]['delta'])}, fidelity {_iv(held[GUARD]['delta'])}"
                f"{' (a significant loss on held-out prompts)' if guard_significant_loss(held) else ''}"
            )
    text.append(f"\nwall time {time.perf_counter() - t0:.0f} s; reports: {val['report']}, {test['report']}")
    print("\n".join(text))
    (out / "gym.md").write_text("\n".join(text) + "\n")
    summary = {
        "rows": {t.name: {**asdict(ROWS[t.name]), "seconds": t.seconds, "data": t.data} for t in trained},
        "validation": val,
        "heldout": test,
    }
    (out / "gym.json").write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
