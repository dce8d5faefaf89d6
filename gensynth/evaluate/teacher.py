"""The teacher of `gensynth generate --relabel`: a classifier whose class probabilities are stored with every
generated sample (soft labels, for distillation).

    teacher = load_teacher("", sampler.config)        # the cached classifier of the generator's training set
    probs = teacher.probabilities(images)             # float32 [n, num_classes], rows sum to 1

The teacher is the evaluation's feature extractor (extractor.py) trained on the generator's own labelled
training set, cached in the same place under that set's manifest sha256. The K-shot rule: a teacher may see
no more labels than the generator saw, so it is trained on the set whose labels the generator learnt (the
first "images" entry of the export's training_data) and nothing else, and a named or cached teacher whose
recorded training data (manifest sha256) is another set is refused.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch

from gensynth import storage
from gensynth.data.manifest import imitated_set, manifest_sha256, manifest_url, read_manifest
from gensynth.errors import UsageError
from gensynth.evaluate.classifier import Recipe
from gensynth.evaluate.extractor import Extractor, accuracy_record, load_extractor, resolve_extractor

CHUNK = 256  # images per forward pass: fixed, so a sample's probabilities do not depend on how a shard is cut


def teacher_epochs(samples: int) -> float:
    """The extractor's 2 epochs, or more on a small set so that the teacher gets at least the classifier
    recipe's steps: a K-shot set of 100 images would otherwise be trained for 2 steps."""
    recipe = Recipe()
    batches = max(1, math.ceil(samples / recipe.batch_size))
    return max(2.0, recipe.steps / batches)


class Teacher:
    """A trained classifier (an extractor export) and what the manifest records about it."""

    def __init__(self, extractor: Extractor):
        self.extractor = extractor
        self.model = extractor.model.eval()
        self.num_classes = int(extractor.config["architecture"]["num_classes"])
        self.tensors_sha256 = tensors_sha256(self.model)

    @property
    def identity(self) -> dict[str, Any]:
        """What the generation's job fingerprint covers: which weights, trained on which data. The tensors'
        digest, not the export's sha256, which also covers its config (training time): a teacher retrained
        the same (deterministic on CPU) is the same job, so a rerun after its cache was cleared finishes it."""
        return {"teacher_tensors_sha256": self.tensors_sha256,
                "trained_on": (self.extractor.config.get("data") or {}).get("manifest_sha256")}

    def describe(self) -> dict[str, Any]:
        """The manifest's provenance.relabel: the field, the teacher, its training data and test accuracy."""
        config = self.extractor.config
        protocol = config.get("protocol") or {}
        return {"array": "soft", "field": "soft.npy", "dtype": "float32", "shape": [self.num_classes],
                "what": "the teacher's class probabilities (softmax) of each sample; index = label",
                "teacher": {"weights_sha256": config.get("weights_sha256"), "tensors_sha256": self.tensors_sha256,
                            "folder": str(self.extractor.folder) if self.extractor.folder else None,
                            "trained_on": config.get("data"), "test": config.get("test"),
                            "test_accuracy": self.extractor.test_accuracy,
                            "protocol": {k: protocol.get(k) for k in ("architecture", "epochs", "steps", "seed")}}}

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """float32 [n, num_classes] softmax of uint8 [n, C, H, W] images, on the CPU."""
        images = torch.as_tensor(images).cpu()
        out = [self.model(self.model.normalize(images[i:i + CHUNK])).softmax(1) for i in range(0, len(images), CHUNK)]
        return (torch.cat(out) if out else torch.empty(0, self.num_classes)).numpy().astype(np.float32)


def tensors_sha256(model: torch.nn.Module) -> str:
    """sha256 of a model's tensors (names, dtypes, shapes, values), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def generator_labelled_set(export_config: dict[str, Any]) -> dict[str, Any]:
    """The training set whose labels the generator learnt, with its manifest sha256, from the export's
    training_data; refused when the export does not record it."""
    seen = imitated_set(export_config)
    if not seen.get("manifest_sha256"):
        raise UsageError("--relabel: the export's config.json does not record the manifest sha256 of its training "
                         "data, so no teacher can be shown to see only the generator's labels; export the model "
                         "again with this gensynth")
    return seen


def check_trained_on(extractor: Extractor, seen: dict[str, Any], what: str) -> None:
    """Refuse a teacher trained on anything but the generator's labelled set (the K-shot rule)."""
    data = extractor.config.get("data") or {}
    if data.get("manifest_sha256") != seen["manifest_sha256"]:
        raise UsageError(f"--relabel refused: {what} was trained on {data.get('train', '?')} (manifest sha256 "
                         f"{str(data.get('manifest_sha256'))[:12]}...), not on the generator's training set "
                         f"{seen.get('train')} (sha256 {seen['manifest_sha256'][:12]}...); a teacher may see no more "
                         "labels than the generator saw")


def load_teacher(teacher: str, export_config: dict[str, Any], test: str = "", cache: str = "") -> Teacher:
    """The teacher export named by `teacher`, else the cached classifier of the generator's labelled training
    set (trained on first use); `test`: a real test set to measure its accuracy on (default: the `test` set
    beside its training set, if any)."""
    seen = generator_labelled_set(export_config)
    if teacher:
        extractor = load_extractor(teacher)
        check_trained_on(extractor, seen, f"--relabel-teacher {teacher}")
    else:
        train = seen.get("train")
        if not train or not storage.exists(manifest_url(train)):
            raise UsageError(f"--relabel needs the generator's training set {train!r} to train its teacher on, and it "
                             "is not reachable from here; name a teacher trained on it with --relabel-teacher")
        if manifest_sha256(train) != seen["manifest_sha256"]:
            raise UsageError(f"--relabel refused: {train} now holds another set (manifest sha256 "
                             f"{manifest_sha256(train)[:12]}...) than the generator was trained on "
                             f"({seen['manifest_sha256'][:12]}...); a teacher trained on it could see other labels")
        epochs = teacher_epochs(read_manifest(train).num_samples)
        extractor = resolve_extractor(train, test or None, cache=cache, epochs=epochs, require_test=False)
        check_trained_on(extractor, seen, f"the cached teacher {extractor.folder}")
    if test and (extractor.config.get("test") or {}).get("manifest_sha256") != manifest_sha256(test):
        extractor.config["test"] = accuracy_record(extractor.model, test)
    found = Teacher(extractor)
    arch, image = extractor.config["architecture"], export_config.get("image") or {}
    if found.num_classes != int(export_config["num_classes"]) or arch["channels"] != image.get("channels"):
        raise UsageError(f"--relabel: the teacher classifies {arch['channels']}-channel images into "
                         f"{found.num_classes} classes, the generator makes {image.get('channels')}-channel images of "
                         f"{export_config['num_classes']} classes")
    return found
