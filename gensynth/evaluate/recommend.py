"""The recommended mix, chosen without the test set, and the verdict: does the synthetic set help?

The K-shot generator saw only the K set (usefulness.check_generator_saw_only), so real labelled images
outside it were seen by neither the generator nor any usefulness classifier. A validation split of them
(eval.validation_per_class per class, from the real training set less every image identical to a K-set
image; when the training set given is the K set itself, from the set its provenance says it was cut
from) scores every point of the grid eval.mix_fractions x eval.mix_weights x eval.mix_filters, each with
eval.mix_seeds classifier seeds of its own (eval.seed + 1000 ...). The highest mean validation accuracy
wins. Only then is the test set used: the chosen mix alone, with the reported seeds, so the seed noise
that helped it win on validation does not inflate its test figure. The search never receives the test
set. The validation labels are labels beyond K: they are counted and recorded. No such images: the
configured eval.synthetic_* values, and the record says why.

The verdict reads the paired test gain over seeds: helps when its mean exceeds twice its standard error
(std / sqrt(seeds)), hurts when it falls below minus that, neutral in between; near-copies well above
the real floor add "it copies".
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from gensynth import storage
from gensynth.config import EvalConfig
from gensynth.data.manifest import manifest_sha256, manifest_url
from gensynth.data.mix import RECOMMENDATION_FILE, RECOMMENDATION_FORMAT
from gensynth.data.writer import ShardSetWriter
from gensynth.errors import UsageError
from gensynth.evaluate.classifier import SmallCNN, embed
from gensynth.evaluate.sets import ImageSet, load_image_set, matching_subset
from gensynth.evaluate.usefulness import UsefulnessProtocol, augmentation_gain

log = logging.getLogger("gensynth")
SEARCH_SEED_OFFSET = 1000  # search seeds start here above eval.seed: never a reported seed
COPIES_FLOOR = 0.01  # "it copies" needs more than this share of near-copies, and twice the real floor


def image_digests(images: torch.Tensor) -> list[bytes]:
    """One digest per image (its raw pixels): equal digests, identical images."""
    flat = images.reshape(len(images), -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def _readable(url: str) -> bool:
    try:
        return storage.exists(manifest_url(url))
    except Exception:  # an unreachable remote: treated as absent, and said so
        return False


def unseen_real(k_set: ImageSet, train: ImageSet) -> tuple[ImageSet | None, str]:
    """(real labelled images the K-shot generator never saw, where from), or (None, why there are none)."""
    source = train
    if train.manifest_sha256 == k_set.manifest_sha256:
        origin = str(k_set.provenance.get("source", ""))
        if not origin.startswith("shards:"):
            return None, (f"the real training set given is the K set itself ({k_set.url}) and its provenance names "
                          "no shard set it was cut from; pass the full real training set with --train")
        url = origin.removeprefix("shards:")
        if not _readable(url):
            return None, f"the K set was cut from {url}, which is not readable here; pass it with --train"
        source = load_image_set(url, desc="read the set the K set was cut from")
        if source.manifest_sha256 != k_set.provenance.get("manifest_sha256"):
            return None, f"{url} is not the set the K set was cut from any more (its manifest sha256 changed)"
    seen = set(image_digests(k_set.images))
    keep = [i for i, d in enumerate(image_digests(source.images)) if d not in seen and int(source.labels[i]) >= 0]
    return source.select(keep), (f"{source.url} less the {len(source) - len(keep)} images identical to a K-set "
                                 "image or unlabelled")


def validation_split(unseen: ImageSet, classes: list[int], per_class: int, seed: int) -> tuple[ImageSet | None, str]:
    """Up to `per_class` images of every class of the K set, chosen at random (seeded); None if a class has none."""
    available = {c: int((unseen.labels == c).sum()) for c in classes}
    missing = [c for c, n in available.items() if n == 0]
    if missing:
        return None, f"no unseen real image of class {', '.join(map(str, missing))} to validate on"
    hist = {c: min(per_class, n) for c, n in available.items()}
    return unseen.select(matching_subset(unseen.labels, hist, seed, "unseen real images")), ""


def grid(cfg: EvalConfig) -> list[dict[str, Any]]:
    filters = [f.strip() for f in cfg.mix_filters.split(",") if f.strip()]
    return [{"synthetic_fraction": f, "synthetic_weight": w, "filter": flt} for flt in dict.fromkeys(filters)
            for f in dict.fromkeys(cfg.mix_fractions) for w in dict.fromkeys(cfg.mix_weights)]


def search(k_set: ImageSet, synthetic: ImageSet, validation: ImageSet, num_classes: int,
           protocol: UsefulnessProtocol, points: list[dict[str, Any]], seeds: int) -> dict[str, Any]:
    """Validation accuracy of every grid point (mean over `seeds` search seeds); the best one is "chosen"."""
    base = replace(protocol, seed=protocol.seed + SEARCH_SEED_OFFSET, seeds=seeds)
    real_models: dict[int, SmallCNN] = {}  # the real-only classifiers do not depend on the mix: trained once
    rows, real_only = [], None
    for i, point in enumerate(points):
        log.info("recommended mix: grid point %d/%d %s on %d validation images", i + 1, len(points), point,
                 len(validation))
        mix = replace(base, synthetic_fraction=point["synthetic_fraction"],
                      synthetic_weight=point["synthetic_weight"], synthetic_filter=point["filter"])
        try:
            out = augmentation_gain(k_set, synthetic, validation, num_classes, mix, check_provenance=False,
                                    real_models=real_models)
        except UsageError as e:  # a share that leaves no synthetic sample in a batch, or agree keeps none
            rows.append({**point, "failed": str(e)})
            continue
        real_only = out["real_only"]
        rows.append({**point, "validation_accuracy": out["real_plus_synthetic"], "validation_gain": out["gain"],
                     "synthetic_kept": out["synthetic_kept"]})
    ok = [r for r in rows if "failed" not in r]
    chosen = max(ok, key=lambda r: r["validation_accuracy"]["mean"]) if ok else None  # ties: the first
    return {"grid": rows, "real_only_validation_accuracy": real_only,
            "seeds": [base.seed + i for i in range(seeds)], "chosen": chosen}


def recommend(k_set: ImageSet, synthetic: ImageSet, train: ImageSet, num_classes: int, protocol: UsefulnessProtocol,
              cfg: EvalConfig) -> tuple[UsefulnessProtocol, dict[str, Any]]:
    """The protocol with the recommended mix, and its record for metrics.json. Never sees the test set."""
    configured = {"synthetic_fraction": protocol.synthetic_fraction, "synthetic_weight": protocol.synthetic_weight,
                  "filter": protocol.synthetic_filter}

    def fallback(why: str) -> tuple[UsefulnessProtocol, dict[str, Any]]:
        log.warning("recommended mix: %s; using the configured values %s", why, configured)
        return protocol, {**configured, "chosen_on": f"the configured values (eval.synthetic_*): {why}",
                          "searched": False, "labels": {"k_set": len(k_set), "validation": 0, "total": len(k_set)}}

    if not cfg.recommend_mix:
        return fallback("eval.recommend_mix=false")
    unseen, origin = unseen_real(k_set, train)
    if unseen is None:
        return fallback(origin)
    validation, why = validation_split(unseen, sorted(k_set.histogram()), cfg.validation_per_class, cfg.seed + 3)
    if validation is None:
        return fallback(why)
    result = search(k_set, synthetic, validation, num_classes, protocol, grid(cfg), cfg.mix_seeds)
    if result["chosen"] is None:
        return fallback("no grid point could be trained: " + "; ".join(r["failed"] for r in result["grid"]))
    chosen = {k: result["chosen"][k] for k in configured}
    n, hist = len(validation), validation.histogram()
    low, high = min(hist.values()), max(hist.values())
    per = f"{low} per class" if low == high else f"{low} to {high} per class"
    record = {**chosen, "chosen_on": f"validation split of {n} real labels ({per}) outside the K set, from "
                                     f"{unseen.url}",
              "searched": True, "labels": {"k_set": len(k_set), "validation": n, "total": len(k_set) + n},
              "validation": {"drawn_from": origin, "url": unseen.url, "manifest_sha256": unseen.manifest_sha256,
                             "samples": n, "per_class": {str(c): v for c, v in hist.items()}, "seed": cfg.seed + 3},
              "search": result}
    log.info("recommended mix: %s (validation accuracy %.2f%%, real only %.2f%%)", chosen,
             100 * result["chosen"]["validation_accuracy"]["mean"],
             100 * result["real_only_validation_accuracy"]["mean"])
    return replace(protocol, synthetic_fraction=chosen["synthetic_fraction"],
                   synthetic_weight=chosen["synthetic_weight"], synthetic_filter=chosen["filter"]), record


def agreeing(model: SmallCNN, synthetic: ImageSet) -> ImageSet:
    """The synthetic samples that `model` (a real-only classifier) assigns to their own label."""
    _, logits = embed(model, synthetic.images)
    return synthetic.select(torch.nonzero(logits.argmax(1) == synthetic.labels).flatten())


def _copies(memorisation: dict[str, Any] | None) -> str:
    """Whether the model copies, said either way when it was measured (a team publishing the set must know)."""
    if not memorisation or "near_copy_fraction" not in memorisation:
        return ""
    near, floor = memorisation["near_copy_fraction"], memorisation["real_floor_fraction"]
    if near <= COPIES_FLOOR or near <= 2 * floor:
        return (f" It does not copy: {100 * near:.2f}% of its samples are near-copies of the generator's training "
                f"images (real floor {100 * floor:.2f}%).")
    return (f" It copies: {100 * near:.1f}% of its samples are near-copies of the generator's training images "
            f"(real floor {100 * floor:.1f}%), so part of any gain may be those images replayed.")


def _alone(cas: dict[str, Any] | None) -> str:
    """What the set is worth trained on alone (CAS), when that was measured."""
    if not cas or "ratio" not in cas:
        return ""
    return (f" Trained on alone it carries {cas['ratio']:.2f} of real data's value: {100 * cas['cas']:.1f}% test "
            f"accuracy against {100 * cas['real_accuracy']:.1f}% for as many real samples (CAS).")


def verdict(augmentation: dict[str, Any], memorisation: dict[str, Any] | None = None,
            mix: dict[str, Any] | None = None, cas: dict[str, Any] | None = None) -> dict[str, Any]:
    """Helps / neutral / hurts / unknown from the paired test gain over seeds: one line saying so (with what
    the set is worth alone, when CAS was measured), and advice (with whether the model copies, when measured)."""
    copies = _copies(memorisation)
    rule = "helps: mean paired gain > 2 x its standard error over seeds; hurts: < -2 x; else neutral"
    if "gain" not in augmentation:
        why = str(augmentation.get("skipped", "not run"))
        return {"verdict": "unknown", "line": "UNKNOWN as augmentation: the augmentation gain was not measured, so "
                "nothing says whether mixing the set into real data helps." + _alone(cas),
                "advice": why[0].upper() + why[1:] + "." + copies, "rule": rule}
    gain, k, mix = augmentation["gain"], augmentation["k"], mix or {}
    n = len(gain["runs"])
    mean, se = gain["mean"], gain["std"] / n ** 0.5
    base = augmentation.get("protocol", {}).get("augment", {}).get("spec", "none")
    at = ""
    if mix:
        at = (f" at the {'recommended' if mix.get('searched') else 'configured'} mix "
              f"({100 * mix['synthetic_fraction']:.0f}% synthetic per batch, weight {mix['synthetic_weight']:g}, "
              f"filter {mix['filter']})")
    figures = (f"real + synthetic vs real only (classic augmentation: {base}): {100 * mean:+.2f} +- "
               f"{100 * gain['std']:.2f} points over {n} seed{'s' * (n != 1)} at K={k}{at}")
    if n < 2:
        kind, advice = "unknown", "One seed gives no spread to judge the gain by: rerun with eval.seeds=3 or more."
    elif mean > 0 and mean > 2 * se:
        kind = "helps"
        advice = ("Use it at the recommended mix (recommended_mix.json; MixLoader.from_recommendation reads it)."
                  if mix.get("searched") else "Use it at this mix (recommended_mix.json; MixLoader.from_recommendation"
                  " reads it).")
    elif mean < 0 and -mean > 2 * se:
        kind, advice = "hurts", "Don't use it for augmentation."
    else:
        kind, advice = "neutral", "No measurable gain over the augmented real data: not worth mixing in."
    return {"verdict": kind, "line": f"{kind.upper()}: {figures}." + _alone(cas), "advice": advice + copies,
            "rule": rule}


def _local_or_url(url: str) -> str:
    return url if storage.is_remote(url) else str(Path(url).resolve())


def write_recommendation(folder: Path, metrics: dict[str, Any], synthetic: ImageSet,
                         real_model: SmallCNN | None) -> Path:
    """recommended_mix.json in `folder` (data.mix.read_recommendation reads it). With the agree filter, the
    samples the first reported seed's real-only classifier agrees with are written beside it as a shard set
    (MixLoader streams whole sets), and the file names that set."""
    mix = metrics["usefulness"]["recommended_mix"]
    aug = metrics["usefulness"]["augmentation"]
    target: dict[str, Any] = {"url": _local_or_url(synthetic.url), "manifest_sha256": synthetic.manifest_sha256}
    if mix["filter"] == "agree" and real_model is not None:
        kept = agreeing(real_model, synthetic)
        name = "recommended_synthetic"
        seed = aug["protocol"]["seed"]
        filtered = {"rule": "agree: kept where a classifier trained on the K set alone gives the sample's label",
                    "classifier": f"the real-only usefulness classifier of seed {seed}", "kept": len(kept),
                    "of": len(synthetic), "from": {"url": synthetic.url, "manifest_sha256": synthetic.manifest_sha256}}
        with ShardSetWriter(str(folder / name), "synth", shard_size=5000) as w:
            for key, image, label in zip(kept.keys, kept.images, kept.labels.tolist()):
                w.add(key, image.permute(1, 2, 0).numpy(), label)
            w.finish(classes=synthetic.classes, provenance={**synthetic.provenance, "filtered": filtered})
        target = {"file": name, "manifest_sha256": manifest_sha256(str(folder / name)), "kept": len(kept),
                  "filtered_from": target}
    v = metrics["verdict"]
    record = {"format": RECOMMENDATION_FORMAT,
              "recommended_mix": {k: mix[k] for k in ("synthetic_fraction", "synthetic_weight", "filter", "chosen_on",
                                                     "searched", "labels")},
              "synthetic": target, "evaluated": {"url": synthetic.url, "manifest_sha256": synthetic.manifest_sha256},
              "k": aug.get("k"), "k_set": aug.get("k_set"),
              "real_augment": aug.get("protocol", {}).get("augment"),
              "verdict": v["verdict"], "line": v["line"], "advice": v["advice"],
              "test_gain": aug.get("gain"), "metrics": "metrics.json"}
    path = folder / RECOMMENDATION_FILE
    storage.write_bytes(str(path), (json.dumps(record, indent=1) + "\n").encode())
    return path
