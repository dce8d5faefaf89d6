"""`gensynth eval SYNTH --real REAL_TEST [--train REAL_TRAIN]`: is a synthetic shard set any good, and
does it help a team that trains on it? The library entry is `evaluate_synthetic(...)`.

The protocol (every number in metrics.json and report.html comes with it):
- N = min(eval.num, synthetic samples, real test samples) synthetic samples, chosen at random (seeded)
  with the synthetic set's class proportions.
- Real reference: N real TEST images with the same class histogram. Floor: N real TRAINING images
  with the same histogram, compared to the same test images in the same way. The floor is what a
  generator drawing fresh samples from the data distribution would score at this N.
- Features: the cached feature extractor for REAL_TRAIN (extractor.py); its test accuracy is reported.
- Memorisation against the generator's own training set (its manifest provenance), else REAL_TRAIN.
- CAS with the synthetic N samples vs N real training samples; augmentation gain when the generator
  was trained on a K-per-class set (or `k_set` names one): checked from provenance, refused otherwise.
  A synthetic set with soft labels (generate --relabel) trains its samples against them in augmentation
  gain (distillation); CAS keeps the hard labels, so it still measures the generator's labelled samples.
  Every usefulness classifier's real images get the classic augmentation eval.real_augment.
- The recommended mix (recommend.py): synthetic share, weight and filter chosen on a validation split of
  real labels outside the K set, never on the test set; the augmentation gain is measured at it, and the
  verdict (helps / neutral / hurts) leads metrics.json, report.html and the printed summary.
  recommended_mix.json beside metrics.json holds the choice for data.mix.MixLoader.from_recommendation.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gensynth import __version__, storage
from gensynth.config import EvalConfig, eval_problem
from gensynth.data.card import write_card
from gensynth.data.manifest import imitated_set, manifest_sha256, manifest_url, read_manifest
from gensynth.errors import ConfigError, GensynthError, UsageError
from gensynth.evaluate import fidelity
from gensynth.evaluate.augment import ClassicAugment
from gensynth.evaluate.classifier import Recipe, SmallCNN
from gensynth.evaluate.extractor import resolve_extractor
from gensynth.evaluate.memorisation import memorisation
from gensynth.evaluate.recommend import recommend, verdict, write_recommendation
from gensynth.evaluate.sets import ImageSet, load_image_set, matching_subset, scaled_histogram
from gensynth.evaluate.usefulness import (
    UsefulnessProtocol,
    augmentation_gain,
    check_generator_saw_only,
    classification_accuracy_score,
    per_class_count,
)

log = logging.getLogger("gensynth")


def default_report_dir(synthetic: str) -> str:
    """reports/<the synthetic set's folder name>."""
    return str(Path("reports") / storage.basename(str(synthetic).rstrip("/").removesuffix("/manifest.json")))


def usefulness_protocol(cfg: EvalConfig) -> UsefulnessProtocol:
    # shift=0: the recipe's own translation would come on top of real_augment's
    recipe = Recipe(steps=cfg.classifier_steps, batch_size=cfg.classifier_batch_size, lr=cfg.classifier_lr, shift=0)
    augment = ClassicAugment.parse(cfg.real_augment, cfg.augment_shift, cfg.augment_cutout)
    return UsefulnessProtocol(recipe, cfg.seed, cfg.seeds, cfg.synthetic_fraction, cfg.synthetic_weight,
                              cfg.synthetic_filter, augment=augment, augment_synthetic=cfg.augment_synthetic)


def _varied(url: str) -> bool:
    """Whether a set's images have several sizes (gensynth index records them)."""
    try:
        return bool((read_manifest(url).schema.get("image") or {}).get("sizes"))
    except GensynthError:
        return False


def _shape(s: ImageSet) -> tuple[int, ...]:
    return tuple(s.images.shape[1:])


def _readable(url: str | None) -> bool:
    try:
        return bool(url) and storage.exists(manifest_url(url))
    except Exception:  # an unreachable remote: treated as absent, and said so
        return False


