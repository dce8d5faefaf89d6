"""gensynth: train generative models on sharded data and turn them into synthetic training sets."""

__version__ = "0.1.0"
