"""The feature extractor: the SmallCNN classifier (classifier.py) trained on a dataset's real
training shards, saved as an export and cached, so every evaluation of that dataset uses the same one.

    extractor = resolve_extractor("data/fashion/train", "data/fashion/test")   # trains once, then cached
    feats, predicted = extractor.embed(images)                                  # uint8 [n, C, H, W]

Cache: <cache>/extractors/<train manifest sha256>/<recipe digest>/ holding model.safetensors and
config.json (gensynth/export.py: weights sha256-checked, no pickle). config.json records the
training data (URL, manifest sha256, samples), the test set and the test accuracy, and the protocol
(recipe, epochs, seed, torch version). <cache> is eval.cache, else $GENSYNTH_CACHE, else
~/.cache/gensynth. Training streams the shards with ShardLoader and is deterministic on CPU for a
given seed and thread count. A new extractor is written to a temporary folder and renamed into
place, so concurrent evaluations never read a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gensynth import __version__, storage
from gensynth.data.manifest import manifest_sha256, read_manifest
from gensynth.data.stream import ShardLoader
from gensynth.errors import UsageError
from gensynth.evaluate.classifier import Recipe, SmallCNN, embed, fit, progress_log
from gensynth.evaluate.sets import SMALL_SET
from gensynth.export import ExportError, load_export, save_export

log = logging.getLogger("gensynth")
KIND = "gensynth-feature-extractor"


def cache_root(configured: str = "") -> Path:
    return Path(configured or os.environ.get("GENSYNTH_CACHE") or Path.home() / ".cache" / "gensynth")


def sibling_test_set(train_url: str) -> str | None:
    """data/x/train -> data/x/test, when that holds a shard set."""
    url = str(train_url).rstrip("/")
    if url.endswith(".json"):
        url = storage.parent(url)
    candidate = storage.join(storage.parent(url), "test")
    return candidate if storage.exists(storage.join(candidate, "manifest.json")) else None


@dataclass
class Extractor:
    model: SmallCNN
    config: dict[str, Any]
    folder: Path | None = None

    @property
    def test_accuracy(self) -> float | None:
        """Accuracy on its real test set; None for one trained without a test set at hand (a teacher of a
        K-shot set: resolve_extractor(require_test=False))."""
        test = self.config.get("test")
        return float(test["accuracy"]) if test else None

    @property
    def feature_dim(self) -> int:
        return int(self.model.head.in_features)

    def embed(self, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """(features float32 [n, d], predicted class [n]) of uint8 images."""
        feats, logits = embed(self.model, images, batch_size)
        return feats.numpy(), logits.argmax(1).numpy()

    def describe(self) -> dict[str, Any]:
        """What every reported metric carries: which extractor, trained on what, how good."""
        return {"folder": str(self.folder) if self.folder else None,
                "weights_sha256": self.config.get("weights_sha256"), "train": self.config["data"],
                "test": self.config["test"], "protocol": self.config["protocol"], "feature_dim": self.feature_dim}


def recipe_for(epochs: float, seed: int, resize: tuple[int, str] | None = None) -> dict[str, Any]:
    recipe = {k: v for k, v in Recipe().to_dict().items() if k != "steps"}  # the extractor counts epochs
    protocol = {"recipe": recipe, "epochs": epochs, "seed": seed, "architecture": "SmallCNN",
                "features": "penultimate layer (128-d, after ReLU)"}
    if resize is not None:  # images of varied sizes, made one (ShardLoader's resize): another extractor
        protocol["resize"] = list(resize)
    return protocol


def protocol_digest(protocol: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]


def load_extractor(folder: str | Path) -> Extractor:
    tensors, config = load_export(folder)
    if config.get("kind") != KIND:
        raise ExportError(f"{folder}: not a feature extractor export (kind {config.get('kind')!r}, "
                          f"expected {KIND!r}); make one with `gensynth eval` or leave eval.extractor empty")
    arch = config["architecture"]
    model = SmallCNN(arch["channels"], arch["num_classes"], arch["width"], arch["feature_dim"], arch["dropout"])
    model.load_state_dict(tensors)
    return Extractor(model.eval(), config, Path(folder))


def _stream(loader: ShardLoader, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    done = 0
    while done < steps:
        for batch in loader:
            if len(batch["label"]) < 2:
                continue  # a 1-sample tail batch would break batch norm
            yield batch["image"], batch["label"], torch.ones(len(batch["label"]))
            done += 1
            if done >= steps:
                return


@torch.no_grad()
def measure_accuracy(model: SmallCNN, test_url: str, resize: tuple[int, str] | None = None) -> tuple[float, int]:
    loader = ShardLoader(test_url, batch_size=500, mode="exact", shuffle_buffer=0, rank=0, world_size=1,
                         decode_meta=False, resize=resize)
    right = total = 0
    for batch in loader:
        _, logits = embed(model, batch["image"])
        right += int((logits.argmax(1) == batch["label"]).sum())
        total += len(batch["label"])
    return right / max(total, 1), total


def train_extractor(train_url: str, test_url: str | None, out: str | Path, epochs: float = 2.0, seed: int = 0,
                    num_workers: int = 1, resize: tuple[int, str] | None = None) -> Extractor:
    """Train the extractor on every sample of `train_url` for `epochs` epochs, measure its accuracy on
    `test_url` (when given; else config "test" is None), save it as an export in `out`."""
    manifest = read_manifest(train_url)
    image = manifest.schema.get("image")
    labels = sorted(int(k) for k in manifest.class_histogram if int(k) >= 0)
    if image is None or not labels:
        raise UsageError(f"{train_url}: the feature extractor needs labelled images (a shard set whose manifest "
                         "has an image schema and a class histogram)")
    num_classes = max(len(manifest.classes or []), labels[-1] + 1)
    recipe = Recipe()
    workers = num_workers if manifest.num_samples > SMALL_SET else 0
    loader = ShardLoader(train_url, batch_size=recipe.batch_size, mode="exact", seed=seed,
                         shuffle_buffer=min(5000, manifest.num_samples), num_workers=workers, rank=0,
                         world_size=1, decode_meta=False, resize=resize)
    steps = max(1, math.ceil(epochs * len(loader)))
    log.info("training the feature extractor on %s (%d samples, %g epochs = %d steps; cached for reuse) ...",
             train_url, manifest.num_samples, epochs, steps)
    started = time.monotonic()
    on_step = progress_log("feature extractor", steps)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(image["channels"], num_classes, dropout=recipe.dropout)
        generator = torch.Generator().manual_seed(seed)
        fit(model, _stream(loader, steps), steps, recipe, generator, torch.device("cpu"), on_step)
    seconds = time.monotonic() - started
    test = accuracy_record(model, test_url, resize) if test_url else None
    if test:
        log.info("feature extractor: %.2f%% test accuracy on %s (%d images), trained in %.0f s",
                 100 * test["accuracy"], test_url, test["samples"], seconds)
    else:
        log.info("feature extractor: trained in %.0f s; no test set, so no test accuracy", seconds)
    config = {
        "kind": KIND, "family": "classifier", "architecture": model.architecture,
        "classes": manifest.classes or [str(i) for i in range(num_classes)], "num_classes": num_classes,
        "image": ({"height": resize[0], "width": resize[0], "channels": image["channels"]} if resize else
                  {k: image[k] for k in ("height", "width", "channels")}),
        "data": {"train": str(train_url), "manifest_sha256": manifest_sha256(train_url),
                 "samples": manifest.num_samples},
        "test": test,
        "protocol": {**recipe_for(epochs, seed, resize), "steps": steps, "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "train_seconds": round(seconds, 1)},
        "trained_with": f"gensynth {__version__}",
    }
    save_export(out, model.state_dict(), config)
    return load_extractor(out)


def accuracy_record(model: SmallCNN, test_url: str, resize: tuple[int, str] | None = None) -> dict[str, Any]:
    """The `test` entry of an extractor's config: its accuracy on the real set `test_url`."""
    acc, tested = measure_accuracy(model, test_url, resize)
    return {"url": str(test_url), "manifest_sha256": manifest_sha256(test_url), "samples": tested, "accuracy": acc}


