"""Image encodings inside shards: PNG (portable) and npy (raw, fastest). Arrays are uint8 HxWxC.

A shard set may also carry non-image arrays, one npy field each (e.g. `codes.npy`: a VQ-VAE's int16
code grid); `encode_array` / `decode_array` write and read them, checked against the dtype and shape
that the manifest's schema records (`schema["arrays"]`).

Our PNG writer uses filter type 0 on every row, so decoding our own files is one zlib call and a
reshape; any other PNG (other filters, palettes, 16-bit) goes through Pillow. Both give the same
pixels: `decode_image(encode_png(a)) == a` and Pillow reads our files like any PNG.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE = {1: 0, 3: 2, 2: 4, 4: 6}  # channels -> PNG colour type (grey, RGB, grey+alpha, RGBA)
_CHANNELS = {v: k for k, v in _COLOR_TYPE.items()}
IMAGE_EXTENSIONS = ("png", "npy", "jpg", "jpeg")
ARRAY_DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64")


class DecodeError(ValueError):
    """The bytes are not an image of a kind we can read."""


def as_hwc(image: np.ndarray) -> np.ndarray:
    """HxW or HxWxC uint8 -> HxWxC (C in 1, 3, 4)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in _COLOR_TYPE or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxW or HxWxC image with C in 1..4, got {image.dtype} {image.shape}")
    return image


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray, level: int = 6) -> bytes:
    """PNG bytes, filter 0 on every row; repeatable for the same pixels and zlib level."""
    image = as_hwc(image)
    h, w, c = image.shape
    rows = np.zeros((h, 1 + w * c), dtype=np.uint8)
    rows[:, 1:] = image.reshape(h, w * c)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPE[c], 0, 0, 0)
    return b"".join([PNG_SIGNATURE, _chunk(b"IHDR", ihdr),
                     _chunk(b"IDAT", zlib.compress(rows.tobytes(), level)), _chunk(b"IEND", b"")])


def encode_npy(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(as_hwc(image)), allow_pickle=False)
    return buf.getvalue()


def encode_image(image: np.ndarray, encoding: str) -> bytes:
    if encoding == "png":
        return encode_png(image)
    if encoding == "npy":
        return encode_npy(image)
    raise ValueError(f"unknown image encoding {encoding!r}: use png or npy")


def decode_png(data: bytes) -> np.ndarray:
    """Fast path for 8-bit, non-interlaced, unfiltered PNGs (ours); Pillow for everything else."""
    if data[:8] != PNG_SIGNATURE:
        raise DecodeError("not a PNG (bad signature)")
    try:
        width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    except struct.error:
        raise DecodeError("PNG header is truncated") from None
    if data[12:16] == b"IHDR" and depth == 8 and interlace == 0 and color in _CHANNELS:
        idat = []
        pos = 8
        while pos + 8 <= len(data):
            (length,) = struct.unpack(">I", data[pos:pos + 4])
            tag = data[pos + 4:pos + 8]
            if tag == b"IDAT":
                idat.append(data[pos + 8:pos + 8 + length])
            elif tag == b"IEND":
                break
            pos += 12 + length
        try:
            raw = zlib.decompress(b"".join(idat))
        except zlib.error as e:
            raise DecodeError(f"PNG data is corrupt: {e}") from None
        c = _CHANNELS[color]
        stride = 1 + width * c
        if len(raw) != height * stride:
            raise DecodeError(f"PNG data holds {len(raw)} bytes, expected {height * stride}")
        rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride)
        if not rows[:, 0].any():
            return rows[:, 1:].reshape(height, width, c)
    return decode_with_pillow(data)


def decode_with_pillow(data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode not in ("L", "RGB", "RGBA", "LA"):
                img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
            array = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"cannot decode image: {e}") from None
    return as_hwc(array)


def decode_npy(data: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DecodeError(f"cannot decode npy: {e}") from None
    if array.dtype != np.uint8:
        raise DecodeError(f"npy image must be uint8, got {array.dtype}")
    return as_hwc(array)


def decode_image(data: bytes, ext: str) -> np.ndarray:
    if ext == "png":
        return decode_png(data)
    if ext == "npy":
        return decode_npy(data)
    return decode_with_pillow(data)


# ----------------------------------------------------------------------------------------------
# non-image arrays (one npy field per array: `<name>.npy`)


def array_field(name: str) -> str:
    """The tar member extension an array called `name` is stored under: `codes` -> `codes.npy`."""
    return f"{name}.npy"


def check_array_name(name: str) -> str:
    if not name.isidentifier() or not name.islower() or name in ("image", "label", "key", "meta", "cls", "json"):
        raise ValueError(f"array name {name!r}: use a lower-case identifier that is not image, label, key, meta, "
                         "cls or json (it becomes the field <name>.npy and the batch key)")
    return name


def encode_array(array: np.ndarray) -> bytes:
    """npy bytes of a numeric array (never pickled)."""
    array = np.asarray(array)
    if array.dtype.name not in ARRAY_DTYPES:
        raise ValueError(f"array dtype {array.dtype} is not allowed; use one of {', '.join(ARRAY_DTYPES)}")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_array(data: bytes, dtype: str, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """An npy field, checked against the schema's dtype and shape."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DecodeError(f"cannot decode npy: {e}") from None
    if array.dtype.name != dtype:
        raise DecodeError(f"array is {array.dtype}, the set's schema says {dtype}")
    if tuple(array.shape) != tuple(shape):
        raise DecodeError(f"array has shape {tuple(array.shape)}, the set's schema says {tuple(shape)}")
    return array
