"""`gensynth shard`: every source kind on tiny inputs, repeatable bytes, --overwrite, --shard-size, inspect,
and bad input: one clear line naming the file and the record, the right exit code, and nothing left behind
that looks complete (an existing set survives a failed --overwrite)."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gensynth.cli import main
from gensynth.data.ingest import ingest
from gensynth.data.manifest import read_manifest
from gensynth.data.sources import open_source
from gensynth.data.stream import ShardLoader
from gensynth.errors import InputDataError, UsageError

N = 10  # records in most inputs
CLASSES = 3


def pixels(n: int, h: int = 28, w: int = 28, c: int | None = None, seed: int = 0) -> np.ndarray:
    shape = (n, h, w) if c is None else (n, h, w, c)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def labels_for(n: int) -> np.ndarray:
    return (np.arange(n) * 7 % CLASSES).astype(np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def shard(args: list[str], capsys) -> tuple[int, list[str]]:
    """Run `gensynth -q shard ...`; (exit code, stderr lines)."""
    capsys.readouterr()
    code = main(["-q", "shard", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def read_back(folder: Path) -> dict[int, tuple[np.ndarray, int, dict]]:
    """source_index -> (image HxWxC, label, meta), read with the loader; every key exactly once."""
    out: dict[int, tuple[np.ndarray, int, dict]] = {}
    for batch in ShardLoader(str(folder), batch_size=7, shuffle_buffer=0):
        for image, label, key, meta in zip(batch["image"], batch["label"], batch["key"], batch["meta"]):
            assert meta["source_index"] not in out and key.endswith(f"-{meta['source_index']:08d}")
            out[meta["source_index"]] = (image.numpy().transpose(1, 2, 0), int(label), meta)
    return out


def assert_reads_as(folder: Path, images: np.ndarray, labels: np.ndarray | None) -> dict:
    got = read_back(folder)
    assert sorted(got) == list(range(len(images)))
    for i, (image, label, _) in got.items():
        assert np.array_equal(image, images[i].reshape(image.shape)), f"record {i}: pixels differ"
        assert label == (int(labels[i]) if labels is not None else -1)
    return got


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in files_under(folder)}


@pytest.fixture
def idx_pair(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    images, labels = pixels(N), labels_for(N)
    src = tmp_path / "idx"
    src.mkdir()
    return write_idx(src / "images.gz", images), write_idx(src / "labels.gz", labels), images, labels


# --------------------------------------------------------------------------------------- bad input


def test_truncated_idx_names_file_header_count_and_complete_records(tmp_path, capsys):
    images = pixels(5)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(images)[:-400])  # record 4 cut in the middle
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels_for(5))
    out = tmp_path / "out"
    code, err = shard([f"idx:{tmp_path}", str(out)], capsys)
    assert code == 1
    assert err == [f"gensynth shard: error: {path}: truncated: the header says 5 records of 784 bytes, "
                   "the file holds 4 complete records (record 4 is cut short)"]
    assert files_under(out) == []


def test_gzip_cut_short_is_reported_in_records(tmp_path, capsys):
    """A download cut short: the gzip stream ends early; still told in records, like the README says."""
    images = pixels(40, seed=1)
    data = gzip.compress(idx_bytes(images), mtime=0)
    path = tmp_path / "images.gz"
    path.write_bytes(data[:len(data) // 2])
    labels = write_idx(tmp_path / "labels.gz", labels_for(40))
    code, err = shard([f"idx:{path},{labels}", str(tmp_path / "out")], capsys)
    assert code == 1 and len(err) == 1
    assert re.fullmatch(rf"gensynth shard: error: {re.escape(str(path))}: truncated: the header says 40 records of "
                        r"784 bytes, the file holds (\d+) complete records \(record \1 is cut short; the gzip stream "
                        r"ends early\)", err[0]), err[0]
    assert files_under(tmp_path / "out") == []


def test_label_count_must_match_images(idx_pair, tmp_path, capsys):
    images_path, _, _, labels = idx_pair
    short = write_idx(tmp_path / "idx" / "short-labels", labels[:-1])
    code, err = shard([f"idx:{images_path},{short}", str(tmp_path / "out")], capsys)
    assert code == 1
    assert err == [f"gensynth shard: error: {images_path} holds {N} images but {short} holds {N - 1} labels: "
                   "they must match one to one"]
    assert files_under(tmp_path / "out") == []


def test_bad_idx_magic_and_swapped_files(idx_pair, tmp_path, capsys):
    images_path, labels_path, _, _ = idx_pair
    junk = tmp_path / "idx" / "junk"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    code, err = shard([f"idx:{junk},{labels_path}", str(tmp_path / "out")], capsys)
    assert code == 1
    assert err == [f"gensynth shard: error: {junk}: not an IDX file: it starts with 0x89504e47, an IDX file of "
                   "images N x rows x cols starts with 0x00000803"]
    code, err = shard([f"idx:{labels_path},{images_path}", str(tmp_path / "out")], capsys)
    assert code == 1
    assert err == [f"gensynth shard: error: {labels_path}: IDX holds 1-dimensional data, expected 3 (images N x "
                   "rows x cols); are the images and labels files swapped?"]
    assert files_under(tmp_path / "out") == []


def image_folder(root: Path, per_class: int = 3, size: tuple[int, int] = (6, 5)) -> tuple[Path, list[np.ndarray]]:
    """root/<class>/<n>.png for classes a, b, c (RGB); returns the images in source order (class, then name)."""
    images = []
    for k, name in enumerate(["a", "b", "c"]):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            image = pixels(1, *size, c=3, seed=10 * k + j)[0]
            Image.fromarray(image).save(root / name / f"{j:02d}.png")
            images.append(image)
    return root, images


def test_unreadable_image_names_the_file_and_record_and_leaves_nothing(tmp_path, capsys):
    root, _ = image_folder(tmp_path / "imgs")
    bad = root / "c" / "99.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    # --no-shuffle --shard-size 2: four shards are written before the bad record (the last) is reached
    code, err = shard([f"folder:{root}", str(out), "--no-shuffle", "--shard-size", "2"], capsys)
    assert code == 1 and len(err) == 1
    assert err[0].startswith(f"gensynth shard: error: {bad}: cannot read image (record 9): ")
    assert files_under(out) == [], "the shards written before the failure are removed"
    assert [p.name for p in (out / "train").iterdir()] == [], "no staging folder left behind"


def test_images_of_another_size_are_refused_naming_the_record(tmp_path, capsys):
    root, _ = image_folder(tmp_path / "imgs")
    Image.fromarray(pixels(1, 7, 7, c=3)[0]).save(root / "b" / "odd.png")  # source record 3 (b/00, 01, 02, odd)
    out = tmp_path / "out"
    code, err = shard([f"folder:{root}", str(out), "--shard-size", "1"], capsys)
    assert code == 1 and len(err) == 1
    assert re.fullmatch(rf"gensynth shard: error: folder:{re.escape(str(root))}: record 6: sample train-00000006: "
                        r"image is 7x7x3, the set so far is 5x6x3 \(one size per shard set\)", err[0]), err[0]
    assert files_under(out) == []


def test_failed_overwrite_keeps_the_existing_set(tmp_path, capsys):
    root, images = image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    assert shard([f"folder:{root}", str(out), "--shard-size", "4"], capsys)[0] == 0
    before = digests(out)
    (root / "c" / "99.png").write_bytes(b"not an image")
    code, err = shard([f"folder:{root}", str(out), "--shard-size", "2", "--overwrite"], capsys)
    assert code == 1 and "cannot read image" in err[0]
    assert digests(out) == before, "the old set is untouched, shard for shard"
    assert main(["inspect", str(out / "train"), "--verify"]) == 0
    assert_reads_as(out / "train", np.stack(images), np.repeat(np.arange(3), 3))


def test_hf_missing_column_is_a_usage_error(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "hf"
    datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in pixels(3, 4, 4)], "y": [0, 1, 2]}).save_to_disk(
        str(path))
    code, err = shard([f"hf:{path}", str(tmp_path / "out")], capsys)
    assert code == 2
    assert err == [f"gensynth shard: error: {path}: no column 'label'; columns are image, y "
                   "(choose with --image-column / --label-column)"]
    assert files_under(tmp_path / "out") == []


def test_npz_with_mismatched_arrays(tmp_path, capsys):
    path = tmp_path / "x.npz"
    np.savez(path, images=pixels(5, 4, 4), labels=np.arange(4))
    code, err = shard([f"npz:{path}", str(tmp_path / "out")], capsys)
    assert code == 1
    assert err == [f"gensynth shard: error: {path}: 5 images in 'images' but 4 labels in 'labels': "
                   "they must match one to one"]
    assert files_under(tmp_path / "out") == []


@pytest.mark.parametrize("spec, message", [
    ("tfrecord:/data/x", "unknown source kind 'tfrecord' in 'tfrecord:/data/x': use idx:, folder:, hf:, npz: or "
                         "shards:"),
    ("/data/x", "source '/data/x' must be KIND:PATH with KIND one of idx, folder, hf, npz, shards "
                "(e.g. idx:/usr/share/datasets/fashion-mnist)"),
    ("shards:/no/such/set", "no manifest.json at /no/such/set: not a complete shard set; for WebDataset tars you "
                            "already have, write one with `gensynth index '/no/such/set'` (the tars stay as they "
                            "are), or make a new set with `gensynth shard`"),
    ("npz:/no/such/file.npz", "npz file not found: /no/such/file.npz"),
])
def test_unknown_source_kind_or_missing_path_is_a_usage_error(tmp_path, capsys, spec, message):
    code, err = shard([spec, str(tmp_path / "out")], capsys)
    assert (code, err) == (2, [f"gensynth shard: error: {message}"])
    assert not (tmp_path / "out").exists()


def test_errors_are_gensynth_errors_in_the_library_too(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, images=pixels(5, 4, 4), labels=np.arange(4))
    with pytest.raises(InputDataError, match="must match one to one"):
        open_source(f"npz:{path}")
    with pytest.raises(UsageError, match="unknown source kind"):
        open_source("zip:/x")


# ------------------------------------------------------------------------------- every source kind


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_with_standard_names_both_splits(tmp_path, gz):
    src = tmp_path / "fashion"
    src.mkdir()
    suffix = ".gz" if gz else ""
    data = {"train": (pixels(N, seed=1), labels_for(N)), "test": (pixels(4, seed=2), labels_for(4))}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        write_idx(src / f"{prefix}-images-idx3-ubyte{suffix}", data[split][0])
        write_idx(src / f"{prefix}-labels-idx1-ubyte{suffix}", data[split][1])
    out = tmp_path / "out"
    for split in ("train", "test"):
        assert main(["-q", "shard", f"idx:{src}", str(out), "--split", split]) == 0
        assert_reads_as(out / split, *data[split])
        manifest = read_manifest(str(out / split))
        assert manifest.split == split and manifest.schema["image"]["height"] == 28
        prefix = "t10k" if split == "test" else "train"
        assert [Path(f["path"]).name for f in manifest.provenance["files"]] == [
            f"{prefix}-images-idx3-ubyte{suffix}", f"{prefix}-labels-idx1-ubyte{suffix}"]
    assert read_manifest(str(out / "train")).class_histogram == {"0": 4, "1": 3, "2": 3}


@pytest.mark.parametrize("gz", [False, True])
def test_idx_two_named_files(tmp_path, gz):
    images, labels = pixels(N, seed=3), labels_for(N)
    suffix = ".gz" if gz else ".idx"
    img = write_idx(tmp_path / f"imgs{suffix}", images)
    lab = write_idx(tmp_path / f"labs{suffix}", labels)
    assert main(["-q", "shard", f"idx:{img},{lab}", str(tmp_path / "out")]) == 0
    assert_reads_as(tmp_path / "out" / "train", images, labels)
    files = read_manifest(str(tmp_path / "out" / "train")).provenance["files"]
    assert [f["sha256"] for f in files] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in (img, lab)]


def test_folder_source_classes_from_subfolders(tmp_path):
    root, images = image_folder(tmp_path / "imgs")
    assert main(["-q", "shard", f"folder:{root}", str(tmp_path / "out")]) == 0
    got = assert_reads_as(tmp_path / "out" / "train", np.stack(images), np.repeat(np.arange(3), 3))
    assert got[4][2]["path"] == "b/01.png"
    manifest = read_manifest(str(tmp_path / "out" / "train"))
    assert manifest.classes == ["a", "b", "c"]
    assert manifest.schema["image"] | {} == {"field": "png", "encoding": "png", "height": 6, "width": 5,
                                             "channels": 3, "dtype": "uint8"}


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_hf_source_saved_to_disk_or_parquet(tmp_path, layout):
    datasets = pytest.importorskip("datasets")
    images, labels = pixels(N, 8, 8, seed=4), labels_for(N)
    features = datasets.Features({"img": datasets.Image(), "target": datasets.ClassLabel(names=["x", "y", "z"])})
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(a) for a in images], "target": labels.tolist()},
                                    features=features)
    path = tmp_path / "hf"
    if layout == "save_to_disk":
        ds.save_to_disk(str(path))
    else:
        path.mkdir()
        ds.to_parquet(str(path / "part-0.parquet"))
    out = tmp_path / "out"
    assert main(["-q", "shard", f"hf:{path}", str(out), "--image-column", "img", "--label-column", "target"]) == 0
    assert_reads_as(out / "train", images, labels)
    assert read_manifest(str(out / "train")).classes == ["x", "y", "z"]


def test_npz_source_rgb_and_float_images(tmp_path):
    images, labels = pixels(N, 5, 4, c=3, seed=5), labels_for(N).astype(np.int64)
    np.savez(tmp_path / "rgb.npz", images=images, labels=labels)
    np.savez(tmp_path / "float.npz", x=images / 255.0, y=labels)
    assert main(["-q", "shard", f"npz:{tmp_path / 'rgb.npz'}", str(tmp_path / "a")]) == 0
    assert_reads_as(tmp_path / "a" / "train", images, labels)
    assert main(["-q", "shard", f"npz:{tmp_path / 'float.npz'}", str(tmp_path / "b"), "--encoding", "npy"]) == 0
    assert_reads_as(tmp_path / "b" / "train", images, labels)
    assert read_manifest(str(tmp_path / "b" / "train")).schema["image"]["encoding"] == "npy"


def test_unlabelled_npz_gives_no_cls_field(tmp_path):
    images = pixels(4, 4, 4)
    np.savez(tmp_path / "u.npz", images=images)
    assert main(["-q", "shard", f"npz:{tmp_path / 'u.npz'}", str(tmp_path / "out")]) == 0
    manifest = read_manifest(str(tmp_path / "out" / "train"))
    assert "cls" not in manifest.schema and manifest.class_histogram == {}
    assert_reads_as(tmp_path / "out" / "train", images, None)


# -------------------------------------------------------------------------------- repeatable bytes


def test_same_input_same_bytes_other_seed_other_order(idx_pair, tmp_path):
    images_path, labels_path, images, labels = idx_pair
    spec = f"idx:{images_path},{labels_path}"
    for out, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert main(["-q", "shard", spec, str(tmp_path / out), "--seed", seed, "--shard-size", "4"]) == 0
    a, b, c = (digests(tmp_path / x) for x in "abc")
    assert a == b, "same input, same seed: byte-identical shards and manifest"
    assert set(a) == set(c) == {"train/README.md", "train/manifest.json", "train/train-000000.tar",
                                "train/train-000001.tar", "train/train-000002.tar"}
    assert a["train/train-000000.tar"] != c["train/train-000000.tar"]

    def order(x: str) -> list[int]:
        return [meta["source_index"] for batch in ShardLoader(str(tmp_path / x / "train"), batch_size=N,
                                                               shuffle_buffer=0) for meta in batch["meta"]]
    assert sorted(order("a")) == sorted(order("c")) == list(range(N)) and order("a") != order("c")
    manifest_a, manifest_c = (json.loads((tmp_path / x / "train" / "manifest.json").read_text()) for x in "ac")
    assert manifest_a["provenance"]["seed"] == 0 and manifest_c["provenance"]["seed"] == 1
    assert manifest_a["class_histogram"] == manifest_c["class_histogram"]
    assert main(["-q", "shard", spec, str(tmp_path / "d"), "--no-shuffle"]) == 0
    assert order("d") == list(range(N))


# ---------------------------------------------------------------------- overwrite and shard size


def test_existing_set_needs_overwrite_which_removes_stale_shards(idx_pair, tmp_path, capsys):
    images_path, labels_path, images, labels = idx_pair
    spec, out = f"idx:{images_path},{labels_path}", tmp_path / "out"
    assert shard([spec, str(out), "--shard-size", "2"], capsys)[0] == 0
    assert len(files_under(out)) == 5 + 2  # the shards, the manifest and the card
    before = digests(out)
    code, err = shard([spec, str(out), "--shard-size", "4"], capsys)
    assert (code, err) == (2, [f"gensynth shard: error: {out / 'train'} already holds a complete shard set "
                               "(manifest.json); pass --overwrite to replace it, or choose another OUT"])
    assert digests(out) == before
    assert shard([spec, str(out), "--shard-size", "4", "--overwrite"], capsys)[0] == 0
    assert files_under(out) == ["train/README.md", "train/manifest.json", "train/train-000000.tar",
                                "train/train-000001.tar", "train/train-000002.tar"], "the two stale shards are gone"
    assert [p.name for p in (out / "train").iterdir() if p.name.startswith(".")] == []
    assert [s.samples for s in read_manifest(str(out / "train")).shards] == [4, 4, 2]
    assert_reads_as(out / "train", images, labels)


@pytest.mark.parametrize("size, counts", [(3, [3, 3, 3, 1]), (5, [5, 5]), (10, [10]), (100, [10]), (1, [1] * 10)])
def test_shard_size_cuts_as_asked(idx_pair, tmp_path, size, counts):
    images_path, labels_path, _, _ = idx_pair
    manifest = ingest(open_source(f"idx:{images_path},{labels_path}"), str(tmp_path), shard_size=size)
    assert [s.samples for s in manifest.shards] == counts
    assert [s.name for s in manifest.shards] == [f"train-{i:06d}.tar" for i in range(len(counts))]
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == [s.name for s in manifest.shards]


def test_bad_shard_size_split_and_empty_source(idx_pair, tmp_path, capsys):
    images_path, labels_path, _, _ = idx_pair
    spec = f"idx:{images_path},{labels_path}"
    assert shard([spec, str(tmp_path / "o"), "--shard-size", "0"], capsys) == (
        2, ["gensynth shard: error: --shard-size 0: must be >= 1"])
    assert shard([spec, str(tmp_path / "o"), "--split", "a/b"], capsys) == (
        2, ["gensynth shard: error: --split 'a/b': use letters, digits, '-' or '_' (it names files and keys)"])
    empty = tmp_path / "e.npz"
    np.savez(empty, images=np.zeros((0, 4, 4), np.uint8), labels=np.zeros(0, np.int64))
    assert shard([f"npz:{empty}", str(tmp_path / "o")], capsys) == (
        1, [f"gensynth shard: error: npz:{empty}: no records to write"])
    assert files_under(tmp_path / "o") == []


# --------------------------------------------------------------------------------------- inspect


def test_inspect_set_shard_and_verify(idx_pair, tmp_path, capsys):
    images_path, labels_path, _, _ = idx_pair
    out = tmp_path / "out"
    assert main(["-q", "shard", f"idx:{images_path},{labels_path}", str(out), "--shard-size", "4",
                 "--class-names", "cat,dog,eel"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out / "train")]) == 0
    text = capsys.readouterr().out
    assert f"shard set  {out / 'train'}" in text
    assert "split      train: 10 samples in 3 shards" in text
    assert "images     28x28x1 uint8, png" in text
    assert "classes    3: 0=cat: 4, 1=dog: 3, 2=eel: 3" in text
    assert "shards     train-000000.tar .. train-000002.tar, 2..4 samples each" in text

    assert main(["inspect", str(out / "train" / "train-000002.tar")]) == 0
    text = capsys.readouterr().out
    assert "samples    2, fields cls, json, png" in text
    assert re.search(r"  train-\d{8}: cls \(1 B\), json \(\d+ B\), png \(\d+ B\)", text)

    assert main(["inspect", str(out / "train"), "--verify"]) == 0
    assert "verify     ok: 3 shards match their sha256 and size" in capsys.readouterr().out

    victim = out / "train" / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0x01  # same size, one bit different
    victim.write_bytes(bytes(data))
    (out / "train" / "train-000002.tar").unlink()
    assert main(["inspect", str(out / "train"), "--verify"]) == 1
    text = capsys.readouterr().out
    assert "verify     FAILED: 2 of 3 shards" in text
    assert re.search(r"  train-000001.tar: sha256 [0-9a-f]{12}\.\.\., manifest says [0-9a-f]{12}\.\.\.", text)
    assert "  train-000002.tar: missing" in text and "train-000000.tar:" not in text


def test_inspect_nothing_there_is_a_usage_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"gensynth inspect: error: nothing to inspect at {tmp_path}: expected a shard set (a folder or prefix "
        "with manifest.json), a .tar shard, a run directory (with config.yaml) or a YAML config")


def test_manifest_lists_each_shard_with_samples_bytes_sha256_and_progress_is_logged(idx_pair, tmp_path, caplog):
    images_path, labels_path, _, labels = idx_pair
    with caplog.at_level(logging.INFO, logger="gensynth"):
        manifest = ingest(open_source(f"idx:{images_path},{labels_path}"), str(tmp_path), shard_size=4)
    assert f"shard train: {N} samples in " in caplog.text
    folder = tmp_path / "train"
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk["num_samples"] == N and on_disk["format"] == "gensynth-shards/1"
    for entry in on_disk["shards"]:
        data = (folder / entry["name"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        with tarfile.open(folder / entry["name"]) as tar:
            assert entry["samples"] == len({m.name.split(".")[0] for m in tar.getmembers()})
    assert on_disk["class_histogram"] == {str(c): int((labels == c).sum()) for c in range(CLASSES)}
    image = {"field": "png", "encoding": "png", "height": 28, "width": 28, "channels": 1, "dtype": "uint8"}
    assert on_disk["schema"] == {"key": "str", "image": image, "cls": "int", "json": "object"}
    assert on_disk["provenance"]["kind"] == "ingest" and on_disk["provenance"]["source"].startswith("idx:")
    assert manifest.num_samples == N
