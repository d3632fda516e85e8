"""Preference objectives as pure functions, registered in ``OBJECTIVES`` (explicit imports, no discovery)."""

from trainers import diffusion_dpo, sft
from trainers.base import (
    OBJECTIVES,
    Needs,
    ObjectiveContext,
    ObjectiveSpec,
    Predictions,
    per_sample_error,
)

__all__ = [
    "OBJECTIVES",
    "Needs",
    "ObjectiveContext",
    "ObjectiveSpec",
    "Predictions",
    "diffusion_dpo",
    "per_sample_error",
    "sft",
]
