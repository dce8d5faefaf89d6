"""Does the synthetic data help a team that trains on it? Two measurements with one fixed classifier
recipe (classifier.py), always tested on the real test set.

- Classification Accuracy Score (Ravuri & Vinyals 2019): train on the synthetic set only; next to it,
  the same recipe on as many real training samples with the same class histogram. CAS / real accuracy
  says how much of the real data's value the synthetic set carries.
- Augmentation gain: with K real labelled samples per class, train on the real ones only and on real +
  synthetic, for several seeds; report both accuracies and the paired difference (mean, spread). The
  synthetic set's generator must have been trained on exactly that K-per-class set, else the gain
  would come from labels the team does not have: `check_generator_saw_only` enforces it from the
  synthetic manifest's provenance.

How synthetic samples are mixed in (UsefulnessProtocol): every batch draws a fixed share from the
synthetic set (synthetic_fraction; the rest real), each synthetic sample's loss counts
synthetic_weight, and optionally only the synthetic samples that the real-only classifier of the
same seed assigns to their own label are kept (synthetic_filter = "agree": it knows only the K
labels, so it peeks at nothing).

The baseline is honest: the real samples of every classifier (real-only and mixed, CAS's real reference
too) get the classic free augmentation (protocol.augment: shift, flip, cutout; augment.py), and so do the
synthetic ones unless augment_synthetic is off. recommend.py chooses the mix on a validation split.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from gensynth.data.manifest import training_sets
from gensynth.errors import UsageError
from gensynth.evaluate.augment import ClassicAugment
from gensynth.evaluate.classifier import Pool, Recipe, SmallCNN, accuracy, embed, progress_log, train_classifier
from gensynth.evaluate.sets import ImageSet, matching_subset

log = logging.getLogger("gensynth")


@dataclass(frozen=True)
class UsefulnessProtocol:
    recipe: Recipe = Recipe()
    seed: int = 0
    seeds: int = 3
    synthetic_fraction: float = 0.5
    synthetic_weight: float = 1.0
    synthetic_filter: str = "none"
    augment: ClassicAugment = ClassicAugment()  # of the real samples (on top of recipe.shift: eval sets that to 0)
    augment_synthetic: bool = True  # the synthetic samples get `augment` too

    def pool(self, images: torch.Tensor, labels: torch.Tensor, weight: float = 1.0, synthetic: bool = False,
             soft: torch.Tensor | None = None) -> Pool:
        """A training pool with this protocol's classic augmentation (for synthetic ones: if augment_synthetic);
        `soft`: targets that replace the labels in the loss (a relabelled synthetic set's)."""
        augment = self.augment if self.augment and (self.augment_synthetic or not synthetic) else None
        return Pool(images, labels, weight, soft, augment=augment)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["recipe"] = self.recipe.to_dict()
        out["augment"] = self.augment.to_dict()
        return out


def _train(pools: list[tuple[Pool, int]], num_classes: int, protocol: UsefulnessProtocol, seed: int,
           what: str) -> SmallCNN:
    log.info("training the classifier on %s (%d steps, seed %d)", what, protocol.recipe.steps, seed)
    return train_classifier(pools, num_classes, protocol.recipe, seed,
                            on_step=progress_log(f"classifier, {what}", protocol.recipe.steps))


def classification_accuracy_score(synthetic: ImageSet, real_train: ImageSet, real_test: ImageSet, num_classes: int,
                                  protocol: UsefulnessProtocol) -> dict[str, Any]:
    """CAS next to the same recipe on a real subset of the same size and class histogram (one seed)."""
    batch = protocol.recipe.batch_size
    index = matching_subset(real_train.labels, synthetic.histogram(), protocol.seed, what="real training set")
    real = real_train.select(index)
    cas_model = _train([(protocol.pool(synthetic.images, synthetic.labels, synthetic=True), batch)], num_classes,
                       protocol, protocol.seed, f"{len(synthetic)} synthetic samples (CAS)")
    real_model = _train([(protocol.pool(real.images, real.labels), batch)], num_classes, protocol, protocol.seed,
                        f"{len(real)} real samples (CAS baseline)")
    cas = accuracy(cas_model, real_test.images, real_test.labels)
    real_acc = accuracy(real_model, real_test.images, real_test.labels)
    return {"cas": cas, "real_accuracy": real_acc, "ratio": cas / real_acc if real_acc > 0 else float("nan"),
            "train_samples": len(synthetic), "test_samples": len(real_test), "seed": protocol.seed}


def per_class_count(labels: torch.Tensor) -> int | None:
    """K when every class present has exactly K samples, else None."""
    counts = torch.unique(labels[labels >= 0], return_counts=True)[1]
    return int(counts[0]) if len(counts) and bool((counts == counts[0]).all()) else None


def check_generator_saw_only(synthetic: ImageSet, k_set: ImageSet) -> None:
    """Refuse unless every real image set the synthetic set's generator saw (all its stages: a prior's VQ-VAE
    too) is exactly `k_set` (manifest sha256). Derived sets (code shards) are computed from a listed set."""
    seen = [s for s in training_sets(synthetic.provenance) if s.get("kind") != "derived"]
    if not seen or not all(s.get("manifest_sha256") for s in seen):
        raise UsageError(f"{synthetic.url}: its manifest's provenance.training_data does not give the manifest "
                         "sha256 of every set its generator saw, so nothing shows it saw only the K real samples per "
                         "class; augmentation gain needs a synthetic set written by `gensynth generate` from a model "
                         "trained on that K set")
    for s in seen:
        if s["manifest_sha256"] != k_set.manifest_sha256:
            model = f"the {s['model']} stage" if s.get("model") else "the model"
            raise UsageError(f"augmentation gain refused: {model} behind {synthetic.url} was trained on "
                             f"{s.get('train', '?')} (manifest sha256 {s['manifest_sha256'][:12]}...), not on the "
                             f"K-per-class set {k_set.url} (sha256 {str(k_set.manifest_sha256)[:12]}...), so it may "
                             "have seen more labels; train every stage on the K set (gensynth shard shards:TRAIN OUT "
                             "--per-class K) and generate again")


def _stats(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "runs": [float(v) for v in a]}


def augmentation_gain(k_set: ImageSet, synthetic: ImageSet, real_test: ImageSet, num_classes: int,
                      protocol: UsefulnessProtocol, check_provenance: bool = True,
                      real_models: dict[int, SmallCNN] | None = None) -> dict[str, Any]:
    """Real-only vs real + synthetic test accuracy over `protocol.seeds` seeds, paired by seed.

    real_models: the real-only classifier of each seed, reused from and added to this dict (they do not
    depend on the mix, so a search over mixes trains them once)."""
    if check_provenance:
        check_generator_saw_only(synthetic, k_set)
    batch = protocol.recipe.batch_size
    n_syn = int(round(protocol.synthetic_fraction * batch))
    n_real = batch - n_syn
    if n_real < 1 or n_syn < 1:
        raise UsageError(f"eval.synthetic_fraction={protocol.synthetic_fraction} leaves no room for real or synthetic "
                         f"samples in a batch of {batch}; use a value strictly between 0 and 1")
    real_acc, mixed_acc, kept = [], [], []
    real_pool = protocol.pool(k_set.images, k_set.labels)
    real_models = {} if real_models is None else real_models
    for i in range(protocol.seeds):
        seed = protocol.seed + i
        if seed not in real_models:
            real_models[seed] = _train([(real_pool, batch)], num_classes, protocol, seed, f"{len(k_set)} real samples")
        real_model = real_models[seed]
        real_acc.append(accuracy(real_model, real_test.images, real_test.labels))
        images, labels, soft = synthetic.images, synthetic.labels, synthetic.soft
        if protocol.synthetic_filter == "agree":
            _, logits = embed(real_model, images)
            agree = logits.argmax(1) == labels
            images, labels = images[agree], labels[agree]
            soft = None if soft is None else soft[agree]
            if len(labels) == 0:
                raise UsageError("synthetic_filter=agree kept no synthetic sample: the real-only classifier "
                                 "disagrees with every label; use eval.synthetic_filter=none")
        kept.append(len(labels))
        # soft labels (generate --relabel): synthetic samples train against the teacher's probabilities
        pools = [(real_pool, n_real), (protocol.pool(images, labels, protocol.synthetic_weight, synthetic=True,
                                                     soft=soft), n_syn)]
        mixed = _train(pools, num_classes, protocol, seed, f"{len(k_set)} real + {len(labels)} synthetic samples")
        mixed_acc.append(accuracy(mixed, real_test.images, real_test.labels))
        log.info("augmentation seed %d: real only %.2f%%, real + synthetic %.2f%%", seed, 100 * real_acc[-1],
                 100 * mixed_acc[-1])
    gains = [m - r for m, r in zip(mixed_acc, real_acc)]
    return {"k": per_class_count(k_set.labels), "real_samples": len(k_set), "synthetic_samples": len(synthetic),
            "synthetic_kept": kept, "k_set": k_set.describe(), "real_only": _stats(real_acc),
            "real_plus_synthetic": _stats(mixed_acc), "gain": _stats(gains), "protocol": protocol.to_dict(),
            "soft_labels": synthetic.soft is not None}
