#!/usr/bin/env bash
# GPU check (issue 13, item 6): full-size SDXL-architecture (random init) Diffusion-DPO LoRA steps, ours vs the
# diffusers-example-style step, then a full fine-tune step, every other registered objective, and HPS scoring
# throughput ours vs the hpsv2-style loop; step time, peak memory and MFU. Under 5 minutes on one H200.
# What is timed, exactly: the docstring of benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh [--json results.json] [gpu_check.py options]
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --tiny      # CPU smoke run of the same code (seconds)
#
# Runs from a checkout without installing the package (PYTHONPATH = the repo root); needs torch (CUDA), diffusers,
# transformers, accelerate, peft, pydantic, omegaconf, open_clip_torch, pyarrow. Nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"  # no git revision: a copied tree may carry a stale .git
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
