"""The loader's fast paths give the same answers as the slow, standard ones: tar parsing, PNG and npy."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gensynth.data import tario
from gensynth.data.codec import (
    DecodeError,
    decode_image,
    decode_npy,
    decode_png,
    encode_npy,
    encode_png,
    png_scanlines,
)
from gensynth.data.stream import ShardLoader
from gensynth.data.tario import (
    CorruptShard,
    TarShardWriter,
    TruncatedShard,
    iter_members,
    iter_samples,
    skip_samples,
)


def pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def pillow_png(image: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image if image.shape[2] != 1 else image[:, :, 0]).save(buf, format="PNG", **save)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ PNG


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_our_png_round_trips_and_pillow_agrees(channels):
    image = pixels((5, 7, channels))
    data = encode_png(image)
    assert png_scanlines(data) is not None, "our own PNGs take the fast path"
    assert np.array_equal(decode_png(data), image)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))).reshape(image.shape), image)


@pytest.mark.parametrize("channels", [1, 3])
def test_filtered_png_from_pillow_decodes_the_same(channels):
    image = np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 9, (12, 1, channels))  # filters pay off
    data = pillow_png(image, optimize=True)
    assert np.array_equal(decode_png(data), image)


def test_palette_png_is_converted_to_rgb():
    image = pixels((6, 6, 3))
    data = pillow_png(image)
    palette = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("P", palette=Image.Palette.ADAPTIVE).save(palette, format="PNG")
    decoded = decode_png(palette.getvalue())
    assert decoded.shape == (6, 6, 3) and decoded.dtype == np.uint8


def test_png_split_over_several_idat_chunks():
    image = pixels((9, 9, 1))
    data = encode_png(image)
    length = struct.unpack(">I", data[33:37])[0]
    body = data[41:41 + length]

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    split = data[:33] + chunk(b"IDAT", body[:10]) + chunk(b"IDAT", body[10:]) + chunk(b"IEND", b"")
    assert np.array_equal(decode_png(split), image)


@pytest.mark.parametrize("damage", ["signature", "truncated", "zlib", "short_header"])
def test_damaged_png_raises_decode_error(damage):
    data = encode_png(pixels((8, 8, 1)))
    bad = {"signature": b"GIF89a" + data[6:], "truncated": data[:len(data) // 2],
           "zlib": data[:45] + bytes(20) + data[65:], "short_header": data[:20]}[damage]
    with pytest.raises(DecodeError):
        decode_png(bad)


# ------------------------------------------------------------------------------------------------ npy


@pytest.mark.parametrize("shape", [(4, 5), (4, 5, 1), (4, 5, 3)])
def test_npy_round_trip_and_remembered_header(shape):
    image = pixels(shape)
    for _ in range(2):  # the second call takes the remembered header
        decoded = decode_npy(encode_npy(image))
        assert decoded.shape == (4, 5, shape[2] if len(shape) == 3 else 1)
        assert np.array_equal(decoded.reshape(shape), image)


def test_fortran_order_npy_is_read_by_numpy():
    image = np.asfortranarray(pixels((4, 6, 3)))
    buf = io.BytesIO()
    np.save(buf, image, allow_pickle=False)
    assert np.array_equal(decode_npy(buf.getvalue()), image)


def test_bad_npy_raises_decode_error():
    with pytest.raises(DecodeError, match="uint8"):
        buf = io.BytesIO()
        np.save(buf, np.zeros((3, 3), np.float32))
        decode_npy(buf.getvalue())
    with pytest.raises(DecodeError, match="data bytes"):
        decode_npy(encode_npy(pixels((4, 4, 1)))[:-3])
    with pytest.raises(DecodeError):
        decode_npy(b"not an npy file at all")


def test_jpeg_goes_through_pillow():
    buf = io.BytesIO()
    Image.fromarray(pixels((8, 8, 3))).save(buf, format="JPEG")
    assert decode_image(buf.getvalue(), "jpg").shape == (8, 8, 3)


# ------------------------------------------------------------------------------------------------ tar


def stdlib_tar(members: list[tuple[str, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("somedir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # a directory entry: skipped
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reader_matches_tarfile_including_long_names(fmt):
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 80
    members = [(f"{long_dir}/s-{i:03d}.{ext}", bytes([i]) * (i * 37 % 700)) for i in range(5) for ext in ("cls", "png")]
    data = stdlib_tar(members, fmt)
    assert list(iter_members(io.BytesIO(data))) == members
    samples = list(iter_samples(io.BytesIO(data)))
    assert [k for k, _ in samples] == [f"{long_dir}/s-{i:03d}" for i in range(5)]
    assert all(set(fields) == {"cls", "png"} for _, fields in samples)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("skip", [0, 1, 3, 5, 9])
def test_skipping_samples_by_their_headers_lands_where_reading_through_would(fmt, skip):
    """A worker whose share starts inside a shard seeks past the samples before it (long names included)."""
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 80
    members = [(f"{long_dir}/s-{i:03d}.{ext}", bytes([i]) * (i * 37 % 700)) for i in range(5) for ext in ("cls", "png")]
    f = io.BytesIO(stdlib_tar(members, fmt))
    assert skip_samples(f, skip) == min(skip, 5)
    assert list(iter_samples(f)) == list(iter_samples(io.BytesIO(stdlib_tar(members, fmt))))[skip:]


def plain_tar(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT, gnu_checksum: bool = False) -> bytes:
    """Members with no directory entry, as our writer and most tools lay them out; with `gnu_checksum`, each
    header's checksum field rewritten as GNU tar writes it ("%07o\\0" instead of tarfile's "%06o\\0 ")."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = bytearray(buf.getvalue())
    if gnu_checksum:
        pos = 0
        while out[pos:pos + 512] != bytes(512):
            header = out[pos:pos + 512]
            header[148:156] = b"%07o\0" % (sum(header[:148]) + 256 + sum(header[156:]))
            out[pos:pos + 512] = header
            pos += 512 + (int(header[124:135], 8) + 511) // 512 * 512
    return bytes(out)


