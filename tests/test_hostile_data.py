"""Hostile data: bad labels, crafted tar headers and PNGs, manifests that lie or have the wrong shape.

Each is refused where it enters (ingest, a manifest read), skipped and counted as corrupt by the loader,
or failed by `gensynth inspect SET --verify` with one line naming the shard and key; never a traceback.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gensynth.data.codec import MAX_IMAGE_PIXELS, PNG_SIGNATURE
from gensynth.data.stream import CorruptDataError, ShardLoader
from gensynth.data.tario import TarShardWriter, iter_samples
from tests.conftest import subprocess_env, write_shard_set
from tests.helpers import gensynth

# ----------------------------------------------------------------------------------------------- helpers


def one_line(text: str) -> str:
    """The only line of an error output: no traceback, nothing else."""
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def edit_manifest(folder: Path, change: Callable[[dict], object]) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def restamp(folder: Path, shard: str) -> None:
    """Record a shard's present bytes and sha256 in the manifest: it passes the hash check as if written so."""
    data = (folder / shard).read_bytes()

    def change(manifest: dict) -> None:
        entry = next(s for s in manifest["shards"] if s["name"] == shard)
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()

    edit_manifest(folder, change)


def rewrite_sample(folder: Path, shard: str, key: str, change: Callable[[dict[str, bytes]], object]) -> None:
    """Change one sample's fields in place (the shard rewritten, the manifest restamped)."""
    with open(folder / shard, "rb") as f:
        samples = list(iter_samples(f))
    buf = io.BytesIO()
    writer = TarShardWriter(buf)
    for k, fields in samples:
        if k == key:
            change(fields)
        writer.write(k, fields)
    writer.close()
    (folder / shard).write_bytes(buf.getvalue())
    restamp(folder, shard)


def labelled_set(tmp_path: Path) -> Path:
    """Two shards of 10 samples (8x8 grey, labels 0..9, classes c0..c9): train-00000013 is in shard 1."""
    folder = tmp_path / "set"
    write_shard_set(folder, [10, 10])
    return folder


