"""Preference objectives as pure functions, registered in ``OBJECTIVES`` (explicit imports, no discovery)."""

from trainers import diffusion_dpo, sft
from trainers.base import OBJECTIVES, Objective, per_sample_error

__all__ = ["OBJECTIVES", "Objective", "diffusion_dpo", "per_sample_error", "sft"]
