"""`gensynth demo`: the main job end to end on the embedded default, Fashion-MNIST from Debian.

Ingest train and test into shards and verify them; stream one exact epoch and check that every
sample arrived once; train the class-conditional GAN for a few minutes and write its sample grid
(one row per class); generate a balanced synthetic set from its export into shards with a manifest, and
print how another team reads it; evaluate it (gensynth eval: metrics.json and report.html in
reports/<synthetic set name>; the first run trains and caches the feature extractor, a few minutes).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from gensynth import storage
from gensynth.data.ingest import ingest, split_folder
from gensynth.data.manifest import manifest_url, read_manifest, verify_shards
from gensynth.data.sources import open_source
from gensynth.data.stream import ShardLoader
from gensynth.errors import UsageError
from gensynth.families import load_run_config
from gensynth.generate.job import generate, summary
from gensynth.inspection import inspect
from gensynth.runtime.layout import RunLayout
from gensynth.train.loop import train

log = logging.getLogger("gensynth")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def ensure_fashion_shards(data: str, source_dir: str = FASHION_MNIST_DIR, shard_size: int = 5000) -> None:
    """Shard Fashion-MNIST train and test into `data`, unless complete, verified shard sets are there."""
    if not Path(source_dir).is_dir():
        raise UsageError(f"{source_dir} not found: install Debian's dataset-fashion-mnist "
                         "(apt-get install dataset-fashion-mnist; `make demo` does it when run as root)")
    for split in ("train", "test"):
        folder = split_folder(data, split)
        if storage.exists(manifest_url(folder)) and not verify_shards(folder, read_manifest(folder)):
            log.info("%s: complete and verified, reusing it", folder)
            continue
        source = open_source(f"idx:{source_dir}", split=split, class_names=FASHION_MNIST_CLASSES)
        ingest(source, data, split=split, shard_size=shard_size, overwrite=True)


def stream_epoch(folder: str, batch_size: int = 256, num_workers: int = 2) -> tuple[int, float]:
    """Read one exact epoch; return (samples, samples/s) after checking no key came twice or not at all."""
    loader = ShardLoader(folder, batch_size=batch_size, mode="exact", num_workers=num_workers)
    start = time.perf_counter()
    keys: set[str] = set()
    seen = 0
    for batch in loader:
        keys.update(batch["key"])
        seen += len(batch["key"])
    elapsed = time.perf_counter() - start
    if seen != len(keys) or seen != loader.num_samples:
        raise RuntimeError(f"exact epoch delivered {seen} samples ({len(keys)} distinct) of {loader.num_samples}")
    return seen, seen / elapsed


def run_demo(data: str = "data/fashion", source_dir: str = FASHION_MNIST_DIR, num_workers: int = 2,
             config: str | None = None, overrides: list[str] | tuple[str, ...] = (), synth: str = "data/synth/demo",
             num_synthetic: int = 10000, report: str | None = None) -> int:
    print("== 1/5 ingest Fashion-MNIST into shards")
    ensure_fashion_shards(data, source_dir)
    for split in ("train", "test"):
        lines, _ = inspect(split_folder(data, split), verify=True)
        print("\n".join(lines))
    print(f"== 2/5 stream one exact epoch of {split_folder(data, 'train')} ({num_workers} workers)")
    samples, rate = stream_epoch(split_folder(data, "train"), num_workers=num_workers)
    print(f"streamed {samples} samples, each exactly once, at {rate:,.0f} samples/s")
    cfg = load_run_config(config, [f"data.train={split_folder(data, 'train')}", "run.name=demo_gan", *overrides])
    run = RunLayout.of(cfg)
    print(f"== 3/5 train the class-conditional GAN for {cfg.train.steps} steps into {run.root} "
          "(resumes if interrupted)")
    code = train(cfg)
    if code != 0:
        return code
    grids = run.grids("samples")
    print(f"sample grid, one row per class ({', '.join(FASHION_MNIST_CLASSES)}): {grids[-1]}")
    print(f"export (safetensors + config.json): {run.export}")
    print(f"TensorBoard: tensorboard --logdir {run.tb}")
    print(f"== 4/5 generate {num_synthetic} synthetic samples, balanced over the classes, into {synth}")
    result = generate(str(run.root), synth, num=num_synthetic, seed=0, shard_size=min(5000, num_synthetic),
                      overwrite=True)
    print("\n".join(summary(result)))
    report = report or str(Path("reports") / Path(synth).name)
    print(f"== 5/5 evaluate the synthetic set against the real test set (FID, KID, precision/recall, class "
          f"consistency, near-copies, CAS) into {report}")
    from gensynth.evaluate.synthetic import evaluate_synthetic, summary_lines

    metrics = evaluate_synthetic(synth, split_folder(data, "test"), train=split_folder(data, "train"), report=report,
                                 cfg=cfg.eval)
    print("\n".join(summary_lines(metrics, report)))
    return 0
