"""Evaluation: metrics as plug-ins (gensynth/evaluate/metrics.py), used by training's eval_every."""
