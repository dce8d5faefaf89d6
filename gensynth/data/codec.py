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
import json
import os
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE = {1: 0, 3: 2, 2: 4, 4: 6}  # channels -> PNG colour type (grey, RGB, grey+alpha, RGBA)
_CHANNELS = {v: k for k, v in _COLOR_TYPE.items()}
# image fields a sample may hold (WebDataset names fields by extension); png and npy of our own take fast
# paths, every other one is read through Pillow
IMAGE_EXTENSIONS = ("png", "npy", "jpg", "jpeg", "webp", "ppm", "pgm", "pnm", "bmp", "tif", "tiff")
RESIZE_MODES = ("crop", "pad")  # shorter side to the size + centre crop, or longer side + black border
_IHDR = struct.Struct(">IIBBBBB")
_LENGTH = struct.Struct(">I")
_IEND_HEAD = b"\0\0\0\0IEND"  # an IEND chunk's length (0) and tag
ARRAY_DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64")
# The most pixels an image may have when no schema says its size: 4096x4096, 64 MiB at 4 channels (the
# tar reader's MAX_SAMPLE_BYTES). Checked against the header before any pixel data is inflated.
MAX_IMAGE_PIXELS = 1 << 24
# The most classes a label may index when no class list says how many (an unlabelled set, shards read
# without a manifest, a source without class names): more is a column of ids, not of classes.
MAX_CLASSES = 1 << 16


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
    ihdr = _IHDR.pack(w, h, 8, _COLOR_TYPE[c], 0, 0, 0)
    return b"".join([PNG_SIGNATURE, _chunk(b"IHDR", ihdr),
                     _chunk(b"IDAT", zlib.compress(rows.tobytes(), level)), _chunk(b"IEND", b"")])


_IDAT_CRC = zlib.crc32(b"IDAT")  # the chunk's CRC covers its tag: zlib.crc32(data, _IDAT_CRC) continues it
_IEND = _chunk(b"IEND", b"")


def encode_pngs(images: np.ndarray, level: int = 6) -> list[bytes]:
    """encode_png for each of a uint8 [n, H, W, C] batch, the same bytes: the rows' filter bytes for the
    whole batch in one numpy step and one header, so a thread spends its time in zlib (which releases the
    GIL) instead of in Python (bench/generate.py row (d) measures it)."""
    n, h, w, c = images.shape
    if images.dtype != np.uint8 or c not in _COLOR_TYPE:
        raise ValueError(f"expected uint8 NxHxWxC images with C in 1..4, got {images.dtype} {images.shape}")
    size = h * (1 + w * c)  # a row: its filter byte (0), then its pixels
    rows = np.zeros((n, h, 1 + w * c), dtype=np.uint8)
    rows[:, :, 1:] = images.reshape(n, h, w * c)
    pixels = memoryview(rows.reshape(-1))
    head = PNG_SIGNATURE + _chunk(b"IHDR", _IHDR.pack(w, h, 8, _COLOR_TYPE[c], 0, 0, 0))
    out = []
    for start in range(0, n * size, size):
        data = zlib.compress(pixels[start:start + size], level)
        out.append(b"".join((head, _LENGTH.pack(len(data)), b"IDAT", data,
                             _LENGTH.pack(zlib.crc32(data, _IDAT_CRC)), _IEND)))
    return out


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


_ENCODERS: Any = None  # one thread pool per process, made on first use
ENCODE_CHUNK = 64  # images per task: enough to amortise the hand-over, small enough to balance the threads


def encode_images(images: Any, encoding: str, threads: int | None = None) -> list[bytes]:
    """encode_image for many images on every core: zlib releases the GIL, so threads scale PNG encoding
    (bench/generate.py measures it); the bytes and their order are those of encoding one by one."""
    return [data for chunk in encode_chunks(images, encoding, threads) for data in chunk]


def encode_chunks(images: Any, encoding: str, threads: int | None = None) -> Iterator[list[bytes]]:
    """encode_images as it goes: the encodings of ENCODE_CHUNK images at a time, in order. Every chunk is
    handed to the threads before this returns, so a caller writes chunk i while the later ones encode."""
    global _ENCODERS
    workers = threads or os.cpu_count() or 1
    batched = encoding == "png" and isinstance(images, np.ndarray) and images.ndim == 4

    def encode(chunk: Any) -> list[bytes]:
        return encode_pngs(chunk) if batched else [encode_image(image, encoding) for image in chunk]

    chunks = [images[i:i + ENCODE_CHUNK] for i in range(0, len(images), ENCODE_CHUNK)]
    if workers == 1 or len(images) <= ENCODE_CHUNK:
        return (encode(chunk) for chunk in chunks)
    if _ENCODERS is None or _ENCODERS._max_workers != workers:
        from concurrent.futures import ThreadPoolExecutor

        _ENCODERS = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gensynth-encode")
    return _ENCODERS.map(encode, chunks)


