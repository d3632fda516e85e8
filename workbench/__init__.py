"""Diffusion alignment workbench: preference fine-tuning for text-to-image diffusion models."""

__version__ = "0.1.0"
