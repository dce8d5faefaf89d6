"""WebDataset tars that gensynth did not write (plain webdataset.ShardWriter): indexed, streamed, trained on,
generated from and evaluated, as the README says."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gensynth.cli import main
from gensynth.data.codec import LabelSpec, decode_with_pillow, resize_image
from gensynth.data.index import index_shards
from gensynth.data.manifest import read_manifest, verify_shards
from gensynth.data.stream import ShardLoader
from gensynth.errors import UsageError
from tests.helpers import gensynth, run_dir, tiny_config

NAMES = ["circle", "square", "stripe"]


def picture(i: int, size: tuple[int, int]) -> np.ndarray:
    """An RGB image whose class (i % 3) shows in its shape, so a classifier can learn it."""
    h, w = size
    rng = np.random.default_rng(i)
    image = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    c = i % 3
    mask = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2) if c == 0 else \
        (abs(yy - h / 2) < h / 4) & (abs(xx - w / 2) < w / 4) if c == 1 else (xx // 3) % 2 == 0
    image[mask] = (200, 120 + 40 * c, 60)
    return image


def encoded(image: np.ndarray, fmt: str, lossless: bool = False) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, fmt, **({"lossless": True} if lossless else {"quality": 95}))
    return out.getvalue()


def write_foreign(folder: Path, n: int = 60, label_in: str = "cls", sizes=((16, 16), (20, 24))) -> str:
    """Plain webdataset shards: JPEG and WebP, two sizes, labels under cls or json.label (class names)."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "mine-%06d.tar"), maxcount=25, verbose=0) as sink:
        for i in range(n):
            sample = {"__key__": f"img{i:05d}"}
            image = picture(i, sizes[i % len(sizes)])
            sample["webp" if i % 2 else "jpg"] = encoded(image, "WEBP" if i % 2 else "JPEG")
            if label_in == "cls":
                sample["cls"] = str(i % 3).encode()
            else:
                sample["json"] = json.dumps({"label": NAMES[i % 3], "id": i}).encode()
            sink.write(sample)
    return str(folder / "mine-{000000..000002}.tar")


def test_index_writes_a_manifest_for_tars_it_did_not_write_and_they_stream(tmp_path, capsys):
    pattern = write_foreign(tmp_path / "wds")
    shards_before = {p.name: p.read_bytes() for p in (tmp_path / "wds").glob("*.tar")}
    assert main(["-q", "index", pattern]) == 0
    assert "indexed 60 samples in 3 shards, 3 classes" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (tmp_path / "wds").glob("*.tar")} == shards_before  # not rewritten
    manifest = read_manifest(str(tmp_path / "wds"))
    assert verify_shards(str(tmp_path / "wds"), manifest) == []
    assert [s.samples for s in manifest.shards] == [25, 25, 10]
    image = manifest.schema["image"]
    assert image["sizes"] == {"16x16": 30, "20x24": 30} and image["channels"] == 3
    assert image["fields"] == {"jpg": 30, "webp": 30}
    assert manifest.class_histogram == {"0": 20, "1": 20, "2": 20} and manifest.provenance["kind"] == "indexed"
    with pytest.raises(UsageError, match="images have 2 sizes .* data.resize=crop or pad"):
        ShardLoader(str(tmp_path / "wds"), batch_size=8)
    loader = ShardLoader(str(tmp_path / "wds"), batch_size=16, resize=(16, "crop"), shuffle_buffer=0)
    batches = list(loader)
    assert sum(len(b["label"]) for b in batches) == 60 and loader.corrupt == 0
    assert all(b["image"].shape[1:] == (3, 16, 16) for b in batches)
    keys = [k for b in batches for k in b["key"]]
    labels = [int(v) for b in batches for v in b["label"]]
    assert all(int(k[3:]) % 3 == label for k, label in zip(keys, labels))


def test_labels_inside_json_as_class_names_are_indexed_and_read(tmp_path):
    pattern = write_foreign(tmp_path / "wds", label_in="json", sizes=((16, 16),))
    manifest, _ = index_shards(pattern, label_key="json.label", class_names=NAMES)
    assert manifest.classes == NAMES and manifest.schema["label"] == {"field": "json", "path": ["label"],
                                                                      "names": True}
    batch = next(iter(ShardLoader(str(tmp_path / "wds"), batch_size=60, shuffle_buffer=0)))
    for key, label in zip(batch["key"], batch["label"].tolist()):
        assert label == int(key[3:]) % 3


def test_a_label_under_another_key_is_said_not_silently_minus_one(tmp_path, caplog):
    pattern = write_foreign(tmp_path / "wds", label_in="json", sizes=((16, 16),))
    manifest, _ = index_shards(pattern)  # labels are in json.label, the default looks in cls
    assert manifest.class_histogram == {} and manifest.provenance["unlabelled"] == 60
    assert "no sample has a label at cls (fields seen: jpg, json, webp)" in caplog.text
    assert "--label-key json.label" in caplog.text