def check_image_size(height: int, width: int, shape: tuple[int, ...] | None, what: str = "image") -> None:
    """Refuse an image (from its header, before decoding) that is not the schema's HxW (`shape`, e.g. the
    manifest's (H, W, C)) or, without a schema, has more than MAX_IMAGE_PIXELS."""
    if shape is not None:
        if (height, width) != tuple(shape[:2]):
            raise DecodeError(f"{what} header says {height}x{width} pixels (height x width), the set's schema "
                              f"says {shape[0]}x{shape[1]}")
    elif height * width > MAX_IMAGE_PIXELS:
        raise DecodeError(f"{what} header says {height}x{width} pixels (height x width), more than the "
                          f"{MAX_IMAGE_PIXELS} an image may have")


def png_scanlines(data: bytes, shape: tuple[int, ...] | None = None) -> tuple[bytes, tuple[int, int, int]] | None:
    """(inflated scanlines, (H, W, C)) of an 8-bit, non-interlaced PNG whose rows all use filter 0
    (ours): each row is a 0 byte then the pixels. None when Pillow is needed (other filters, palettes,
    16-bit, interlace). Raises DecodeError for bytes that are not a readable PNG.

    The header's size is checked first (see check_image_size), and the data is inflated to at most the
    bytes that size implies: a small PNG that would inflate to gigabytes is refused unread."""
    if data[:8] != PNG_SIGNATURE:
        raise DecodeError("not a PNG (bad signature)")
    try:
        width, height, depth, color, _, _, interlace = _IHDR.unpack_from(data, 16)
    except struct.error:
        raise DecodeError("PNG header is truncated") from None
    if data[12:16] == b"IHDR":
        check_image_size(height, width, shape, "PNG")
    if data[12:16] != b"IHDR" or depth != 8 or interlace != 0 or color not in _CHANNELS:
        return None
    length = _LENGTH.unpack_from(data, 33)[0] if len(data) >= 41 else 0
    if data[37:41] == b"IDAT" and data[45 + length:53 + length] == _IEND_HEAD:
        compressed = data[41:41 + length]  # one IDAT then IEND: our writer's layout, no chunk walk
    else:
        compressed = b"".join(_idat_chunks(data))
    c = _CHANNELS[color]
    stride = 1 + width * c
    expected = height * stride
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(compressed, expected + 1)  # one byte more than allowed tells "too much"
    except zlib.error as e:
        raise DecodeError(f"PNG data is corrupt: {e}") from None
    if len(raw) > expected:
        raise DecodeError(f"PNG data inflates to more than the {expected} bytes its {height}x{width} header "
                          "implies (the rest is not inflated)")
    if len(raw) != expected:
        raise DecodeError(f"PNG data holds {len(raw)} bytes, expected {expected}")
    if not inflate.eof:
        raise DecodeError("PNG data is corrupt: incomplete or truncated zlib stream")
    if raw[::stride].count(0) != height:  # some row is filtered: let Pillow undo it
        return None
    return raw, (height, width, c)


def decode_png(data: bytes, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """PNG bytes -> uint8 HxWxC: one zlib call and a reshape for ours, Pillow for any other PNG.
    `shape`: the size the set's schema allows (see check_image_size)."""
    fast = png_scanlines(data, shape)
    if fast is None:
        return decode_with_pillow(data, shape)
    raw, (h, w, c) = fast
    return np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + w * c)[:, 1:].reshape(h, w, c)


def _idat_chunks(data: bytes) -> list[bytes]:
    idat = []
    pos = 8
    while pos + 8 <= len(data):
        (length,) = _LENGTH.unpack_from(data, pos)
        tag = data[pos + 4:pos + 8]
        if tag == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + length])
        elif tag == b"IEND":
            break
        pos += 12 + length
    return idat


def _pillow_mode(img: Any) -> str:
    """The mode an image is read in: L, LA, RGB or RGBA (bilevel and 16-bit grey as L, palettes and CMYK as
    RGB, or RGBA when they carry transparency)."""
    if img.mode in ("L", "LA", "RGB", "RGBA"):
        return img.mode
    if img.mode in ("1", "I", "I;16", "I;16B", "I;16L", "F"):
        return "L"
    return "RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB"


