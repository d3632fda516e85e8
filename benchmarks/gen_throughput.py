"""Generation and scoring throughput: ``workbench generate`` / ``eval`` / ``synth`` batched against one image at a
time, and the scorer benchmark, in one run.

Each command runs end to end as a user runs it (``python -m workbench ...`` in a child process: pipeline load,
sampling, scoring, writing), on the committed toy pipeline, with the same prompts, seeds, sampler and steps, once with
``--batch-size 1`` and once with ``--batch-size B``; the two alternate for ``--rounds`` rounds and the best wall time
of each is kept. Images are compared between the two (``generate``: the PNGs; they come from the same initial noise,
so they differ only by floating-point reduction order). The ratio is end to end, so the fixed cost of starting the
process and loading the pipeline (the same in both) is included and the ratio understates the sampling speed-up.

The scorer part runs ``benchmarks/score_throughput.py`` (our resident, batched HPS scorer against the hpsv2-style
loop that reloads the checkpoint and scores one image per call) in the same run, at ``--score-arch`` (``tiny`` by
default: seconds; ``full`` = ViT-H-14, minutes on a CPU).

    python benchmarks/gen_throughput.py [--images 64] [--batch 16] [--steps 10] [--rounds 2] [--score-arch tiny]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall


def _max_png_diff(a: Path, b: Path) -> tuple[int, int]:
    """(images compared, largest absolute 8-bit pixel difference) between two generate output folders."""
    import numpy as np
    from PIL import Image

    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    worst = 0
    for f in files:
        x = np.asarray(Image.open(a / f), dtype=np.int16)
        y = np.asarray(Image.open(b / f), dtype=np.int16)
        worst = max(worst, int(np.abs(x - y).max()))
    return len(files), worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="images per command (prompts x seeds)")
    p.add_argument("--batch", type=int, default=16, help="the batched run's --batch-size")
    p.add_argument("--steps", type=int, default=10, help="sampler steps")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--commands", default="generate,eval,synth")
    p.add_argument("--score-arch", default="tiny", choices=("tiny", "full", "none"))
    args = p.parse_args()
    wb = [sys.executable, "-m", "workbench"]
    n_prompts = 8
    seeds = max(1, args.images // n_prompts)
    common = [
        "--base",
        "toy",
        "--prompts",
        "toy:heldout",
        "--max-prompts",
        str(n_prompts),
        "--steps",
        str(args.steps),
    ]
    results: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="gen-throughput-") as tmp:
        work = Path(tmp)

        def command(name: str, batch: int, rnd: int) -> list[str]:
            out = work / f"{name}_b{batch}_r{rnd}"
            size = ["--batch-size", str(batch)]
            if name == "generate":
                return [*wb, "generate", *common, "--seeds", f"0-{seeds - 1}", *size, "-o", str(out)]
            if name == "eval":
                return [
                    *wb, "eval", *common, "--seeds", f"0-{seeds - 1}", *size, "--no-cache", "--bootstrap", "200",
                    "-o", str(out),
                ]  # fmt: skip
            return [
                *wb, "synth", *common, "-k", str(seeds), "-s", "toy/fidelity", "--shard-size", "64", *size,
                "-o", str(out),
            ]  # fmt: skip

        for rnd in range(args.rounds):
            for name in [c.strip() for c in args.commands.split(",") if c.strip()]:
                for batch in (1, args.batch):
                    wall = _run(command(name, batch, rnd))
                    key = (name, batch)
                    results[key] = min(results.get(key, float("inf")), wall)
                    print(f"round {rnd}: {name} --batch-size {batch}: {wall:.1f} s", flush=True)
        print(
            f"\n== toy pipeline, {n_prompts} prompts x {seeds} seeds = {n_prompts * seeds} images per command, "
            f"{args.steps} steps, best of {args.rounds} alternating rounds (end-to-end wall time, process start "
            "and pipeline load included)"
        )
        print(f"{'command':10s} {'batch 1 (s)':>12s} {f'batch {args.batch} (s)':>12s} {'img/s b1':>9s} "
              f"{f'img/s b{args.batch}':>9s} {'ratio':>7s}")  # fmt: skip
        n = n_prompts * seeds
        for name in [c.strip() for c in args.commands.split(",") if c.strip()]:
            a, b = results[(name, 1)], results[(name, args.batch)]
            print(f"{name:10s} {a:12.1f} {b:12.1f} {n / a:9.2f} {n / b:9.2f} {a / b:6.2f}x")
        if "generate" in args.commands:
            count, worst = _max_png_diff(work / "generate_b1_r0", work / f"generate_b{args.batch}_r0")
            print(
                f"generate: {count} PNGs compared, batch 1 vs {args.batch}: largest pixel difference {worst}/255"
            )
    if args.score_arch != "none":
        print("\n== scorer (benchmarks/score_throughput.py, same run)", flush=True)
        extra = ["--arch", "tiny", "--images", "32", "--batch-size", "16", "--baseline-calls", "8"]
        cmd = [
            sys.executable,
            "benchmarks/score_throughput.py",
            *(extra if args.score_arch == "tiny" else []),
        ]
        subprocess.run(cmd, cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