def _fidelity(synth_f: np.ndarray, synth_pred: np.ndarray, synth_labels: np.ndarray, test_f: np.ndarray,
              test_pred: np.ndarray, test_labels: np.ndarray, floor_f: np.ndarray, cfg: EvalConfig) -> dict[str, Any]:
    kid_mean, kid_std = fidelity.kid(synth_f, test_f, cfg.kid_subset, cfg.kid_subsets, cfg.seed)
    kid_floor, kid_floor_std = fidelity.kid(floor_f, test_f, cfg.kid_subset, cfg.kid_subsets, cfg.seed)
    precision, recall = fidelity.precision_recall(test_f, synth_f, cfg.pr_k)
    precision_floor, recall_floor = fidelity.precision_recall(test_f, floor_f, cfg.pr_k)
    consistency, per_class = fidelity.class_consistency(synth_pred, synth_labels)
    real_agreement, real_per_class = fidelity.class_consistency(test_pred, test_labels)
    return {
        "fid": fidelity.fid(synth_f, test_f), "fid_floor": fidelity.fid(floor_f, test_f),
        "kid_x1000": 1000 * kid_mean, "kid_x1000_std": 1000 * kid_std,
        "kid_floor_x1000": 1000 * kid_floor, "kid_floor_x1000_std": 1000 * kid_floor_std,
        "precision": precision, "recall": recall, "precision_floor": precision_floor, "recall_floor": recall_floor,
        "class_consistency": consistency, "class_consistency_per_class": {str(k): v for k, v in per_class.items()},
        "real_test_agreement": real_agreement,
        "real_test_agreement_per_class": {str(k): v for k, v in real_per_class.items()},
    }


