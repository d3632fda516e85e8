"""Preference objectives as pure functions, registered in ``OBJECTIVES`` (explicit imports, no discovery)."""

from trainers import diffusion_dpo, inpo, npo, rankdpo, self_npo, sft, smpo
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
    "inpo",
    "npo",
    "per_sample_error",
    "rankdpo",
    "self_npo",
    "sft",
    "smpo",
]
