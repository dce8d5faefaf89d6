"""The classifier filter of generation: keep a sample only when a classifier recognises its label."""

from __future__ import annotations

from typing import Any

import torch

from gensynth import storage
from gensynth.data.manifest import imitated_set, manifest_url
from gensynth.errors import UsageError


class SampleFilter:
    """Keep a sample only when a classifier (the evaluation's feature extractor, gensynth/evaluate/)
    gives its intended label a probability of at least `threshold`."""

    MAX_ROUNDS = 50  # redraws of the rejected samples before a shard gives up
    REPORT_EVERY = 10  # rounds between progress lines while a shard redraws

    def __init__(self, classifier: Any, threshold: float, describe: dict[str, Any]):
        if not 0 < threshold < 1:
            raise UsageError(f"--filter-threshold {threshold}: must be between 0 and 1")
        self.model = classifier.eval()
        self.threshold = threshold
        self.describe = describe

    @torch.no_grad()
    def scores(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Probability of each sample's own label, for uint8 [n, C, H, W] images (fixed chunks of 256)."""
        out = []
        for i in range(0, len(images), 256):
            logits = self.model(self.model.normalize(images[i:i + 256]))
            out.append(logits.softmax(1).gather(1, labels[i:i + 256, None]).squeeze(1))
        return torch.cat(out) if out else torch.empty(0)


def load_filter(classifier: str, export_config: dict[str, Any], threshold: float, cache: str = "") -> SampleFilter:
    """The classifier export named, or the cached feature extractor of the images the export's samples imitate
    (the first images entry of its training data: a prior trains on codes, its VQ-VAE on those images)."""
    from gensynth.evaluate.extractor import load_extractor, resolve_extractor

    if classifier:
        extractor = load_extractor(classifier)
    else:
        train_url = imitated_set(export_config).get("train")
        if not train_url or not storage.exists(manifest_url(train_url)):
            raise UsageError(f"--filter needs a classifier: the export's training data {train_url!r} is not "
                             "reachable from here to find or train one; name one with --filter-classifier")
        extractor = resolve_extractor(train_url, cache=cache)
    describe = {"classifier_sha256": extractor.config.get("weights_sha256"), "threshold": threshold,
                "classifier_test_accuracy": extractor.test_accuracy,
                "classifier_trained_on": extractor.config.get("data", {}).get("manifest_sha256")}
    return SampleFilter(extractor.model, threshold, describe)
