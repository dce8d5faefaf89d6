"""The filters of generation: keep a sample only when a classifier recognises its label (SampleFilter), and
only when it is not a near-copy of one of the model's training images (CopyFilter). A rejected sample is redrawn."""

from __future__ import annotations

from typing import Any

import torch

from gensynth import storage
from gensynth.data.manifest import imitated_set, manifest_sha256, manifest_url
from gensynth.errors import UsageError
from gensynth.evaluate.memorisation import nearest_index, search_nearest

UNSEEN_IMAGES = 10000  # unseen real images that set the near-copy scale (a median: more change nothing)


class SampleFilter:
    """Keep a sample only when a classifier (the evaluation's feature extractor, gensynth/evaluate/)
    gives its intended label a probability of at least `threshold`."""

    def __init__(self, classifier: Any, threshold: float, describe: dict[str, Any]):
        if not 0 < threshold < 1:
            raise UsageError(f"--filter {threshold}: must be between 0 and 1")
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


class CopyFilter:
    """Reject a sample that is a near-copy of one of the model's training images, by the evaluation's rule
    (gensynth/evaluate/memorisation.py): nearer to one, in RMS pixel distance, than `copy_ratio` x the median
    distance from unseen real images to them. The training images are indexed once (faiss, exact up to
    memorisation.EXACT_LIMIT); each shard's samples are searched against them."""

    def __init__(self, train: torch.Tensor, unseen: torch.Tensor, copy_ratio: float = 1 / 3,
                 describe: dict[str, Any] | None = None):
        if not 0 < copy_ratio < 1:
            raise UsageError(f"copy ratio {copy_ratio}: must be between 0 and 1")
        self.shape = tuple(train.shape[1:])
        if tuple(unseen.shape[1:]) != self.shape:
            raise UsageError(f"the unseen real images are {_size(unseen.shape[1:])}, the model's training images "
                             f"{_size(self.shape)}: name a set of the same kind of images with --copy-reference")
        self.index, search = nearest_index(train)
        scale = float(search_nearest(self.index, unseen)[0].median())
        self.threshold = copy_ratio * scale
        # what the job's fingerprint holds: the rule's inputs, not the figures computed from them (another CPU's
        # floating point could round those differently, and array tasks must agree on the job)
        self.identity = {**(describe or {}), "copy_ratio": round(copy_ratio, 6)}
        self.describe = {**self.identity, "median_unseen_rms": round(scale, 6),
                         "threshold_rms": round(self.threshold, 6), "search": search}

    def copies(self, images: torch.Tensor) -> torch.Tensor:
        """True for each uint8 [n, C, H, W] image that is a near-copy of a training image."""
        if tuple(images.shape[1:]) != self.shape:
            raise UsageError(f"the model draws {_size(images.shape[1:])} images, its training images are "
                             f"{_size(self.shape)}: --reject-copies cannot compare them")
        return search_nearest(self.index, images)[0] < self.threshold


def _size(chw: tuple[int, ...] | torch.Size) -> str:
    c, h, w = chw
    return f"{w}x{h}x{c}"


def load_copy_filter(export_config: dict[str, Any], reference: str = "") -> CopyFilter:
    """The copy filter of an export: its training images (the first images entry of its training data, which
    must still hold the set it was trained on) and `reference`, unseen real images (default: the test set
    beside the training set), for the scale."""
    from gensynth.evaluate.extractor import sibling_test_set
    from gensynth.evaluate.sets import load_image_set

    seen = imitated_set(export_config)
    train = seen.get("train")
    if not train or not storage.exists(manifest_url(train)):
        raise UsageError(f"--reject-copies needs the model's training images {train!r} to compare with, and they are "
                         "not reachable from here")
    if seen.get("manifest_sha256") and manifest_sha256(train) != seen["manifest_sha256"]:
        raise UsageError(f"--reject-copies refused: {train} now holds another set (manifest sha256 "
                         f"{manifest_sha256(train)[:12]}...) than the model was trained on "
                         f"({seen['manifest_sha256'][:12]}...)")
    unseen_url = reference or sibling_test_set(train)
    if not unseen_url:
        raise UsageError(f"--reject-copies needs unseen real images to set the near-copy scale, and {train} has no "
                         "test set beside it: name one with --copy-reference (real images the model never saw)")
    if not storage.exists(manifest_url(unseen_url)):
        raise UsageError(f"--copy-reference {unseen_url}: no shard set there (its manifest.json is missing)")
    seen_images = load_image_set(train, desc="read the training images")
    unseen = load_image_set(unseen_url, desc="read the unseen images")
    # what the rule was computed from, by content (a path spelt another way on a rerun is the same job)
    describe = {"train": {"images": len(seen_images), "manifest_sha256": seen_images.manifest_sha256},
                "unseen": {"images": min(len(unseen), UNSEEN_IMAGES), "manifest_sha256": unseen.manifest_sha256}}
    return CopyFilter(seen_images.images, unseen.images[:UNSEEN_IMAGES], describe=describe)
