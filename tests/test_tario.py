"""Our tar writer and reader: the same bytes as Python's tarfile (USTAR), and what webdataset reads."""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from gensynth.data.tario import TarShardWriter, iter_samples, ustar_header


def tarfile_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """The reference: the stdlib's tarfile with our member settings (mode 0444, owner 0, mtime 0)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for ext in sorted(fields):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(fields[ext]), 0, 0o444, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(fields[ext]))
    return buf.getvalue()


def ours(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    writer = TarShardWriter(buf)
    for key, fields in samples:
        writer.write(key, fields)
    writer.close()
    return buf.getvalue()


@pytest.mark.parametrize("n", [0, 1, 3, 40])
def test_writer_bytes_equal_tarfile_and_read_back(n):
    rng = random.Random(n)
    samples = [(f"synth-{i:08d}", {"png": rng.randbytes(rng.randrange(0, 3000)), "cls": b"7",
                                   "json": b'{"i":%d}' % i}) for i in range(n)]
    data = ours(samples)
    assert data == tarfile_bytes(samples)
    assert list(iter_samples(io.BytesIO(data))) == samples


def test_header_limits_are_errors():
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        ustar_header("x" * 101, 1)
    with pytest.raises(ValueError, match="must not contain a dot"):
        TarShardWriter(io.BytesIO()).write("a.b", {"png": b""})


@pytest.mark.parametrize("score", [None, 0.123457, 1.0, 1e-07, float("nan")])
def test_a_shards_meta_template_writes_the_bytes_of_json_dumps(score):
    """Generation encodes the fields a shard's samples share once: the bytes stay those of meta_json."""
    from gensynth.data.writer import MetaTemplate, meta_json

    shared = {"family": "gan", "export_sha256": "ab" * 32, "seed": 7, "shard": 3,
              "options": {"truncation": 0.7, "top_k": None, "nested": {"b": [1, 2.5, "x"], "a": True}}}
    varying = ("index", "class") if score is None else ("index", "class", "score")
    template = MetaTemplate(shared, varying)
    for index, name in [(0, "T-shirt/top"), (123456789, "Sandale \u00e9t\u00e9 \"x\"\\"), (5, "")]:
        values = {"index": index, "class": name} if score is None else {"index": index, "class": name, "score": score}
        assert template(values) == meta_json({**shared, **values})