def evaluate_synthetic(synthetic: str, real_test: str, train: str | None = None, report: str | None = None,
                       cfg: EvalConfig | None = None, k_set: str | None = None) -> dict[str, Any]:
    """Evaluate the synthetic shard set `synthetic`; write metrics.json (and report.html) into `report`.

    train: the real training set (extractor, CAS baseline, FID floor); default: the generator's.
    k_set: the K-per-class real set for augmentation gain; default: the generator's training set when
    its manifest says it is a K-per-class subset. Returns the metrics (what metrics.json holds).
    """
    cfg = cfg or EvalConfig()
    if problem := eval_problem(cfg):
        raise ConfigError(problem)
    protocol = usefulness_protocol(cfg)  # a bad eval.real_augment fails here, before any reading
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[name] = round(now - clock, 1)
        clock = now

    synth_all = load_image_set(synthetic, desc="read synthetic set")
    if (synth_all.labels < 0).any():
        raise UsageError(f"{synthetic}: evaluation needs labelled synthetic samples (a cls field on every sample)")
    prov = synth_all.provenance or {}
    trained_on = imitated_set(prov).get("train")
    train = train or trained_on
    if not train:
        raise UsageError(f"{synthetic}: its manifest does not name the generator's training data; "
                         "pass the real training set with --train")
    # real sets of varied image sizes are made the synthetic set's size (eval.resize)
    fit = None if cfg.resize == "none" else (int(synth_all.images.shape[-1]), cfg.resize)
    test_all = load_image_set(real_test, desc="read real test set", resize=fit)
    train_all = load_image_set(train, desc="read real training set", resize=fit)
    if train_all.manifest_sha256 == test_all.manifest_sha256:
        raise UsageError(f"--train and --real both name the set {test_all.url}: the real training set must not be "
                         "the test set (the floors, CAS and the recommended mix's validation split come from it)")
    for name, s in (("real test set", test_all), ("real training set", train_all)):
        if _shape(s) != _shape(synth_all):
            raise UsageError(f"{s.url}: the {name} holds {_shape(s)} images, the synthetic set "
                             f"{_shape(synth_all)} (C, H, W): evaluate against data of the same kind")
    generator_train = train_all
    if trained_on and trained_on != train:
        if _readable(trained_on):
            generator_train = load_image_set(trained_on, desc="read the generator's training set", resize=fit)
        else:
            log.warning("the generator's training set %s is not readable here: memorisation is measured against "
                        "%s instead", trained_on, train)
    lap("read")

    extractor = resolve_extractor(train, real_test, cfg.extractor, cfg.cache, cfg.extractor_epochs, cfg.seed,
                                  resize=fit if _varied(train) else None)
    num_classes = int(extractor.config["num_classes"])
    lap("extractor")

    # -- the evaluated samples and the real references, all with the same class histogram
    n = min(cfg.num, len(synth_all), len(test_all))
    hist = scaled_histogram(synth_all.histogram(), n)
    synth = synth_all.select(matching_subset(synth_all.labels, hist, cfg.seed, "synthetic set"))
    test_ref = test_all.select(matching_subset(test_all.labels, hist, cfg.seed + 1, "real test set"))
    floor_ref = train_all.select(matching_subset(train_all.labels, hist, cfg.seed + 2, "real training set"))
    synth_f, synth_pred = extractor.embed(synth.images)
    test_f, test_pred = extractor.embed(test_ref.images)
    floor_f, _ = extractor.embed(floor_ref.images)
    fid_part = _fidelity(synth_f, synth_pred, synth.labels.numpy(), test_f, test_pred, test_ref.labels.numpy(),
                         floor_f, cfg)
    lap("fidelity")

    mem = memorisation(synth.images, generator_train.images, test_all.images, cfg.copy_ratio, real=test_ref.images)
    closest = mem.closest(cfg.closest_pairs)
    mem_part = {**mem.summary(), "reference": generator_train.describe(), "space": "pixels (RMS, [0, 1] units)",
                "closest_pairs": [{"synthetic": synth.keys[i] if synth.keys else int(i),
                                   "train": generator_train.keys[mem.train_index[i]] if generator_train.keys
                                   else int(mem.train_index[i]),
                                   "d_train": float(mem.d_train[i]), "d_test": float(mem.d_test[i])}
                                  for i in closest]}
    lap("memorisation")

    usefulness: dict[str, Any] = {}
    if not cfg.cas:
        usefulness["cas"] = {"skipped": "eval.cas=false"}
    else:
        try:
            usefulness["cas"] = classification_accuracy_score(synth, train_all, test_all, num_classes, protocol)
        except UsageError as e:
            usefulness["cas"] = {"skipped": f"{e}"}
    lap("cas")

    k_url = k_set
    real_models: dict[int, SmallCNN] = {}  # the reported seeds' real-only classifiers (the agree filter's too)
    k_data: ImageSet | None = None
    if k_url is None and isinstance((generator_train.provenance or {}).get("per_class"), dict):
        k_url = generator_train.url
    if k_url is None:
        usefulness["augmentation"] = {
            "skipped": f"the generator was trained on {generator_train.url} ({len(generator_train)} images), not on a "
                       "K-per-class subset; augmentation gain needs a generator trained only on the K real samples "
                       "per class that the classifier gets (gensynth shard shards:TRAIN OUT --per-class K; "
                       "bench/quality.py does it all)"}
    else:
        k_data = (generator_train if k_url == generator_train.url
                  else load_image_set(k_url, desc="read the K set", resize=fit))
        check_generator_saw_only(synth_all, k_data)  # refuses (exit 2) before any classifier is trained
        if per_class_count(k_data.labels) is None:
            log.warning("%s does not hold the same number of samples in every class", k_url)
        chosen, usefulness["recommended_mix"] = recommend(k_data, synth_all, train_all, num_classes, protocol, cfg)
        lap("recommended_mix")
        usefulness["augmentation"] = augmentation_gain(k_data, synth_all, test_all, num_classes, chosen,
                                                       check_provenance=False, real_models=real_models)
    lap("augmentation")

    reconstruction = _reconstruction(prov, test_all)
    lap("reconstruction")
    inception = _inception(synth.images, test_ref.images, floor_ref.images, cfg) if cfg.inception else None
    if inception is not None:
        lap("inception")

    mix = usefulness.get("recommended_mix")
    metrics = {
        "format": "gensynth-eval/1",
        "verdict": verdict(usefulness["augmentation"], mem_part, mix, usefulness.get("cas")),
        "synthetic": {"url": synthetic, "samples": len(synth_all), "manifest_sha256": synth_all.manifest_sha256,
                      "family": prov.get("family"), "export": prov.get("export"),
                      "training_data": prov.get("training_data"),
                      "generation_seed": prov.get("seed"), "options": prov.get("options")},
        "protocol": {
            "evaluated_samples": n, "class_histogram": {str(k): v for k, v in hist.items()}, "seed": cfg.seed,
            "real_reference": f"{n} images of {real_test} (same class histogram)",
            "floor": f"{n} images of {train} (same class histogram) vs the same real reference",
            "extractor": extractor.describe(),
            "kid": {"subset_size": cfg.kid_subset, "subsets": cfg.kid_subsets, "kernel": "(x.y/d + 1)^3"},
            "precision_recall": {"k": cfg.pr_k, "space": "extractor features"},
            "memorisation": {"space": "pixels", "distance": "RMS difference in [0, 1] units",
                             "rule": f"d_train < {cfg.copy_ratio:.3g} x median nearest-training distance of the {n} "
                                     "real test images of the reference", "reference": generator_train.url},
            "classifier": protocol.to_dict(),
            "soft_labels": None if synth_all.soft is None else {
                "used_by": "augmentation gain: each synthetic sample's loss is the cross-entropy against its soft "
                           "label (soft.npy, the teacher's probabilities); real samples and CAS use hard labels",
                "teacher": (prov.get("relabel") or {}).get("teacher")},
            "baseline": f"every usefulness classifier's real training images get the classic augmentation "
                        f"{protocol.augment.spec} (eval.real_augment); synthetic ones "
                        f"{'too' if protocol.augment_synthetic else 'not'} (eval.augment_synthetic)",
            "gensynth_version": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        },
        "extractor": {"test_accuracy": extractor.test_accuracy, "folder": str(extractor.folder)},
        "fidelity": fid_part, "memorisation": mem_part, "usefulness": usefulness,
        "reconstruction": reconstruction, "inception": inception, "seconds": timings,
    }
    update_card(synthetic, metrics)
    if report:
        folder = Path(report)
        folder.mkdir(parents=True, exist_ok=True)
        if mix is not None:
            write_recommendation(folder, metrics, synth_all, real_models.get(protocol.seed))
        storage.write_bytes(str(folder / "metrics.json"), (json.dumps(metrics, indent=1) + "\n").encode())
        from gensynth.evaluate.report import write_report

        write_report(folder / "report.html", metrics, synth=synth, real=test_ref, generator_train=generator_train,
                     memorised=mem, classes=extractor.config.get("classes"))
    return metrics


