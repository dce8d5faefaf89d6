"""Why a synthetic set's recall is low: the k-NN radii of real and synthetic features, and coverage.

    python bench/coverage.py bench/results/quality/synth/gan_full [more sets] --json bench/results/coverage.json

Recall (Kynkaanniemi et al. 2019) counts the real test images that fall inside some synthetic sample's k-NN
ball, whose radius is the distance to that sample's k-th nearest SYNTHETIC neighbour; coverage (Naeem et al.
2020) counts the real images whose own k-NN ball (among real images) holds a synthetic sample. Samples packed
closer together than real images are (smaller radii) lose recall even where they lie on the data; coverage
does not use the synthetic radii. So: radii near the real ones with low coverage = samples off the data; small
radii = samples bunched into a small part of it. Features: the evaluation's extractor (cached, trained on first
use), k = 3 as in `gensynth eval`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402
from gensynth.evaluate import fidelity  # noqa: E402
from gensynth.evaluate.extractor import resolve_extractor  # noqa: E402
from gensynth.evaluate.sets import load_image_set  # noqa: E402


def coverage_report(real: torch.Tensor, real_labels: torch.Tensor, synth: torch.Tensor, synth_labels: torch.Tensor,
                    k: int = 3) -> dict:
    """Precision, recall, coverage and the radii behind them, for real and synthetic feature rows."""
    real_radii, synth_radii = fidelity.knn_radii(real, k), fidelity.knn_radii(synth, k)
    nearest_synth = torch.cat([fidelity.pairwise_distances(real[i:i + 2048], synth).min(1).values
                               for i in range(0, len(real), 2048)])
    # precision and recall as fidelity.precision_recall computes them, from the radii already at hand
    precision = fidelity.coverage_of(synth, real, real_radii)
    recall = fidelity.coverage_of(real, synth, synth_radii)
    classes = sorted(set(real_labels.tolist()))
    return {"precision": precision, "recall": recall, "coverage": float((nearest_synth <= real_radii).float().mean()),
            "median_radius_real": float(real_radii.median()), "median_radius_synthetic": float(synth_radii.median()),
            "median_real_to_nearest_synthetic": float(nearest_synth.median()),
            "median_radius_per_class": {str(c): {"real": float(real_radii[real_labels == c].median()),
                                                 "synthetic": float(synth_radii[synth_labels == c].median())}
                                        for c in classes if (synth_labels == c).any()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="+", help="synthetic shard sets")
    ap.add_argument("--real", default="data/fashion/test", help="real images the sets are compared with")
    ap.add_argument("--train", default="data/fashion/train", help="the extractor's training set")
    ap.add_argument("--k", type=int, default=3, help="neighbours (gensynth eval: 3)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    extractor = resolve_extractor(args.train, args.real)
    real = load_image_set(args.real)
    real_f = torch.from_numpy(extractor.embed(real.images)[0])
    results = {}
    print(f"protocol: features of the cached extractor ({100 * extractor.test_accuracy:.2f}% test accuracy), "
          f"k = {args.k}, real {args.real} ({len(real)} images)")
    for url in args.sets:
        synth = load_image_set(url)
        report = coverage_report(real_f, real.labels, torch.from_numpy(extractor.embed(synth.images)[0]),
                                 synth.labels, args.k)
        results[url] = report
        print(f"{url}: precision {report['precision']:.3f} recall {report['recall']:.3f} coverage "
              f"{report['coverage']:.3f}; median {args.k}-NN radius real {report['median_radius_real']:.2f}, "
              f"synthetic {report['median_radius_synthetic']:.2f}; median distance from a real image to the "
              f"nearest synthetic {report['median_real_to_nearest_synthetic']:.2f}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"protocol": {"real": args.real, "k": args.k,
                                                            "extractor_test_accuracy": extractor.test_accuracy},
                                               "machine": machine(), "sets": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
