"""dmd_minimal: Distribution Matching Distillation (arXiv 2311.18828), minimal."""
from .load import load_denoiser

__all__ = ["load_denoiser"]
