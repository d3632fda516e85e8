"""The toy world: a synthetic captioned world, a tiny SDXL-architecture pipeline pretrained on it, and (in
:mod:`rewards.toy`) analytic ground-truth rewards. Everything runs on CPU in minutes; see ``assets/MODEL_CARD.md``."""
