"""Which batch-norm statistics should the GAN's EMA generator sample with? Measured on a trained run's checkpoints.

    python bench/gan_standing_stats.py runs/demo_gan --json bench/results/gan_standing_stats.json

(runs/demo_gan: after `gensynth demo --config configs/gan_fashion.yaml`.)

The generator EMA averages weights; its batch-norm statistics used to be copied from the raw generator, whose
weights they belong to. For each checkpoint (--steps, default every one the run kept), three generators
sample as many images as the real test set holds, with its class histogram, from the same noise: the raw
generator, the EMA with the raw generator's statistics (before), and the EMA with standing statistics
recomputed for its own weights (gensynth.families.gan.trainer.calibrated, what exports carry now). Each is
scored against the real test set in the evaluation's feature space: FID, precision / recall (k = 3) and
class consistency, as `gensynth eval` computes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402
from gensynth.evaluate.extractor import resolve_extractor, sibling_test_set  # noqa: E402
from gensynth.evaluate.fidelity import class_consistency, fid, precision_recall  # noqa: E402
from gensynth.evaluate.sets import load_image_set  # noqa: E402
from gensynth.families import load_run_config  # noqa: E402
from gensynth.families.gan.trainer import calibrated  # noqa: E402
from gensynth.imaging import to_uint8  # noqa: E402
from gensynth.models.dcgan import Generator  # noqa: E402
from gensynth.runtime.layout import RunLayout  # noqa: E402
from gensynth.train.checkpoint import read_part, verify_checkpoint  # noqa: E402

VARIANTS = ("raw generator", "EMA, raw generator's statistics (before)", "EMA, standing statistics (now)")


@torch.no_grad()
def draw(G: torch.nn.Module, labels: torch.Tensor, z_dim: int, size: tuple[int, int], seed: int,
         batch: int = 500) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(labels), z_dim, generator=gen)
    return torch.cat([to_uint8(G(z[i:i + batch], labels[i:i + batch]), *size) for i in range(0, len(labels), batch)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a GAN run directory (run.root/run.name) with its checkpoints")
    ap.add_argument("--steps", default="", help="checkpoint steps, comma-separated (default: every kept one)")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    run = RunLayout(args.run)
    cfg = load_run_config(run.config)
    if cfg.model.family != "gan":
        ap.error(f"{args.run} is a {cfg.model.family} run; this benchmark measures the GAN's EMA generator")
    checkpoints = sorted((run.root / "checkpoints").glob("step-*"))
    if args.steps:
        wanted = {int(s) for s in args.steps.split(",")}
        checkpoints = [c for c in checkpoints if int(c.name.split("-")[1]) in wanted]
    if not checkpoints:
        ap.error(f"{run.root / 'checkpoints'}: no checkpoint {'at steps ' + args.steps if args.steps else ''}")
    test_url = sibling_test_set(cfg.data.train)
    if not test_url:
        ap.error(f"{cfg.data.train} has no sibling 'test' shard set to score against")
    test = load_image_set(test_url, desc="read real test set")
    extractor = resolve_extractor(cfg.data.train, test_url)
    test_f, _ = extractor.embed(test.images)
    labels = test.labels
    size = tuple(test.images.shape[-2:])
    num_classes = int(extractor.config["num_classes"])
    rows = []
    # a run with gan.standing_batches=0 kept the raw statistics: measure what the default would have given it
    cfg.gan.standing_batches = cfg.gan.standing_batches or 50
    print(f"protocol: {len(labels)} samples per generator with the class histogram of {test_url}, the same noise "
          f"(seed 0) for all; standing statistics: {cfg.gan.standing_batches} forwards of {cfg.train.batch_size}; "
          f"features: the evaluation's extractor; machine {machine()}")
    for ckpt in checkpoints:
        verify_checkpoint(ckpt)
        step = int(ckpt.name.split("-")[1])
        arch = dict(z_dim=cfg.gan.z_dim, num_classes=num_classes, resolution=cfg.model.resolution,
                    channels=int(test.images.shape[1]), base_channels=cfg.gan.g_channels,
                    max_channels=cfg.gan.max_channels)
        raw, ema = Generator(**arch), Generator(**arch)
        raw.load_state_dict(load_file(str(ckpt / "model_0.safetensors")))
        ema.load_state_dict(read_part(ckpt, "custom_0")["model"])
        for name, G in zip(VARIANTS, (raw, ema, calibrated(ema, cfg, num_classes))):
            t = time.monotonic()
            f, predicted = extractor.embed(draw(G.eval(), labels, cfg.gan.z_dim, size, seed=0))
            precision, recall = precision_recall(test_f, f)
            row = {"step": step, "generator": name, "fid": round(fid(f, test_f), 2), "precision": round(precision, 4),
                   "recall": round(recall, 4), "class_consistency": round(class_consistency(predicted,
                                                                                           labels.numpy())[0], 4)}
            rows.append(row)
            print(f"step {step:6d}  {name:42s} FID {row['fid']:6.2f}  precision {precision:.3f}  recall {recall:.3f}  "
                  f"class consistency {row['class_consistency']:.3f}  ({time.monotonic() - t:.0f} s)", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"run": str(args.run), "config": str(run.config), "rows": rows,
                                               "machine": machine()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