def spy_exact(monkeypatch) -> list[int]:
    """Calls of the header-by-header loop that skip_samples hands over to (what it was asked to skip)."""
    calls: list[int] = []
    exact = tario._skip_exact

    def spy(f, count, key, passed):
        calls.append(count)
        return exact(f, count, key, passed)

    monkeypatch.setattr(tario, "_skip_exact", spy)
    return calls


@pytest.mark.parametrize("chunk", [1024, 5000, 1 << 16])
@pytest.mark.parametrize("gnu_checksum", [False, True])
def test_skipping_plain_headers_in_bulk_lands_where_reading_through_would(monkeypatch, chunk, gnu_checksum):
    """Our shards' headers are followed with numpy a chunk at a time: any skip, members larger than a chunk, keys
    in folders whose names hold dots, tarfile's and GNU tar's checksum fields; the exact loop only sees the end."""
    monkeypatch.setattr(tario, "_SKIP_CHUNK", chunk)
    calls = spy_exact(monkeypatch)
    members = [(f"a.b/c-{i % 2}/s-{i:03d}.{ext}", bytes([i]) * (i * 397 % 3000)) for i in range(30)
               for ext in ("cls", "png", "seg.json")]
    data = plain_tar(members, gnu_checksum=gnu_checksum)
    whole = list(iter_samples(io.BytesIO(data)))
    assert len(whole) == 30 and whole[1][0] == "a.b/c-1/s-001"
    for skip in range(33):
        f = io.BytesIO(data)
        assert skip_samples(f, skip) == min(skip, 30)
        assert list(iter_samples(f)) == whole[skip:]
        assert calls == ([skip] if skip >= 30 else []), "a plain shard is skipped in bulk up to its end marker"
        calls.clear()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_skipping_hands_a_long_name_to_the_exact_loop(monkeypatch, fmt):
    """Plain headers in bulk up to the first long name (a pax or GNU header), the rest header by header."""
    monkeypatch.setattr(tario, "_SKIP_CHUNK", 2048)
    calls = spy_exact(monkeypatch)
    members = [(("d" * 120 + "/" if i == 6 else "") + f"s-{i:02d}.{ext}", bytes([i]) * 700) for i in range(12)
               for ext in ("cls", "png")]
    data = plain_tar(members, fmt)
    whole = list(iter_samples(io.BytesIO(data)))
    for skip in range(14):
        f = io.BytesIO(data)
        assert skip_samples(f, skip) == min(skip, 12)
        assert list(iter_samples(f)) == whole[skip:]
    assert calls == list(range(6, 14)), "bulk up to sample 6 (its long name), exact from there"


