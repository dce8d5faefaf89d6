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


def test_meta_template_many_writes_the_bytes_of_one_by_one():
    """MetaTemplate.many (a batch of samples) gives what calling it per sample gives, '%' in a value included."""
    from gensynth.data.writer import MetaTemplate

    template = MetaTemplate({"family": "100% gan", "seed": 7, "options": {"t": 0.7}}, ("index", "class", "score"))
    columns = {"index": [0, 5, 123456789], "class": ["T-shirt/top", "50% \"x\"\u00e9", ""],
               "score": [0.123457, 1.0, float("nan")]}
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    assert template.many(columns) == [template(row) for row in rows]


def write_many_bytes(samples: list[tuple[str, dict[str, bytes]]], batch: int) -> bytes:
    buf = io.BytesIO()
    writer = TarShardWriter(buf)
    for i in range(0, len(samples), batch):
        part = samples[i:i + batch]
        writer.write_many([key for key, _ in part], {ext: [fields[ext] for _, fields in part] for ext in part[0][1]})
    writer.close()
    assert writer.count == len(samples)
    return buf.getvalue()


@pytest.mark.parametrize("case", ["generation", "empty and large values", "varying key lengths"])
def test_write_many_gives_the_bytes_of_write(case):
    """Headers built for a batch at once (fixed rows for one-block values) are the bytes write() gives."""
    rng = random.Random(case)
    if case == "generation":  # fixed-length keys, a small cls and json, a PNG of a block or two
        samples = [(f"synth-{i:08d}", {"png": rng.randbytes(rng.randrange(400, 700)), "cls": b"%d" % (i % 10),
                                       "json": b'{"index":%d}' % i}) for i in range(300)]
    elif case == "empty and large values":  # 0 bytes, exactly one block, one byte more, far more
        sizes = [0, 1, 511, 512, 513, 1024, 5000]
        samples = [(f"k{i:03d}", {"a": rng.randbytes(sizes[i % 7]), "b": rng.randbytes(sizes[(i + 3) % 7])})
                   for i in range(50)]
    else:
        samples = [("x" * rng.randrange(1, 40) + f"/s{i}", {"cls": b"1", "npy": rng.randbytes(200)}) for i in range(60)]
    expected = ours(samples)
    assert expected == tarfile_bytes(samples)
    for batch in (1, 7, len(samples)):
        assert write_many_bytes(samples, batch) == expected


def test_write_many_refuses_what_write_refuses():
    with pytest.raises(ValueError, match="must not contain a dot"):
        TarShardWriter(io.BytesIO()).write_many(["ok", "a.b"], {"png": [b"1", b"2"]})
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        TarShardWriter(io.BytesIO()).write_many(["x" * 101], {"png": [b"1"]})

