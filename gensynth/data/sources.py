"""Ingest sources: where samples come from before they become shards.

    idx:/usr/share/datasets/fashion-mnist      a folder with the standard MNIST file names (--split picks them)
    idx:IMAGES[.gz],LABELS[.gz]                 the two IDX files named
    folder:DIR                                  an image folder, one subfolder per class
    hf:PATH                                     a Hugging Face dataset saved with save_to_disk, or parquet files
    npz:FILE                                    numpy arrays (images N x H x W [x C], labels N)
    shards:DIR                                  an existing shard set (folder, s3:// prefix or manifest URL),
                                                e.g. to cut a K-per-class subset with --per-class K

Every source gives random access to records (so ingest can write them in a seeded order) and says
which file and record is at fault when something cannot be read.
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gensynth.data.codec import MAX_CLASSES, DecodeError, as_hwc, decode_label, decode_with_pillow
from gensynth.errors import InputDataError, UsageError

IDX_NAMES = {  # split -> (images, labels) base names, as published with MNIST and Fashion-MNIST
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Record:
    index: int  # position in the source
    image: np.ndarray  # uint8 H x W x C
    label: int | None
    meta: dict[str, Any] = field(default_factory=dict)


class Source:
    spec: str
    classes: list[str] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def record(self, i: int) -> Record:
        raise NotImplementedError

    def label(self, i: int) -> int | None:
        """The label of record i (sources that hold labels apart from images answer without decoding)."""
        return self.record(i).label

    def provenance(self) -> dict[str, Any]:
        raise NotImplementedError


def file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def open_source(spec: str, split: str = "train", image_column: str = "image", label_column: str | None = "label",
                class_names: list[str] | None = None, image_key: str | None = None,
                label_key: str | None = None) -> Source:
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise UsageError(f"source {spec!r} must be KIND:PATH with KIND one of idx, folder, hf, npz, shards "
                         "(e.g. idx:/usr/share/datasets/fashion-mnist)")
    if kind == "idx":
        source: Source = IdxSource(spec, rest, split)
    elif kind == "folder":
        source = FolderSource(spec, rest)
    elif kind == "hf":
        source = HFSource(spec, rest, split, image_column, label_column)
    elif kind == "npz":
        source = NpzSource(spec, rest, image_key, label_key)
    elif kind == "shards":
        source = ShardSetSource(spec, rest)
    else:
        raise UsageError(f"unknown source kind {kind!r} in {spec!r}: use idx:, folder:, hf:, npz: or shards:")
    if class_names is not None:
        source.classes = class_names
    return source


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} not found: {p}")
    return p


# ---------------------------------------------------------------------------------------------- idx


def _read_maybe_gzip(path: Path) -> tuple[bytes, bool]:
    """(contents, cut short?): gzip is undone as far as the stream goes, so that a download cut short
    is reported in records, like any truncated IDX file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputDataError(f"{path}: cannot read: {e.strerror or e}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw, False
    parts = []
    while raw:  # a gzip file may hold several members, one after the other
        stream = zlib.decompressobj(wbits=31)
        try:
            parts.append(stream.decompress(raw))
        except zlib.error as e:
            raise InputDataError(f"{path}: not a readable gzip file: {e}") from None
        if not stream.eof:
            return b"".join(parts), True
        raw = stream.unused_data
    return b"".join(parts), False


def read_idx(path: Path, expect_dims: int) -> np.ndarray:
    """An IDX file (gzip or not) as a uint8 array; errors name the file and the first incomplete record."""
    what = "images N x rows x cols" if expect_dims == 3 else "labels N"
    raw, cut = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expect_dims:
        if len(raw) >= 4 and raw[:3] == b"\0\0\x08" and raw[3] in (1, 3):
            raise InputDataError(f"{path}: IDX holds {raw[3]}-dimensional data, expected {expect_dims} ({what}); "
                                 "are the images and labels files swapped?")
        if len(raw) >= 4 and raw[:2] == b"\0\0":
            raise InputDataError(f"{path}: IDX data type 0x{raw[2]:02x} with {raw[3]} dimensions; gensynth reads "
                                 f"unsigned bytes (0x08) with {expect_dims} ({what}): magic 0x0000080{expect_dims}")
        raise InputDataError(f"{path}: not an IDX file: it starts with 0x{raw[:4].hex() or 'nothing'}, an IDX "
                             f"file of {what} starts with 0x0000080{expect_dims}")
    header = 4 + 4 * expect_dims
    if len(raw) < header:
        raise InputDataError(f"{path}: truncated inside the IDX header ({len(raw)} of {header} bytes)")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(expect_dims)]
    record = int(np.prod(dims[1:])) if expect_dims > 1 else 1
    body = len(raw) - header
    if body < dims[0] * record:
        complete = body // record
        raise InputDataError(f"{path}: truncated: the header says {dims[0]} records of {record} bytes, "
                             f"the file holds {complete} complete records (record {complete} is cut short"
                             f"{'; the gzip stream ends early' if cut else ''})")
    if cut:
        raise InputDataError(f"{path}: truncated: the gzip stream ends early (after all {dims[0]} records)")
    if body > dims[0] * record:
        raise InputDataError(f"{path}: {body - dims[0] * record} bytes after the last of {dims[0]} records "
                             "(the header's count is wrong, or two files were joined)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(folder: Path, base: str) -> Path:
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    raise UsageError(f"{folder}: no {base} or {base}.gz (an idx: folder holds the standard MNIST file names)")


class IdxSource(Source):
    def __init__(self, spec: str, rest: str, split: str):
        self.spec = spec
        if "," in rest:
            images_path, labels_path = (_existing(p, "IDX file") for p in rest.split(",", 1))
        else:
            folder = _existing(rest, "IDX folder")
            if split not in IDX_NAMES:
                raise UsageError(f"idx: folder {folder} has no split {split!r}; use --split train or --split test "
                                 "(or name the two files: idx:IMAGES,LABELS)")
            images_path, labels_path = (_find(folder, n) for n in IDX_NAMES[split])
        self.files = [images_path, labels_path]
        self.images = read_idx(images_path, 3)
        self.labels = read_idx(labels_path, 1)
        if len(self.images) != len(self.labels):
            raise InputDataError(f"{images_path} holds {len(self.images)} images but {labels_path} holds "
                                 f"{len(self.labels)} labels: they must match one to one")
        self.classes = [str(i) for i in range(int(self.labels.max()) + 1)] if len(self.labels) else []

    def __len__(self) -> int:
        return len(self.images)

    def record(self, i: int) -> Record:
        return Record(i, as_hwc(self.images[i]), int(self.labels[i]), {"source_index": i})

    def label(self, i: int) -> int | None:
        return int(self.labels[i])

    def provenance(self) -> dict[str, Any]:
        return {"source": self.spec, "files": [file_digest(p) for p in self.files]}


# ------------------------------------------------------------------------------------------- folder


class FolderSource(Source):
    def __init__(self, spec: str, rest: str):
        self.spec = spec
        self.root = _existing(rest, "image folder")
        class_dirs = sorted(d for d in self.root.iterdir() if d.is_dir())
        if not class_dirs:
            raise UsageError(f"{self.root}: no class subfolders (folder: expects DIR/<class>/<image files>)")
        self.classes = [d.name for d in class_dirs]
        self.items: list[tuple[Path, int]] = []
        for label, d in enumerate(class_dirs):
            files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            self.items.extend((p, label) for p in files)
        if not self.items:
            raise UsageError(f"{self.root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in its subfolders")
        self._digests: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    def record(self, i: int) -> Record:
        path, label = self.items[i]
        data = path.read_bytes()
        try:
            image = decode_with_pillow(data)
        except (DecodeError, ValueError) as e:
            raise InputDataError(f"{path}: cannot read image (record {i}): {e}") from None
        rel = str(path.relative_to(self.root))
        self._digests[rel] = hashlib.sha256(data).hexdigest()
        return Record(i, image, label, {"source_index": i, "path": rel})

    def provenance(self) -> dict[str, Any]:
        listing = "".join(f"{k}\t{v}\n" for k, v in sorted(self._digests.items()))
        return {"source": self.spec, "files": len(self.items),
                "content_sha256": hashlib.sha256(listing.encode()).hexdigest()}


# ----------------------------------------------------------------------------------------------- hf


class HFSource(Source):
    def __init__(self, spec: str, rest: str, split: str, image_column: str, label_column: str | None):
        import datasets

        self.spec = spec
        path = _existing(rest, "Hugging Face dataset")
        if path.is_dir() and not any(path.glob("*.parquet")):
            try:
                ds = datasets.load_from_disk(str(path))
            except (FileNotFoundError, ValueError) as e:
                raise UsageError(f"{path}: not a dataset saved with save_to_disk, "
                                 f"and no *.parquet files: {e}") from None
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UsageError(f"{path}: no split {split!r}; it has {', '.join(ds)}")
                ds = ds[split]
        else:
            files = sorted(str(p) for p in path.glob("*.parquet")) if path.is_dir() else [str(path)]
            try:
                ds = datasets.load_dataset("parquet", data_files={split: files}, split=split)
            except Exception as e:  # pyarrow and datasets raise many kinds; all mean "cannot read these files"
                raise InputDataError(f"{path}: cannot read as parquet: {type(e).__name__}: {e}") from None
        for col in [image_column] + ([label_column] if label_column else []):
            if col not in ds.column_names:
                raise UsageError(f"{path}: no column {col!r}; columns are {', '.join(ds.column_names)} "
                                 "(choose with --image-column / --label-column)")
        self.ds = ds
        self.image_column, self.label_column = image_column, label_column
        feature = ds.features.get(label_column) if label_column else None
        self.classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        self.fingerprint = getattr(ds, "_fingerprint", None)

    def __len__(self) -> int:
        return len(self.ds)

    def record(self, i: int) -> Record:
        row = self.ds[i]
        value = row[self.image_column]
        try:
            if isinstance(value, dict) and value.get("bytes") is not None:
                image = decode_with_pillow(value["bytes"])
            elif hasattr(value, "getbands"):  # a PIL image
                buf = io.BytesIO()
                value.save(buf, format="PNG")
                image = decode_with_pillow(buf.getvalue())
            else:
                image = as_hwc(np.asarray(value, dtype=np.uint8))
        except (DecodeError, ValueError, TypeError) as e:
            raise InputDataError(f"{self.spec}: record {i}: cannot read column {self.image_column!r} "
                                 f"as an image: {e}") from None
        label = None
        if self.label_column:
            value = row[self.label_column]
            try:
                label = int(value)
            except (TypeError, ValueError):
                raise InputDataError(f"{self.spec}: record {i}: label {value!r} in column {self.label_column!r} "
                                     "is not an integer class index") from None
        return Record(i, image, label, {"source_index": i})

    def provenance(self) -> dict[str, Any]:
        return {"source": self.spec, "fingerprint": self.fingerprint}


# ---------------------------------------------------------------------------------------------- npz


class NpzSource(Source):
    def __init__(self, spec: str, rest: str, image_key: str | None, label_key: str | None):
        self.spec = spec
        self.path = _existing(rest, "npz file")
        try:
            arrays = dict(np.load(self.path, allow_pickle=False))
        except (OSError, ValueError, EOFError) as e:
            raise InputDataError(f"{self.path}: cannot read as .npz: {e}") from None
        image_key = image_key or self._guess(arrays, lambda a: a.ndim in (3, 4), "images", "--image-key")
        label_key = label_key or self._guess(arrays, lambda a: a.ndim == 1, "labels", "--label-key", optional=True)
        for key in filter(None, [image_key, label_key]):
            if key not in arrays:
                raise UsageError(f"{self.path}: no array {key!r}; arrays are {', '.join(arrays)}")
        self.images = self._to_uint8(arrays[image_key], image_key)
        self.labels = arrays[label_key] if label_key else None
        if self.labels is not None:
            if not np.issubdtype(self.labels.dtype, np.integer):
                raise InputDataError(f"{self.path}: labels {label_key!r} must be integers, got {self.labels.dtype}")
            if len(self.labels) != len(self.images):
                raise InputDataError(f"{self.path}: {len(self.images)} images in {image_key!r} but "
                                     f"{len(self.labels)} labels in {label_key!r}: they must match one to one")
            # the classes are 0..largest label: refuse a label that would make that list absurd (or negative)
            bad = np.flatnonzero((self.labels < 0) | (self.labels >= MAX_CLASSES))
            if len(bad):
                raise InputDataError(f"{self.path}: record {bad[0]}: label {self.labels[bad[0]]} in {label_key!r} "
                                     f"is not a class index 0..{MAX_CLASSES - 1}")
            self.classes = [str(i) for i in range(int(self.labels.max()) + 1)] if len(self.labels) else []

    def _guess(self, arrays: dict, test: Any, what: str, flag: str, optional: bool = False) -> str | None:
        hits = [k for k, a in arrays.items() if test(a)]
        if len(hits) == 1:
            return hits[0]
        if not hits and optional:
            return None
        raise UsageError(f"{self.path}: cannot tell which array holds the {what} ({', '.join(arrays)}); "
                         f"name it with {flag}")

    def _to_uint8(self, a: np.ndarray, key: str) -> np.ndarray:
        if a.dtype == np.uint8:
            return a
        if np.issubdtype(a.dtype, np.floating) and a.size and a.min() >= 0 and a.max() <= 1.0:
            return np.round(a * 255).astype(np.uint8)  # floats in [0, 1]
        if a.size and (a.min() < 0 or a.max() > 255):
            raise InputDataError(f"{self.path}: {key!r} values lie in [{a.min()}, {a.max()}]; "
                                 "expected 0..255 (or floats in 0..1)")
        return np.round(a).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def record(self, i: int) -> Record:
        label = int(self.labels[i]) if self.labels is not None else None
        return Record(i, as_hwc(self.images[i]), label, {"source_index": i})

    def provenance(self) -> dict[str, Any]:
        return {"source": self.spec, "files": [file_digest(self.path)]}



# ------------------------------------------------------------------------------------------- shards


class ShardSetSource(Source):
    """Every sample of an existing shard set, in shard order (the manifest's), decoded once."""

    def __init__(self, spec: str, rest: str):
        from gensynth import storage
        from gensynth.data.codec import IMAGE_EXTENSIONS, decode_image
        from gensynth.data.manifest import manifest_sha256, read_manifest
        from gensynth.data.tario import CorruptShard, TruncatedShard, iter_samples

        self.spec = spec
        self.url = rest.rstrip("/")
        self.manifest = read_manifest(self.url)
        folder = storage.parent(self.url) if self.url.endswith(".json") else self.url
        self.sha256 = manifest_sha256(self.url)
        self.classes = self.manifest.classes
        from gensynth.data.stream import label_spec

        num_classes, shape = self.manifest.num_classes, self.manifest.image_shape
        if (self.manifest.schema.get("image") or {}).get("sizes"):
            shape = None  # images of several sizes (gensynth shard --resize makes them one)
        spec_of_label = label_spec(self.manifest.schema, self.manifest, None)
        field = (self.manifest.schema.get("image") or {}).get("field")
        order = (field, *IMAGE_EXTENSIONS) if field else IMAGE_EXTENSIONS
        self.records: list[tuple[str, np.ndarray, int | None, dict[str, Any]]] = []
        for shard in self.manifest.shards:
            url = storage.join(folder, shard.name)
            try:
                with storage.open_read(url) as f:
                    for key, fields in iter_samples(f):
                        ext = next((e for e in order if e in fields), None)
                        if ext is None:
                            raise InputDataError(f"{url}: sample {key} has no image field")
                        try:
                            image = decode_image(fields[ext], ext, shape)
                            if spec_of_label is not None:
                                label = spec_of_label.read(fields, num_classes)
                                label = None if label < 0 else label
                            else:
                                labelled = num_classes is not None or "cls" in fields
                                label = decode_label(fields.get("cls"), num_classes) if labelled else None
                            meta = json.loads(fields["json"]) if "json" in fields else {}
                        except (DecodeError, ValueError, RecursionError) as e:
                            raise InputDataError(f"{url}: sample {key}: {e}") from None
                        self.records.append((key, image, label, meta))
            except (TruncatedShard, CorruptShard) as e:
                raise InputDataError(f"{url}: {e} (check it: gensynth inspect {self.url} --verify)") from None
        if len(self.records) != self.manifest.num_samples:
            raise InputDataError(f"{self.url}: the shards hold {len(self.records)} samples, its manifest lists "
                                 f"{self.manifest.num_samples} (check it with `gensynth inspect {self.url} --verify`)")

    def __len__(self) -> int:
        return len(self.records)

    def record(self, i: int) -> Record:
        key, image, label, meta = self.records[i]
        return Record(i, image, label, {**meta, "source_key": key})

    def label(self, i: int) -> int | None:
        return self.records[i][2]

    def provenance(self) -> dict[str, Any]:
        return {"source": self.spec, "manifest_sha256": self.sha256, "samples": len(self.records),
                "source_provenance": self.manifest.provenance}