def test_skipping_a_local_shard_reads_it_memory_mapped(monkeypatch, tmp_path):
    """A shard on disk is skipped through its memory map (chunks are views of it, not reads through the file
    object), landing where reading through would, across chunks."""
    monkeypatch.setattr(tario, "_SKIP_CHUNK", 4096)
    chunks: list[type] = []
    plain = tario._plain_headers
    monkeypatch.setattr(tario, "_plain_headers", lambda chunk: chunks.append(type(chunk)) or plain(chunk))
    path = tmp_path / "shard.tar"
    path.write_bytes(plain_tar([(f"s-{i:03d}.{ext}", bytes([i]) * (i * 131 % 1500)) for i in range(40)
                                for ext in ("cls", "png")]))
    with open(path, "rb") as f:
        whole = list(iter_samples(f))
    for skip in (1, 17, 39):
        with open(path, "rb", buffering=1 << 20) as f:
            assert skip_samples(f, skip) == skip
            assert list(iter_samples(f)) == whole[skip:]
    assert len(chunks) > 3 and set(chunks) == {memoryview}, "the shard was read through instead of mapped"


def test_skipping_in_bulk_still_fails_on_damage_and_truncation():
    members = [(f"s-{i:02d}.{ext}", bytes([i]) * 600) for i in range(20) for ext in ("cls", "png")]
    data = plain_tar(members)
    damaged = bytearray(data)
    damaged[10 * 2 * (512 + 1024) + 1] ^= 0x01  # a name byte of sample 10's first header: its checksum fails
    assert skip_samples(io.BytesIO(bytes(damaged)), 9) == 9  # lands on sample 9: the damage lies beyond
    with pytest.raises(CorruptShard):
        skip_samples(io.BytesIO(bytes(damaged)), 10)  # sample 10 begins at the damaged header
    with pytest.raises(TruncatedShard):
        skip_samples(io.BytesIO(data[:15 * 2 * (512 + 1024) + 700]), 18)


class _Unseekable(io.RawIOBase):
    def __init__(self, data: bytes):
        self._f = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        chunk = self._f.read(len(b))
        b[:len(chunk)] = chunk
        return len(chunk)


def test_skipping_needs_a_seekable_stream_and_a_damaged_header_still_fails():
    data = stdlib_tar([(f"s-{i}.cls", b"%d" % i) for i in range(4)], tarfile.USTAR_FORMAT)
    unseekable = io.BufferedReader(_Unseekable(data))
    assert skip_samples(unseekable, 2) == 0  # nothing skipped: the caller reads through
    assert [k for k, _ in iter_samples(unseekable)] == ["s-0", "s-1", "s-2", "s-3"]
    damaged = bytearray(data)
    damaged[512 + 1024 + 5] ^= 0xFF  # the second sample's header (after the directory entry)
    with pytest.raises(CorruptShard):
        skip_samples(io.BytesIO(bytes(damaged)), 3)
    with pytest.raises(TruncatedShard):
        skip_samples(io.BytesIO(data[:512 * 4]), 3)