def test_train_generate_and_eval_on_an_indexed_set(tmp_path):
    pattern = write_foreign(tmp_path / "wds", n=90)
    index_shards(pattern)
    data = str(tmp_path / "wds")
    config = tiny_config(tmp_path, data, data__resize="crop", data__image_size=16, model__resolution=16,
                         train__steps=20)
    done = gensynth("train", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "synth"
    assert gensynth("generate", str(run_dir(config)), str(out), "--num", "60").returncode == 0
    synth = read_manifest(str(out))
    assert synth.image_shape == (16, 16, 3) and synth.num_samples == 60
    test = write_foreign(tmp_path / "wds-test", n=60)
    index_shards(test)
    test = str(tmp_path / "wds-test")
    report = tmp_path / "report"
    evaluated = gensynth("eval", str(out), "--real", test, "--train", data, "--report", str(report),
                         "eval.resize=crop", "eval.num=60", "eval.classifier_steps=20", "eval.extractor_epochs=1",
                         f"eval.cache={tmp_path / 'cache'}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["fidelity"]["fid"] >= 0 and 0 <= metrics["fidelity"]["class_consistency"] <= 1
    unresized = gensynth("eval", str(out), "--real", test, "--train", data, "--report", str(tmp_path / "r2"))
    assert unresized.returncode == 2 and "eval.resize" in unresized.stderr
    assert "Traceback" not in unresized.stderr


def test_training_on_tars_without_a_manifest_names_the_index_command(tmp_path):
    pattern = write_foreign(tmp_path / "wds", sizes=((16, 16),))
    config = tiny_config(tmp_path, str(tmp_path / "wds"))
    done = gensynth("train", str(config))
    assert done.returncode == 2 and f"gensynth index '{tmp_path / 'wds'}'" in done.stderr
    by_pattern = gensynth("train", str(config), f"data.train={pattern}")
    assert by_pattern.returncode == 2 and f"gensynth index '{pattern}'" in by_pattern.stderr
    shard = gensynth("shard", f"shards:{pattern}", str(tmp_path / "out"))
    assert shard.returncode == 2 and "gensynth index" in shard.stderr


def test_gensynth_shard_resizes_an_indexed_set_of_two_sizes(tmp_path):
    pattern = write_foreign(tmp_path / "wds")
    index_shards(pattern)
    assert main(["-q", "shard", f"shards:{tmp_path / 'wds'}", str(tmp_path / "out"), "--resize", "pad",
                 "--image-size", "18"]) == 0
    manifest = read_manifest(str(tmp_path / "out" / "train"))
    assert manifest.image_shape == (18, 18, 3) and manifest.num_samples == 60
    assert Counter(manifest.class_histogram) == Counter({"0": 20, "1": 20, "2": 20})


def test_image_formats_and_resize_modes():
    image = picture(4, (12, 20))
    for fmt in ("PNG", "WEBP", "BMP", "TIFF", "PPM"):
        assert np.array_equal(decode_with_pillow(encoded(image, fmt, lossless=True)), image), fmt
    grey = Image.fromarray(np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000)  # 16-bit grey: scaled
    out = io.BytesIO()
    grey.save(out, "PNG")
    decoded = decode_with_pillow(out.getvalue())
    assert decoded.shape == (6, 8, 1) and decoded.max() == round(47000 * 255 / 65535)
    cropped, padded = resize_image(image, 10, "crop"), resize_image(image, 10, "pad")
    assert cropped.shape == padded.shape == (10, 10, 3)
    assert (padded[0] == 0).all() and (padded[-1] == 0).all() and padded[5].any()  # black bands above and below
    assert cropped[0].any() and cropped[-1].any()  # filled to the edge


def test_label_spec_reads_indices_names_and_json_paths():
    fields = {"cls": b"2", "json": json.dumps({"meta": {"class": "square"}, "n": 1}).encode()}
    assert LabelSpec("cls").read(fields, 3) == 2
    assert LabelSpec("json.meta.class", NAMES).read(fields, 3) == 1
    assert LabelSpec("json.n").read(fields, 3) == 1
    with pytest.raises(ValueError, match="not one of the set's 3 classes|is not"):
        LabelSpec("json.meta.class").read(fields, 3)  # a name, but no class list to look it up in


def test_the_loader_is_a_webdataset_pipeline_stage_and_takes_a_per_sample_transform(tmp_path):
    import webdataset as wds

    pattern = write_foreign(tmp_path / "wds", sizes=((16, 16),))
    index_shards(pattern)
    loader = ShardLoader(str(tmp_path / "wds"), batch_size=20, shuffle_buffer=0)
    pipeline = wds.DataPipeline(loader, wds.map(lambda batch: (batch["image"].float() / 255, batch["label"])))
    out = list(pipeline)
    assert len(out) == 3 and out[0][0].dtype == torch.float32 and out[0][0].shape == (20, 3, 16, 16)

    def flip(image: np.ndarray, label: int) -> np.ndarray:
        return image[:, ::-1].copy()

    plain = next(iter(ShardLoader(str(tmp_path / "wds"), batch_size=20, shuffle_buffer=0)))
    flipped = next(iter(ShardLoader(str(tmp_path / "wds"), batch_size=20, shuffle_buffer=0, transform=flip,
                                    num_workers=1)))
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