_MODE_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def decode_with_pillow(data: bytes, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Any image Pillow reads -> uint8 HxWxC; its size is checked (check_image_size) before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            check_image_size(img.height, img.width, shape)
            mode = _pillow_mode(img)
            if img.mode.startswith("I") or img.mode == "F":  # 16-bit or float grey: scale to 8 bits, not clip
                wide = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") else max(float(wide.max()), 1.0)
                array = np.clip(wide * (255.0 / top), 0, 255).round().astype(np.uint8)
            else:
                array = np.asarray(img if img.mode == mode else img.convert(mode))
    except DecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DecodeError(f"cannot decode image: {e}") from None
    return as_hwc(array)


def image_header(data: bytes, ext: str) -> tuple[int, int, int]:
    """(H, W, C) of an encoded image as decode_image would return it, from its header alone."""
    if ext == "npy":
        parsed = _parse_npy_header(data)
        if parsed is None:
            return decode_npy(data).shape  # not one of ours: small enough to read whole (it is raw pixels)
        return parsed[1]
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width, _MODE_CHANNELS[_pillow_mode(img)]
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DecodeError(f"cannot read the image header: {e}") from None


def resize_image(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    """HxWxC uint8 -> size x size x C: "crop" scales the shorter side to `size` and cuts the centre, "pad"
    scales the longer side to `size` and centres the image on black (Lanczos resampling)."""
    h, w, c = image.shape
    if (h, w) == (size, size):
        return image
    from PIL import Image

    scale = size / (min(h, w) if mode == "crop" else max(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    squeezed = image[:, :, 0] if c == 1 else image
    scaled = np.asarray(Image.fromarray(squeezed).resize((nw, nh), Image.LANCZOS)).reshape(nh, nw, c)
    out = np.zeros((size, size, c), dtype=np.uint8)
    if mode == "crop":
        top, left = (nh - size) // 2, (nw - size) // 2
        return np.ascontiguousarray(scaled[top:top + size, left:left + size])
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = scaled
    return out


_NPY_HEADERS: dict[bytes, tuple[int, tuple[int, ...]]] = {}  # header bytes -> (data offset, shape)


def npy_pixels(data: bytes) -> tuple[memoryview, tuple[int, ...]] | None:
    """(the pixel bytes, shape) of a C-order uint8 npy image with a version-1 header, without copying;
    None for any other npy. A set's headers are all alike: each distinct one is parsed once (by numpy)
    and remembered, where np.load would re-parse every header (most of its cost on small images)."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10 or data[6] != 1:
        return None
    offset = 10 + int.from_bytes(data[8:10], "little")
    header = data[:offset]
    known = _NPY_HEADERS.get(header)
    if known is None:
        known = _parse_npy_header(data)
        if known is None:
            return None
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[header] = known
    offset, shape = known
    expected = 1
    for n in shape:
        expected *= n
    if len(data) - offset != expected:
        raise DecodeError(f"npy holds {len(data) - offset} data bytes, its header says shape {shape}")
    return memoryview(data)[offset:], shape


def decode_npy(data: bytes) -> np.ndarray:
    """npy bytes -> uint8 HxWxC; a remembered header and one frombuffer for ours, np.load otherwise."""
    fast = npy_pixels(data)
    if fast is not None:
        pixels, shape = fast
        return as_hwc(np.frombuffer(pixels, dtype=np.uint8).reshape(shape))
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DecodeError(f"cannot decode npy: {e}") from None
    if array.dtype != np.uint8:
        raise DecodeError(f"npy image must be uint8, got {array.dtype}")
    return as_hwc(array)


def _parse_npy_header(data: bytes) -> tuple[int, tuple[int, ...]] | None:
    """(data offset, shape) for a C-order uint8 array with a version-1 header; None for anything else."""
    f = io.BytesIO(data)
    try:
        np.lib.format.read_magic(f)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    except ValueError:
        return None
    if len(shape) == 2:
        shape = (*shape, 1)
    if dtype != np.uint8 or fortran or len(shape) != 3 or shape[2] not in _COLOR_TYPE:
        return None
    return f.tell(), tuple(shape)


def decode_image(data: bytes, ext: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """An image field -> uint8 HxWxC. `shape`: the set's (H, W, C), or None (then MAX_IMAGE_PIXELS):
    encoded images larger than that are refused before they are decoded."""
    if ext == "png":
        return decode_png(data, shape)
    if ext == "npy":
        return decode_npy(data)  # raw pixels: no bigger decoded than the bytes already read
    return decode_with_pillow(data, shape)


# ----------------------------------------------------------------------------------------------
# labels (the `cls` field: a class index as decimal text)


def _classes_text(num_classes: int | None, whose: str = "the set's") -> str:
    if num_classes is None:
        return f"a class index 0..{MAX_CLASSES - 1}"
    return f"one of {whose} {num_classes} classes (0..{num_classes - 1})"


def check_label(label: int, num_classes: int | None, whose: str = "the set's") -> int:
    """A class index in 0..num_classes-1 (num_classes None: below MAX_CLASSES), else DecodeError."""
    if not 0 <= label < (MAX_CLASSES if num_classes is None else num_classes):
        raise DecodeError(f"label {label} is not {_classes_text(num_classes, whose)}")
    return label


def decode_label(data: bytes | None, num_classes: int | None) -> int:
    """A sample's `cls` field -> its class index, checked as check_label does. A labelled set
    (num_classes given) needs the field; elsewhere a sample without one has label -1."""
    if data is None:
        if num_classes is not None:
            raise DecodeError(f"no cls field (a label), the set is labelled: expected {_classes_text(num_classes)}")
        return -1
    text = data.strip()
    if not (text.isdigit() and len(text) <= 9):  # bytes.isdigit: ASCII digits only; 9 of them fit any class count
        shown = text[:24].decode("ascii", "replace") + ("..." if len(text) > 24 else "")
        raise DecodeError(f"label {shown!r} is not {_classes_text(num_classes)}")
    return check_label(int(text), num_classes)


class LabelSpec:
    """Where a sample's label is: a field (`cls` by default) holding a class index or a class name as text, or a
    value inside the `json` field (`json.label`, `json.meta.class`): an index, or a name of `names`."""

    def __init__(self, key: str = "cls", names: list[str] | None = None):
        if not key or key.startswith(".") or key.endswith("."):
            raise ValueError(f"label key {key!r}: a field such as cls, or json.<path> such as json.label")
        self.key = key
        self.field, _, path = key.partition(".") if key.startswith("json.") else (key, "", "")
        self.path = path.split(".") if path else []
        self.names = {name: i for i, name in enumerate(names or [])}

    def describe(self) -> dict[str, Any]:
        return {"field": self.field, "path": self.path}

    def raw(self, fields: dict[str, bytes]) -> int | str | None:
        """The label as the sample holds it: a whole number, a text (an index or a class name), or None."""
        data = fields.get(self.field)
        if data is None or not self.path:
            return None if data is None else data.decode("utf-8", "replace").strip()
        try:
            value: Any = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise DecodeError(f"the {self.field} field is not JSON (label key {self.key})") from None
        for step in self.path:
            value = value.get(step) if isinstance(value, dict) else None
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if isinstance(value, str):
            return value.strip()
        raise DecodeError(f"label {str(value)[:24]!r} at {self.key} is not a class index or name")

    def read(self, fields: dict[str, bytes], num_classes: int | None) -> int:
        """The label (checked as check_label does); -1 when the sample has none and the set is unlabelled."""
        if self.field == "cls" and not self.names:
            return decode_label(fields.get("cls"), num_classes)  # the common case, kept lean
        value = self.raw(fields)
        if value is None:
            if num_classes is not None:
                raise DecodeError(f"no label at {self.key} (the set is labelled: expected "
                                  f"{_classes_text(num_classes)})")
            return -1
        if isinstance(value, str) and value in self.names:
            return check_label(self.names[value], num_classes)
        if isinstance(value, str):
            return decode_label(value.encode("utf-8", "replace"), num_classes)
        return check_label(value, num_classes)


# ----------------------------------------------------------------------------------------------
# non-image arrays (one npy field per array: `<name>.npy`)


def array_field(name: str) -> str:
    """The tar member extension an array called `name` is stored under: `codes` -> `codes.npy`."""
    return f"{name}.npy"


# `gensynth generate --relabel` stores a teacher's class probabilities as the array `soft` (soft.npy); loaders
# hand it out as batch["soft_label"], the name a training loop reads next to batch["label"].
SOFT_ARRAY = "soft"
SOFT_LABEL_KEY = "soft_label"


def batch_key(name: str) -> str:
    """The batch key of the array `name`: its own name, but soft -> soft_label."""
    return SOFT_LABEL_KEY if name == SOFT_ARRAY else name


def check_array_name(name: str) -> str:
    reserved = ("image", "label", "key", "meta", "cls", "json", SOFT_LABEL_KEY)
    if not name.isidentifier() or not name.islower() or name in reserved:
        raise ValueError(f"array name {name!r}: use a lower-case identifier that is not image, label, key, meta, "
                         f"cls, json or {SOFT_LABEL_KEY} (it becomes the field <name>.npy and the batch key; "
                         f"{SOFT_ARRAY} arrives as batch[{SOFT_LABEL_KEY!r}])")
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