def quality_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures a synthetic set's dataset card carries: those measured, each rounded for people."""
    def _num(x: Any, digits: int) -> float:  # plain floats: the card's YAML takes no numpy scalars
        return round(float(x), digits)

    f, m, u = metrics["fidelity"], metrics["memorisation"], metrics["usefulness"]
    cas, aug = u.get("cas") or {}, u.get("augmentation") or {}
    figures: dict[str, Any] = {"fid": _num(f["fid"], 3), "fid_floor": _num(f["fid_floor"], 3),
                               "precision": _num(f["precision"], 4), "recall": _num(f["recall"], 4),
                               "near_copy_fraction": _num(m["near_copy_fraction"], 5)}
    if "cas" in cas:
        figures |= {"cas": _num(cas["cas"], 4), "cas_real_accuracy": _num(cas["real_accuracy"], 4),
                    "cas_ratio": _num(cas["ratio"], 4)}
    if "gain" in aug:
        figures |= {"augmentation_gain": _num(aug["gain"]["mean"], 4),
                    "augmentation_gain_std": _num(aug["gain"]["std"], 4)}
        if aug.get("k") is not None:  # the K of a K-per-class set; none when --k-set is a set of its own
            figures["augmentation_k"] = int(aug["k"])
    return figures | {"evaluated_samples": metrics["protocol"]["evaluated_samples"],
                      "manifest_sha256": metrics["synthetic"]["manifest_sha256"], "gensynth_version": __version__}


def update_card(synthetic: str, metrics: dict[str, Any]) -> None:
    """Put the figures into the evaluated set's README.md card, if the set is still the one evaluated; a set
    that cannot be written (read-only, someone else's bucket) keeps its card, with a warning."""
    url = manifest_url(synthetic)
    try:
        if manifest_sha256(url) != metrics["synthetic"]["manifest_sha256"]:
            log.warning("%s changed while it was evaluated: its dataset card keeps no figures", synthetic)
            return
        write_card(storage.parent(url), read_manifest(url), quality_figures(metrics))
    except GensynthError as e:
        log.warning("could not update the dataset card of %s: %s", synthetic, e)


def _reconstruction(prov: dict[str, Any], test: ImageSet, batch_size: int = 500) -> dict[str, Any]:
    """gensynth.reconstruction's figures of the generator's reconstructions of the real test images, for
    families whose sampler reconstructs (Sampler.reconstruct)."""
    export = (prov.get("export") or {}).get("path")
    if not export or not Path(export).exists():
        return {"skipped": "the generator's export is not at hand (provenance.export.path)"}
    from gensynth.families import load_sampler
    from gensynth.reconstruction import reconstruction_figures

    try:
        sampler = load_sampler(export)
    except UsageError as e:
        return {"skipped": f"cannot load the generator's export: {e}"}
    if sampler.config.get("weights_sha256") != (prov.get("export") or {}).get("weights_sha256"):
        return {"skipped": f"{export} now holds other weights than the ones that generated this set"}
    images, codes = [], []
    try:
        for i in range(0, len(test), batch_size):
            r = sampler.reconstruct(test.images[i:i + batch_size], test.labels[i:i + batch_size])
            images.append(r.images)
            if r.codes is not None:
                codes.append(r.codes)
    except UsageError as e:  # NoReconstruction: the family does not (or not here); or labels it cannot take
        return {"skipped": str(e)}
    return reconstruction_figures(test.images, torch.cat(images), torch.cat(codes) if codes else None,
                                  sampler.codebook_size)