def resolve_extractor(train_url: str, test_url: str | None = None, extractor: str = "", cache: str = "",
                      epochs: float = 2.0, seed: int = 0, require_test: bool = True,
                      resize: tuple[int, str] | None = None) -> Extractor:
    """The extractor to use: the export named by `extractor`, else the cached one for `train_url`'s
    manifest sha256 and this protocol, trained now if there is none (with a message and progress).
    Without `require_test`, a missing test set leaves its accuracy unmeasured (None) instead of refusing."""
    if extractor:
        return load_extractor(extractor)
    test_url = test_url or sibling_test_set(train_url)
    if not test_url and require_test:
        raise UsageError(f"no real test set for the feature extractor's accuracy: {train_url} has no sibling "
                         "'test' shard set; name one (gensynth eval --real, or eval.real_test=URL in training)")
    protocol = recipe_for(epochs, seed, resize)
    folder = cache_root(cache) / "extractors" / manifest_sha256(train_url) / protocol_digest(protocol)
    if (folder / "config.json").is_file():
        found = load_extractor(folder)
        if test_url and (found.config.get("test") or {}).get("manifest_sha256") != manifest_sha256(test_url):
            found.config["test"] = accuracy_record(found.model, test_url, resize)
        accuracy = found.test_accuracy
        log.info("feature extractor: cached %s (%s test accuracy)", folder,
                 "no" if accuracy is None else f"{100 * accuracy:.2f}%")
        return found
    tmp = folder.parent / f".{folder.name}{storage.TMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        train_extractor(train_url, test_url, tmp, epochs, seed, resize=resize)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("feature extractor cached in %s", folder)
    return load_extractor(folder)
