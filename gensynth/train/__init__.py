"""Training: one Accelerate loop shared by every model family, plus a step module per family."""