def rss_of(script: str, *args: str) -> dict:
    """Run `script` in a fresh Python; it prints one JSON line, to which the peak RSS (MB) before and after
    its `# -- measured` part are added."""
    before, _, measured = script.partition("# -- measured\n")
    code = ("import json, resource, sys\n" + before
            + "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n" + measured
            + "out['rss_mb'] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024\n"
            + "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", code, *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"] = done.stderr
    return result


# ------------------------------------------------------------------------------------- crafted tar headers


def set_size_field(folder: Path, shard: str, member: str, field: bytes) -> None:
    """Overwrite a member header's 12-byte size field (and fix its checksum, as a crafted file would)."""
    path = folder / shard
    data = bytearray(path.read_bytes())
    at = data.index(member.encode() + b"\0")
    assert at % 512 == 0
    header = data[at:at + 512]
    header[124:136] = field
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    data[at:at + 512] = header
    path.write_bytes(bytes(data))
    restamp(folder, shard)


def base256(n: int) -> bytes:
    """GNU tar's base-256 size field: a 0x80 marker byte, then the number big-endian in 11 bytes."""
    return b"\x80" + (n % 256**11).to_bytes(11, "big")


HUGE_SIZES = {"2**40 bytes": base256(2**40), "2**70 bytes": base256(2**70)}


@pytest.mark.parametrize("field", HUGE_SIZES.values(), ids=HUGE_SIZES.keys())
def test_a_member_claiming_a_huge_size_is_a_corrupt_shard_to_the_loader(tmp_path, field, caplog):
    folder = labelled_set(tmp_path)
    set_size_field(folder, "train-000001.tar", "train-00000013.cls", field)
    loader = ShardLoader(str(folder), batch_size=4, max_corrupt_fraction=0.9)
    with caplog.at_level(logging.WARNING, logger="gensynth"):
        keys = [k for batch in loader for k in batch["key"]]
    # up to the sample before the crafted header (whose completeness the reader cannot know), like a truncation
    assert sorted(keys) == [f"train-{i:08d}" for i in range(12)]
    assert loader.corrupt == 8, "the rest of the shard is counted as missing"
    assert "train-000001.tar" in caplog.text and "claims" in caplog.text


@pytest.mark.parametrize("field", HUGE_SIZES.values(), ids=HUGE_SIZES.keys())
def test_verify_fails_a_member_claiming_a_huge_size(tmp_path, field):
    folder = labelled_set(tmp_path)
    set_size_field(folder, "train-000001.tar", "train-00000013.cls", field)
    done = gensynth("inspect", str(folder), "--verify")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "verify     FAILED: 1 of 2 shards" in done.stdout
    line = next(line for line in done.stdout.splitlines() if line.startswith("  train-000001.tar: "))
    assert "damaged after 2 samples" in line and "'train-00000013.cls' claims" in line


# ------------------------------------------------------------------------------------------------ PNG bombs


def zeros_zlib(rows: int, stride: int) -> bytes:
    """A zlib stream of rows x stride zero bytes (a PNG's all-black scanlines), about a thousandth of that
    size, built without holding the inflated bytes: one full-flushed block of 32 rows, repeated."""
    assert rows % 32 == 0
    chunk = bytes(32 * stride)
    c = zlib.compressobj(9)
    first = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)  # with the zlib header
    again = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)  # a block independent of what came before
    end = c.flush()[:-4]  # the final block, without the adler32 of what this compressor saw
    n = rows * stride
    return first + again * (rows // 32 - 1) + end + struct.pack(">I", ((n % 65521) << 16) | 1)  # adler32 of zeros


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def grey_png(height: int, width: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


BOMB_SIDE = 32768  # 32768x32768 grey: 1 GiB of pixels in about 1 MB of PNG
RSS_BOUND_MB = 300


def png_bomb(height: int = BOMB_SIDE, width: int = BOMB_SIDE) -> bytes:
    """A PNG whose header says height x width and whose data inflates to a 32768x32768 grey image."""
    return grey_png(height, width, zeros_zlib(BOMB_SIDE, 1 + BOMB_SIDE))


def test_png_bomb_in_a_shard_is_a_corrupt_sample_refused_before_inflating(tmp_path):
    folder = labelled_set(tmp_path)
    rewrite_sample(folder, "train-000001.tar", "train-00000013", lambda f: f.update(png=png_bomb()))
    out = rss_of("""
from gensynth.data.stream import CorruptDataError, ShardLoader
loader = ShardLoader(sys.argv[1], batch_size=4, max_corrupt_fraction=0.1)
# -- measured
keys = [k for batch in loader for k in batch["key"]]
out = {"keys": keys, "corrupt": loader.corrupt}
""", str(folder))
    assert out["rss_mb"] < RSS_BOUND_MB, f"decoding the bomb took {out['rss_mb']:.0f} MB"
    assert out["corrupt"] == 1 and len(out["keys"]) == 19 and "train-00000013" not in out["keys"]
    assert "corrupt sample skipped: shard train-000001.tar key train-00000013: PNG header says 32768x32768 " \
           "pixels (height x width), the set's schema says 8x8" in out["stderr"]


def test_png_bomb_without_a_schema_is_refused_by_the_pixel_limit(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_bomb())
    out = rss_of("""
from pathlib import Path
from gensynth.data.codec import DecodeError, decode_image
data = Path(sys.argv[1]).read_bytes()
# -- measured
try:
    decode_image(data, "png")
    out = {"error": None}
except DecodeError as e:
    out = {"error": str(e)}
""", str(tmp_path / "bomb.png"))
    assert out["rss_mb"] < RSS_BOUND_MB, f"decoding the bomb took {out['rss_mb']:.0f} MB"
    assert out["error"] == (f"PNG header says 32768x32768 pixels (height x width), more than the {MAX_IMAGE_PIXELS} "
                            "an image may have")


def test_png_whose_data_inflates_past_its_header_is_refused_unread(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_bomb(8, 8))  # a small header, 1 GiB of data
    out = rss_of("""
from pathlib import Path
from gensynth.data.codec import DecodeError, decode_image
data = Path(sys.argv[1]).read_bytes()
# -- measured
try:
    decode_image(data, "png", (8, 8, 1))
    out = {"error": None}
except DecodeError as e:
    out = {"error": str(e)}
""", str(tmp_path / "bomb.png"))
    assert out["rss_mb"] < RSS_BOUND_MB, f"decoding the bomb took {out['rss_mb']:.0f} MB"
    assert out["error"] == ("PNG data inflates to more than the 72 bytes its 8x8 header implies "
                            "(the rest is not inflated)")



# ------------------------------------------------------------------------------------------------- labels

BAD_LABELS = {"99": b"99", "-3": b"-3", "2**70": str(2**70).encode(), "no cls": None}


def set_label(fields: dict[str, bytes], label: bytes | None) -> None:
    if label is None:
        del fields["cls"]
    else:
        fields["cls"] = label


@pytest.mark.parametrize("label", BAD_LABELS.values(), ids=BAD_LABELS.keys())
def test_loader_skips_counts_and_logs_a_bad_label(tmp_path, label, caplog):
    folder = labelled_set(tmp_path)
    rewrite_sample(folder, "train-000001.tar", "train-00000013", lambda f: set_label(f, label))
    loader = ShardLoader(str(folder), batch_size=4, max_corrupt_fraction=0.1)
    with caplog.at_level(logging.WARNING, logger="gensynth"):
        batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 19 and "train-00000013" not in keys
    assert all(0 <= int(v) < 10 for b in batches for v in b["label"])
    assert loader.corrupt == 1
    assert "corrupt sample skipped: shard train-000001.tar key train-00000013: " in caplog.text
    assert "the set's 10 classes (0..9)" in caplog.text


@pytest.mark.parametrize("label", BAD_LABELS.values(), ids=BAD_LABELS.keys())
def test_verify_fails_a_bad_label_naming_shard_and_key(tmp_path, label):
    folder = labelled_set(tmp_path)
    rewrite_sample(folder, "train-000001.tar", "train-00000013", lambda f: set_label(f, label))
    done = gensynth("inspect", str(folder), "--verify")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "verify     FAILED: 1 of 2 shards" in done.stdout
    problems = [line for line in done.stdout.splitlines() if line.startswith("  ")]
    assert len(problems) == 1 and problems[0].startswith("  train-000001.tar: sample train-00000013: ")
    assert "one of the set's 10 classes (0..9)" in problems[0]


def test_a_bad_label_does_not_stop_a_training_run(tmp_path):
    import yaml

    folder = labelled_set(tmp_path)
    rewrite_sample(folder, "train-000001.tar", "train-00000013", lambda f: f.update(cls=b"99"))
    cfg = {"run": {"name": "bad", "root": str(tmp_path / "runs"), "seed": 0},
           "data": {"train": str(folder), "mode": "resampled", "num_workers": 0, "shuffle_buffer": 4,
                    "max_corrupt_fraction": 0.2},
           "model": {"family": "gan", "resolution": 8},
           "gan": {"z_dim": 8, "g_channels": 8, "d_channels": 8, "max_channels": 16},
           "train": {"steps": 2, "batch_size": 16, "log_every": 2, "sample_every": 2, "checkpoint_every": 2,
                     "eval_every": 0, "threads": 1}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    done = gensynth("train", str(tmp_path / "bad.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "key train-00000013: label 99 is not one of the set's 10 classes" in done.stderr


def test_shard_refuses_a_label_outside_the_declared_classes(tmp_path):
    images = np.zeros((4, 4, 4), np.uint8)
    np.savez(tmp_path / "neg.npz", images=images, labels=np.array([0, 1, -3, 2]))
    done = gensynth("shard", f"npz:{tmp_path / 'neg.npz'}", str(tmp_path / "out"))
    assert done.returncode == 1
    assert one_line(done.stderr) == (f"gensynth shard: error: {tmp_path / 'neg.npz'}: record 2: label -3 in 'labels' "
                                     "is not a class index 0..65535")

    np.savez(tmp_path / "ok.npz", images=images, labels=np.array([0, 1, 3, 2]))
    done = gensynth("-q", "shard", f"npz:{tmp_path / 'ok.npz'}", str(tmp_path / "out"), "--class-names", "a,b,c",
                    "--no-shuffle")
    assert done.returncode == 1
    assert one_line(done.stderr) == (f"gensynth shard: error: npz:{tmp_path / 'ok.npz'}: record 2: label 3 is not "
                                     "one of the source's declared 3 classes (0..2): a, b, c")
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()


def test_shard_refuses_a_bad_label_in_a_source_shard_set(tmp_path):
    folder = labelled_set(tmp_path)
    rewrite_sample(folder, "train-000001.tar", "train-00000013", lambda f: f.update(cls=b"many"))
    done = gensynth("-q", "shard", f"shards:{folder}", str(tmp_path / "out"))
    assert done.returncode == 1
    assert one_line(done.stderr) == (f"gensynth shard: error: {folder / 'train-000001.tar'}: sample train-00000013: "
                                     "label 'many' is not one of the set's 10 classes (0..9)")


# ---------------------------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("name", ["/etc/passwd", "../../x", "sub/train-000000.tar", "..\\x.tar", ".."])
def test_a_shard_name_outside_the_set_is_refused_when_the_manifest_is_read(tmp_path, name):
    folder = labelled_set(tmp_path)
    edit_manifest(folder, lambda m: m["shards"][1].update(name=name))
    done = gensynth("inspect", str(folder), "--verify")
    assert done.returncode == 1 and done.stdout == "", "nothing is read or described"
    assert one_line(done.stderr) == (
        f"gensynth inspect: error: {folder / 'manifest.json'}: not a gensynth manifest: shards[1].name is "
        f"{json.dumps(name)} (text), expected a plain file name inside the set's folder (no '/', '\\', '.' or '..')")


@pytest.mark.parametrize("listed", [7, 13])
def test_verify_counts_each_shards_samples_against_the_manifest(tmp_path, listed):
    folder = labelled_set(tmp_path)
    edit_manifest(folder, lambda m: m["shards"][0].update(samples=listed))
    done = gensynth("inspect", str(folder), "--verify")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "verify     FAILED: 1 of 2 shards" in done.stdout
    assert f"  train-000000.tar: holds 10 samples, manifest says {listed}" in done.stdout.splitlines()


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_counts_and_logs_samples_beyond_a_shards_manifest_entry(tmp_path, workers, caplog):
    folder = labelled_set(tmp_path)
    edit_manifest(folder, lambda m: m["shards"][1].update(samples=7))  # it holds 10
    loader = ShardLoader(str(folder), batch_size=4, num_workers=workers, max_corrupt_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="gensynth"):
        keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == len(set(keys)) == 17
    assert loader.corrupt == 3, "the samples it cannot deliver are counted, not dropped silently"
    if workers == 0:  # worker processes log to their own stderr
        assert "train-000001.tar holds 3 samples more than the 7 its manifest entry lists" in caplog.text


def test_loader_fails_loudly_on_a_shard_longer_than_its_manifest_entry(tmp_path):
    folder = labelled_set(tmp_path)
    edit_manifest(folder, lambda m: m["shards"][1].update(samples=7))
    with pytest.raises(CorruptDataError, match="max_corrupt_fraction"):
        list(ShardLoader(str(folder), batch_size=4))


def put(manifest: dict, path: str, value: object) -> dict:
    """The manifest with the field at dotted `path` (e.g. shards.0.samples) set to value, or removed (None)."""
    *parents, last = path.split(".")
    node = manifest
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is None:
        del node[last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return manifest


WRONG_SHAPES = {
    "a list": (lambda m: [1, 2], "it holds [1, 2] (a list), expected an object with format 'gensynth-shards/1'"),
    "samples many": (lambda m: put(m, "shards.0.samples", "many"),
                     "shards[0].samples is \"many\" (text), expected a whole number >= 0"),
    "no sha256": (lambda m: put(m, "shards.1.sha256", None), "shards[1] has no field 'sha256'"),
    "no shards": (lambda m: put(m, "shards", None), "no field 'shards'"),
    "shards an object": (lambda m: put(m, "shards", {}),
                         "shards is {} (an object), expected a list of {name, samples, bytes, sha256}"),
    "height text": (lambda m: put(m, "schema.image.height", "8"),
                    "schema.image.height is \"8\" (text), expected a whole number >= 1"),
    "bad histogram label": (lambda m: put(m, "class_histogram.-1", 3),
                            "a class_histogram label is \"-1\" (text), expected a class index 0, 1, ... (as text)"),
    "classes text": (lambda m: put(m, "classes", "c0,c1"),
                     "classes is \"c0,c1\" (text), expected a list of class names (text) or null"),
}


@pytest.mark.parametrize("change, message", WRONG_SHAPES.values(), ids=WRONG_SHAPES.keys())
def test_a_manifest_of_the_wrong_shape_is_one_line_naming_file_and_field(tmp_path, change, message):
    folder = labelled_set(tmp_path)
    path = folder / "manifest.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    done = gensynth("inspect", str(folder))
    assert done.returncode == 1
    assert one_line(done.stderr) == f"gensynth inspect: error: {path}: not a gensynth manifest: {message}"


def test_a_manifest_that_is_not_utf8_is_one_line(tmp_path):
    folder = labelled_set(tmp_path)
    (folder / "manifest.json").write_bytes(b'{"format": "\xff"}')
    done = gensynth("inspect", str(folder))
    assert done.returncode == 1
    assert one_line(done.stderr).startswith(f"gensynth inspect: error: {folder / 'manifest.json'}: not a gensynth "
                                            "manifest: not JSON: ")
