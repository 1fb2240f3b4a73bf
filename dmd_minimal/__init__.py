"""dmd_minimal: Distribution Matching Distillation (arXiv 2311.18828), minimal."""