def test_seven_digit_checksum_field_is_accepted():
    header = bytearray(stdlib_tar([("a.cls", b"1")], tarfile.USTAR_FORMAT)[512:1024])
    total = sum(header[:148]) + 256 + sum(header[156:])
    header[148:156] = b"%07o\0" % total  # GNU tar's layout; Python writes "%06o\0 "
    data = bytes(header) + b"1".ljust(512, b"\0") + bytes(1024)
    assert list(iter_members(io.BytesIO(data))) == [("a.cls", b"1")]


def our_shard(n: int) -> bytes:
    buf = io.BytesIO()
    writer = TarShardWriter(buf)
    for i in range(n):
        writer.write(f"k-{i:04d}", {"cls": b"3", "png": encode_png(pixels((4, 4, 1), i))})
    writer.close()
    return buf.getvalue()


def test_damaged_header_and_truncation_are_told_apart():
    data = bytearray(our_shard(3))
    data[1024 + 100] ^= 0x01  # a byte of the second member's header (mode field)
    with pytest.raises(CorruptShard):
        list(iter_members(io.BytesIO(bytes(data))))
    whole = our_shard(3)
    for cut in (700, 2048 + 100, 6 * 1024):  # inside data, inside a header, at the missing end marker
        with pytest.raises(TruncatedShard):
            list(iter_members(io.BytesIO(whole[:cut])))


def test_shard_bytes_are_repeatable_and_tarfile_reads_them():
    assert our_shard(4) == our_shard(4)
    with tarfile.open(fileobj=io.BytesIO(our_shard(2))) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["k-0000.cls", "k-0000.png", "k-0001.cls", "k-0001.png"]
    assert {(i.mtime, i.uid, i.gid, i.mode) for i in infos} == {(0, 0, 0, 0o444)}


# ----------------------------------------------------------------------- mixed encodings in one batch


def test_batch_mixing_our_png_pillow_png_and_npy_keeps_every_pixel(tmp_path: Path):
    images = [pixels((6, 5, 1), i) for i in range(9)]
    encoders = [encode_png, lambda a: pillow_png(a, optimize=True), encode_npy]
    path = tmp_path / "mixed-000000.tar"
    with open(path, "wb") as f:
        writer = TarShardWriter(f)
        for i, image in enumerate(images):
            encoder = encoders[i % 3]
            field = "npy" if encoder is encode_npy else "png"
            writer.write(f"m-{i:04d}", {"cls": str(i).encode(), field: encoder(image)})
        writer.close()
    for batch_size in (9, 3):  # one mixed batch; batches of three, one of each kind
        seen = {}
        for batch in ShardLoader([str(path)], batch_size=batch_size, shuffle_buffer=0):
            for key, label, image in zip(batch["key"], batch["label"], batch["image"]):
                seen[key] = (int(label), image)
        assert sorted(seen) == [f"m-{i:04d}" for i in range(9)]
        for i, image in enumerate(images):
            label, got = seen[f"m-{i:04d}"]
            assert label == i and torch.equal(got, torch.from_numpy(image.transpose(2, 0, 1).copy()))


def test_encoding_on_every_core_gives_the_bytes_of_encoding_one_by_one():
    from gensynth.data.codec import ENCODE_CHUNK, encode_image, encode_images

    images = np.random.default_rng(3).integers(0, 256, (3 * ENCODE_CHUNK + 5, 9, 7, 3), dtype=np.uint8)
    for encoding in ("png", "npy"):
        one_by_one = [encode_image(image, encoding) for image in images]
        assert encode_images(images, encoding, threads=2) == one_by_one
        assert encode_images(images, encoding, threads=1) == one_by_one


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_a_batch_of_pngs_is_the_bytes_of_encoding_each(channels):
    from gensynth.data.codec import encode_pngs

    images = np.random.default_rng(channels).integers(0, 256, (5, 6, 11, channels), dtype=np.uint8)
    images[1] = 0  # compresses to much less than its neighbours
    assert encode_pngs(images) == [encode_png(image) for image in images]
    assert encode_pngs(images[:0]) == []
    with pytest.raises(ValueError, match="uint8 NxHxWxC"):
        encode_pngs(images.astype(np.int16))
