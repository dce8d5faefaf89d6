"""`gensynth demo`: the main job end to end on the embedded default, Fashion-MNIST from Debian.

Ingest train and test into shards and verify them; stream one exact epoch and check that every
sample arrived once; train the generator (one config, or stages: a VQ-VAE, then the prior over its codes)
and write its sample grid (one row per class); generate a balanced synthetic set from its export into shards
with a manifest, and print how another team reads it; evaluate it (gensynth eval: metrics.json and
report.html in reports/<synthetic set name>; the first run trains and caches the feature extractor, a few
minutes).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from gensynth import storage
from gensynth.data.ingest import ingest, split_folder
from gensynth.data.manifest import manifest_url, read_manifest, verify_shards
from gensynth.data.sources import open_source
from gensynth.data.stream import ShardLoader
from gensynth.errors import UsageError
from gensynth.families import get_family, load_run_config
from gensynth.generate.job import generate, summary
from gensynth.inspection import inspect
from gensynth.runtime.layout import RunLayout
from gensynth.train.loop import train

if TYPE_CHECKING:
    from gensynth.config import Config

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


def stage_overrides(family: str, data: str, previous: RunLayout | None, has_test: bool) -> list[str]:
    """What the demo sets in a stage's config: its data, and for a prior the VQ-VAE stage before it."""
    if family == "prior":
        if previous is None:
            raise UsageError("a prior stage needs its VQ-VAE stage before it: gensynth demo --config "
                             "configs/vqvae_fashion.yaml --config configs/prior_fashion.yaml")
        return [f"prior.vqvae={previous.root}", f"prior.images={split_folder(data, 'train')}",
                f"data.train={data}-codes/{previous.root.name}"]
    test = [f"data.test={split_folder(data, 'test')}"] if has_test else []
    return [f"data.train={split_folder(data, 'train')}", *test]


def drop_stale_codes(cfg: Config) -> None:
    """The demo owns its code shards: a set extracted from an earlier VQ-VAE run of the demo is removed (the
    prior would refuse it) so that the codes of the VQ-VAE just trained are extracted instead."""
    from gensynth.families.prior.codes import codes_match, export_identity

    if storage.exists(manifest_url(cfg.data.train)) and not codes_match(read_manifest(cfg.data.train),
                                                                        export_identity(cfg.prior.vqvae)):
        if storage.is_remote(cfg.data.train):
            raise UsageError(f"{cfg.data.train} holds the codes of an earlier VQ-VAE run; remove it (the demo "
                             "removes only local ones)")
        log.info("%s: codes of an earlier VQ-VAE run, extracting them again", cfg.data.train)
        shutil.rmtree(cfg.data.train)


def stage_configs(configs: list[str | None], data: str, overrides: list[str] | tuple[str, ...]) -> Iterator[Config]:
    """Each stage's config in order, wired to the data and to the stage before. Run names: demo_<family>, or
    with run.name=X among the overrides X (one stage) or X_<family> (several)."""
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("run.name=")]
    overrides = [o for o in overrides if not o.startswith("run.name=")]
    previous: RunLayout | None = None
    for path in configs:
        cfg = load_run_config(path, overrides)
        family = cfg.model.family
        name = names[-1] if names and len(configs) == 1 else f"{names[-1] if names else 'demo'}_{family}"
        wired = stage_overrides(family, data, previous, bool(cfg.data.test))
        cfg = load_run_config(path, [*wired, f"run.name={name}", *overrides])
        previous = RunLayout.of(cfg)
        yield cfg


def run_demo(data: str = "data/fashion", source_dir: str = FASHION_MNIST_DIR, num_workers: int = 2,
             config: str | list[str] | None = None, overrides: list[str] | tuple[str, ...] = (),
             synth: str = "data/synth/demo", num_synthetic: int = 10000, report: str | None = None) -> int:
    configs = config if isinstance(config, list) else [config]
    print("== 1/5 ingest Fashion-MNIST into shards")
    ensure_fashion_shards(data, source_dir)
    for split in ("train", "test"):
        lines, _ = inspect(split_folder(data, split), verify=True)
        print("\n".join(lines))
    print(f"== 2/5 stream one exact epoch of {split_folder(data, 'train')} ({num_workers} workers)")
    samples, rate = stream_epoch(split_folder(data, "train"), num_workers=num_workers)
    print(f"streamed {samples} samples, each exactly once, at {rate:,.0f} samples/s")
    for i, cfg in enumerate(stage_configs(configs, data, overrides), start=1):
        run = RunLayout.of(cfg)
        stage = f" (stage {i} of {len(configs)})" if len(configs) > 1 else ""
        title = get_family(cfg.model.family).title or cfg.model.family
        print(f"== 3/5 train {title} for {cfg.train.steps} steps into {run.root}{stage} (resumes if interrupted)")
        if cfg.model.family == "prior":
            drop_stale_codes(cfg)
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