def _inception(synth: torch.Tensor, real: torch.Tensor, floor: torch.Tensor, cfg: EvalConfig) -> dict[str, Any]:
    from gensynth.evaluate.inception import InceptionFeatures

    features = InceptionFeatures()
    log.info("Inception-v3 features of %d images (slow on CPU: a few images/s)", len(synth) + len(real) + len(floor))
    s, r, f = features(synth), features(real), features(floor)
    kid_mean, _ = fidelity.kid(s, r, cfg.kid_subset, cfg.kid_subsets, cfg.seed)
    kid_floor, _ = fidelity.kid(f, r, cfg.kid_subset, cfg.kid_subsets, cfg.seed)
    return {"file": str(features.path), "fid": fidelity.fid(s, r), "fid_floor": fidelity.fid(f, r),
            "kid_x1000": 1000 * kid_mean, "kid_floor_x1000": 1000 * kid_floor, "images": len(synth)}


def summary_lines(metrics: dict[str, Any], report: str | None = None) -> list[str]:
    """The short summary `gensynth eval` prints."""
    f, m, u = metrics["fidelity"], metrics["memorisation"], metrics["usefulness"]
    p = metrics["protocol"]
    v = metrics.get("verdict") or {}
    lines = [*([v["line"], v["advice"]] if v else []),
             f"{metrics['synthetic']['url']}: {p['evaluated_samples']} samples evaluated; feature extractor "
             f"{100 * metrics['extractor']['test_accuracy']:.2f}% real test accuracy",
             f"FID {f['fid']:.2f} (real-vs-real floor {f['fid_floor']:.2f})   KID x1000 {f['kid_x1000']:.2f} "
             f"(floor {f['kid_floor_x1000']:.2f})",
             f"precision {f['precision']:.3f} recall {f['recall']:.3f} (floor {f['precision_floor']:.3f} / "
             f"{f['recall_floor']:.3f})   class consistency {100 * f['class_consistency']:.1f}% "
             f"(real test {100 * f['real_test_agreement']:.1f}%)",
             f"near-copies {100 * m['near_copy_fraction']:.2f}% (real floor {100 * m['real_floor_fraction']:.2f}%)"]
    cas = u.get("cas", {})
    if "cas" in cas:
        lines.append(f"CAS {100 * cas['cas']:.2f}% vs {100 * cas['real_accuracy']:.2f}% on as many real samples "
                     f"(ratio {cas['ratio']:.3f})")
    else:
        lines.append(f"CAS skipped: {cas.get('skipped')}")
    aug, mix = u.get("augmentation", {}), u.get("recommended_mix")
    if mix:
        lines.append(f"mix: {100 * mix['synthetic_fraction']:.0f}% synthetic per batch, weight "
                     f"{mix['synthetic_weight']:g}, filter {mix['filter']}, chosen on {mix['chosen_on']}")
    if "gain" in aug:
        spec = aug.get("protocol", {}).get("augment", {}).get("spec", "none")
        lines.append(f"augmentation K={aug['k']}: real only (augmented: {spec}) {100 * aug['real_only']['mean']:.2f}%, "
                     f"real + synthetic "
                     f"{100 * aug['real_plus_synthetic']['mean']:.2f}%, gain {100 * aug['gain']['mean']:+.2f} "
                     f"+- {100 * aug['gain']['std']:.2f} points ({len(aug['gain']['runs'])} seeds"
                     + (", synthetic soft labels)" if aug.get("soft_labels") else ")"))
    else:
        lines.append(f"augmentation gain skipped: {aug.get('skipped')}")
    rec = metrics.get("reconstruction") or {}
    if "psnr" in rec:
        lines.append(f"reconstruction: MSE {rec['mse_01']:.5f} (pixels in [0, 1]), PSNR {rec['psnr']:.2f} dB, "
                     f"SSIM {rec['ssim']:.4f}"
                     + (f", codebook used {100 * rec['codebook_used_fraction']:.1f}%" if "codebook_used_fraction"
                        in rec else ""))
    if report:
        lines.append(f"report: {Path(report) / 'report.html'} (metrics: {Path(report) / 'metrics.json'})")
    return lines
