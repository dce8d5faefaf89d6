"""WebDataset tar shards: a repeatable writer and a fast streaming reader.

A sample is the run of consecutive tar members that share a key: `train-00000042.png`,
`train-00000042.cls`, `train-00000042.json` (the WebDataset convention: key = path up to the
first dot of the file name). Members are written with mtime=0, uid/gid 0 and mode 0444, in
sorted extension order, so the same samples give the same bytes.

The reader parses the 512-byte headers itself (ustar, pax and GNU long names): about three times
faster than `tarfile` on small members, and it tells a truncated shard from a complete one.
"""

from __future__ import annotations

import io
import mmap
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import IO

import numpy as np

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # type flags of regular files
# The most bytes one sample (all its members, headers included) may hold. A sample is one training
# example (a 28x28 PNG is under 1 kB; a 4096x4096 RGBA image, 64 MiB raw, is far beyond what gensynth
# trains on), so a header that claims more is damage or a crafted file, never read into memory.
MAX_SAMPLE_BYTES = 64 << 20


class TruncatedShard(Exception):
    """The tar stream ended inside a member, or before its end-of-archive marker."""


class CorruptShard(Exception):
    """A tar header failed its checksum or could not be parsed."""


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    """The header's byte sum (its checksum field counted as 8 spaces) equals the stored checksum.

    Compared modulo 65521 through zlib's adler32, whose low half is 1 + the byte sum mod 65521: one C
    call instead of a Python loop over 512 bytes (it was a fifth of the reader's time). A damaged
    header passes only if its sum moved by exactly 65521.
    """
    field = header[148:156]
    try:
        stored = int(field[:6], 8) if field[6] == 0 else _octal(field)  # tarfile writes "%06o\0 "
    except ValueError:
        return False
    return ((zlib.adler32(header) & 0xFFFF) - 1 - sum(field) + 256 - stored) % 65521 == 0


def _size(header: bytes) -> int:
    try:
        return int(header[124:135], 8)  # the usual 11 octal digits + NUL
    except ValueError:
        return _octal(header[124:136])


def _checked_size(header: bytes) -> int:
    """The member size a header claims, after its checksum and bounds are checked (CorruptShard if not)."""
    if not _checksum_ok(header):
        raise CorruptShard("tar header checksum mismatch")
    try:
        size = _size(header)
    except ValueError:
        raise CorruptShard("tar header has an unreadable size field") from None
    if not 0 <= size <= MAX_SAMPLE_BYTES:
        raise CorruptShard(f"tar header of {_header_name(header)!r} claims {size} bytes; a member holds "
                           f"0..{MAX_SAMPLE_BYTES} (the most one sample may hold)")
    return size


def _member_name(header: bytes, data: bytes, size: int, pending_name: str | None) -> tuple[str | None, str | None]:
    """(the name of a regular file member or None, the long name the next member takes from a pax/GNU header)."""
    kind = header[156:157]
    try:
        if kind in _REGULAR:
            if pending_name is not None:
                return pending_name, None
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            if header[257:262] == b"ustar" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
            return name, None
        if kind == b"x":
            return None, _pax_path(data[:size]) or pending_name
        if kind == b"L":
            return None, data[:size].split(b"\0", 1)[0].decode("utf-8")
    except ValueError as e:  # a name that is not UTF-8, pax records that do not parse
        raise CorruptShard(f"tar header of {_header_name(header)!r} is unreadable: {e}") from None
    return None, pending_name  # directories, links, global pax headers: nothing to yield


def iter_members(f: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in the tar stream, in order.

    A member whose header claims more than MAX_SAMPLE_BYTES (or a negative size) is a CorruptShard,
    raised before anything is read: a crafted header cannot make the reader allocate its claim."""
    pending_name: str | None = None
    read = f.read
    while True:
        header = read(BLOCK)
        if len(header) < BLOCK:
            raise TruncatedShard("stream ended before the end-of-archive marker")
        if header == _ZERO_BLOCK:
            return
        try:  # _checked_size's checks with no call on the good path: this loop runs for every member
            size = _size(header)
        except ValueError:
            size = -1
        if not 0 <= size <= MAX_SAMPLE_BYTES or not _checksum_ok(header):
            size = _checked_size(header)  # raises, saying what is wrong
        padded = (size + BLOCK - 1) & ~(BLOCK - 1)
        data = read(padded)
        if len(data) < padded:
            raise TruncatedShard("stream ended inside a member")
        if pending_name is None and header[156:157] in _REGULAR and (header[345] == 0 or header[257:262] != b"ustar"):
            try:  # the usual member (no long name, no prefix), inline
                name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            except ValueError as e:
                raise CorruptShard(f"tar header of {_header_name(header)!r} is unreadable: {e}") from None
        else:
            name, pending_name = _member_name(header, data, size, pending_name)
        if name is not None:
            yield name, data[:size] if size != padded else data


def skip_samples(f: IO[bytes], count: int) -> int:
    """Pass over the first `count` samples of a tar stream, reading only their headers (checked) where `f`
    can seek, and leave `f` at the first header of the next sample. Returns the samples passed over: fewer
    at the end of the archive, none when `f` cannot seek (the caller then reads through them). A loader
    worker whose share starts inside a shard starts there without decoding the samples before it.

    Plain ustar headers (no long names, no pax records: every shard gensynth writes) are checked and
    followed in bulk with numpy, a chunk at a time; the first other header hands over to the exact loop.
    Header by header in Python, skipping took as long as reading the samples through; in bulk it takes half
    (bench/skip.py)."""
    if count <= 0 or not f.seekable():
        return 0
    key = b""  # the key of the last sample begun (b"": none yet; a key is never empty)
    passed = -1  # samples begun so far, minus one
    mapped = _mapped(f)  # a local file's bytes where they lie: no copy, no fresh pages
    chunk_size = min(1 << 16, _SKIP_CHUNK)  # grows: a short skip reads little, a long one large chunks
    while True:
        offset = f.tell()
        if mapped is None:
            chunk = f.read(chunk_size)
        else:
            chunk = mapped[offset:offset + chunk_size]
        chunk_size = min(chunk_size * 4, _SKIP_CHUNK)
        starts, keys, stop = _plain_headers(chunk)
        if len(starts):
            begins = np.empty(len(starts), dtype=bool)  # a header that begins a new sample
            begins[0] = bytes(keys[0]).rstrip(b"\0") != key
            begins[1:] = (keys[1:] != keys[:-1]).any(axis=1)
            first = np.flatnonzero(begins)
            if passed + len(first) >= count:  # the sample after the skipped ones begins in this chunk
                f.seek(offset + int(starts[first[count - passed - 1]]))
                return count
            passed += len(first)
            key = bytes(keys[-1]).rstrip(b"\0")
        f.seek(offset + stop)
        if stop + BLOCK <= len(chunk) or len(chunk) < BLOCK:
            # a header the bulk path does not take (end marker, pax, long name, damage) or the stream's end:
            # header by header from there, which also says what is wrong
            return _skip_exact(f, count, key.decode("utf-8") if key else None, passed)


def _mapped(f: IO[bytes]) -> memoryview | None:
    """The whole of a local file, memory-mapped read-only; None for any other stream (S3, in memory, empty)."""
    try:
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _skip_exact(f: IO[bytes], count: int, key: str | None, passed: int) -> int:
    """skip_samples' header-by-header loop, from a header of `f`, `passed` samples begun, the last `key`."""
    seek = f.seek
    offset = f.tell()
    group_start = offset  # where the current member's headers begin (a pax header comes first)
    pending_name: str | None = None
    while True:
        header = f.read(BLOCK)
        if len(header) < BLOCK:
            raise TruncatedShard("stream ended before the end-of-archive marker")
        if header == _ZERO_BLOCK:
            seek(offset)  # the reader after us sees the end marker
            return passed + 1
        size = _checked_size(header)
        padded = (size + BLOCK - 1) & ~(BLOCK - 1)
        if header[156:157] in (b"x", b"L"):  # long names: their data is needed
            data = f.read(padded)
            if len(data) < padded:
                raise TruncatedShard("stream ended inside a member")
        else:
            data = b""
            seek(padded, 1)
        name, pending_name = _member_name(header, data, size, pending_name)
        offset += BLOCK + padded
        if name is None:
            continue
        dot = name.find(".", name.rfind("/") + 1)  # the key rule of iter_samples
        k = name[:dot] if dot >= 0 else name
        if k != key:
            key, passed = k, passed + 1
            if passed == count:
                seek(group_start)
                return count
        group_start = offset


_SKIP_CHUNK = 8 << 20  # the most skip_samples reads at once
_OCTAL_WEIGHTS = 8 ** np.arange(10, -1, -1, dtype=np.int64)
_NAME_INDEX = np.arange(100, dtype=np.uint8)


def _plain_headers(chunk: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    """The run of plain ustar headers at the start of `chunk` (which begins with a header), followed member to
    member: (their byte offsets, their keys as zero-padded byte rows, the offset after the run). A plain
    header has an 11-digit octal size within bounds, a valid checksum in the form tarfile or GNU tar writes, a
    regular-file type, no ustar prefix and an ASCII name; the run ends at the first other header (or the
    end-of-archive marker) or where the chunk does. The key rule is iter_samples': the name up to the first dot
    after its last slash."""
    blocks = np.frombuffer(chunk, np.uint8, count=len(chunk) // BLOCK * BLOCK).reshape(-1, BLOCK)
    digits = blocks[:, 124:135].astype(np.int64) - 48
    sized = ((digits >= 0) & (digits <= 7)).all(axis=1) & (blocks[:, 135] == 0)
    sizes = digits @ _OCTAL_WEIGHTS
    sized &= sizes <= MAX_SAMPLE_BYTES
    hops = np.where(sized, 1 + (sizes + BLOCK - 1) // BLOCK, 0).tolist()
    chain = []
    i = 0
    while i < len(hops) and hops[i]:  # the one sequential step: each header says where the next one is
        chain.append(i)
        i += hops[i]
    heads = blocks[chain]
    check = heads[:, 148:156].astype(np.int64)
    six = (check[:, 6] == 0) & (check[:, 7] == 32)  # "%06o\0 " as tarfile writes it, else GNU tar's "%07o\0"
    octal = np.where(six[:, None], np.concatenate([np.full_like(check[:, :1], 48), check[:, :6]], axis=1),
                     check[:, :7]) - 48
    stored = octal @ _OCTAL_WEIGHTS[-7:]
    width = int(np.flatnonzero(heads[:, :100].any(axis=0))[-1]) + 1 if len(chain) else 0  # names are NUL-padded
    names = heads[:, :width]
    good = (((octal >= 0) & (octal <= 7)).all(axis=1) & (six | (check[:, 7] == 0))
            & (heads.sum(axis=1, dtype=np.uint32).astype(np.int64) - check.sum(axis=1) + 8 * 32 == stored)
            & np.isin(heads[:, 156], (48, 0, 55))  # "0", NUL, "7": regular files
            & ((heads[:, 345] == 0) | (heads[:, 257:262] != np.frombuffer(b"ustar", np.uint8)).any(axis=1))
            & (names < 128).all(axis=1) & (heads[:, 0] != 0))
    bad = np.flatnonzero(~good)
    n = int(bad[0]) if len(bad) else len(chain)
    stop = chain[n] * BLOCK if n < len(chain) else i * BLOCK
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty((0, width), dtype=np.uint8), stop
    names, index = names[:n], _NAME_INDEX[:width]
    ends = names == 0
    length = np.where(ends.any(axis=1), ends.argmax(axis=1), width)  # the name is NUL-terminated
    dots = names == 46
    slashes = (names == 47) & (index < length[:, None])
    if slashes.any():  # the key's dot comes after the name's last slash
        last = np.where(slashes.any(axis=1), width - 1 - slashes[:, ::-1].argmax(axis=1), -1)
        dots &= index > last[:, None]
    dot = np.minimum(np.where(dots.any(axis=1), dots.argmax(axis=1), width), length)
    keys = names * (index < dot[:, None])
    return np.asarray(chain[:n], dtype=np.int64) * BLOCK, keys, stop


def _header_name(header: bytes) -> str:
    """A header's own name field, for messages (never fails)."""
    return header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")


def _pax_path(records: bytes) -> str | None:
    pos = 0
    path = None
    while pos < len(records):
        space = records.index(b" ", pos)
        length = int(records[pos:space])
        if length <= space - pos:  # a record is "LENGTH KEY=VALUE\n", LENGTH counting itself: it moves on
            raise ValueError(f"pax record length {length} at offset {pos}")
        key, _, value = records[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def iter_samples(f: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample; members of one key must be consecutive. A sample whose
    members (headers included) hold more than MAX_SAMPLE_BYTES is a CorruptShard."""
    key: str | None = None
    fields: dict[str, bytes] = {}
    held = 0  # bytes of the current sample's members, headers included
    for name, data in iter_members(f):
        dot = name.find(".", name.rfind("/") + 1)  # WebDataset's rule: key = up to the first dot of the basename
        k, ext = (name[:dot], name[dot + 1:]) if dot >= 0 else (name, "")
        if k != key:
            if key is not None:
                yield key, fields
            key, fields, held = k, {}, 0
        held += BLOCK + len(data)
        if held > MAX_SAMPLE_BYTES:
            raise CorruptShard(f"sample {k} holds more than {MAX_SAMPLE_BYTES} bytes (the most one sample may hold)")
        fields[ext] = data
    if key is not None:
        yield key, fields


def count_samples(f: IO[bytes]) -> int:
    """Number of samples in a shard, reading headers (data is read past, never decoded)."""
    return sum(1 for _ in iter_samples(f))


def _ustar_template() -> tuple[bytes, int]:
    """The fields every header of ours shares (mode 0444, owner 0, mtime 0, regular file, ustar magic), name
    and size left zero, and the byte sum of that template with its checksum field counted as spaces."""
    header = bytearray(BLOCK)
    header[100:108] = b"0000444\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[136:148] = b"00000000000\0"
    header[148:156] = b"        "  # the checksum counts its own field as spaces
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    return bytes(header), sum(header)


_USTAR_TEMPLATE, _USTAR_TEMPLATE_SUM = _ustar_template()


_HEADER_OWNER = _USTAR_TEMPLATE[100:124]  # the template's fields between the name and the size...
_HEADER_MTIME = _USTAR_TEMPLATE[124 + 12:148]  # ...between the size and the checksum...
_HEADER_REST = _USTAR_TEMPLATE[156:]  # ...and after the checksum


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file, exactly as `tarfile` writes it for our members (mode
    0444, owner 0, mtime 0, empty user/group names), built from a template: the checksum is the template's
    sum plus the bytes of the name and size, so a header costs two short sums and one join instead of 512
    bytes' worth."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"member name {name!r} is longer than 100 bytes")
    if size >= 8**11:
        raise ValueError(f"member {name!r} is {size} bytes, more than a ustar header can hold")
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_USTAR_TEMPLATE_SUM + sum(encoded) + sum(size_field))
    return b"".join((encoded, _ZERO_BLOCK[:100 - len(encoded)], _HEADER_OWNER, size_field, _HEADER_MTIME, checksum,
                     _HEADER_REST))


_TEMPLATE_ROW = np.frombuffer(_USTAR_TEMPLATE, dtype=np.uint8)
_SIZE_SHIFTS = 3 * np.arange(10, -1, -1)  # the 11 octal digits of the size field, most significant first
_CHECKSUM_SHIFTS = 3 * np.arange(5, -1, -1)  # the checksum's 6 octal digits


def ustar_headers(names: Sequence[str], sizes: Sequence[int]) -> np.ndarray:
    """ustar_header for many members at once: uint8 [n, 512], row i the header of (names[i], sizes[i]).
    Names of one byte length (a generation job's keys) are filled in with one numpy assignment per field;
    others fall back to ustar_header row by row."""
    encoded = [name.encode("utf-8") for name in names]
    sizes = np.asarray(sizes, dtype=np.int64)
    length = len(encoded[0]) if encoded else 0
    if encoded and all(len(e) == length for e in encoded) and length <= 100 and (sizes < 8**11).all():
        return _ustar_rows(np.frombuffer(b"".join(encoded), dtype=np.uint8).reshape(len(encoded), length), sizes)
    return np.frombuffer(b"".join([ustar_header(n, int(s)) for n, s in zip(names, sizes)]),
                         dtype=np.uint8).reshape(len(encoded), BLOCK)


def _ustar_rows(names: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The headers of members named by the rows of uint8 [n, L] (L <= 100) with sizes < 8**11."""
    headers = np.empty((len(names), BLOCK), dtype=np.uint8)
    headers[:] = _TEMPLATE_ROW
    headers[:, :names.shape[1]] = names
    digits = ((sizes[:, None] >> _SIZE_SHIFTS) & 7) + ord("0")
    headers[:, 124:135] = digits
    checksum = _USTAR_TEMPLATE_SUM + names.sum(axis=1, dtype=np.int64) + digits.sum(axis=1)
    headers[:, 148:154] = ((checksum[:, None] >> _CHECKSUM_SHIFTS) & 7) + ord("0")
    headers[:, 154] = 0
    headers[:, 155] = ord(" ")
    return headers


def _same_length_bytes(keys: Sequence[str]) -> np.ndarray | None:
    """The keys' UTF-8 bytes as uint8 [n, L] when they all have one length L, else None."""
    encoded = [key.encode("utf-8") for key in keys]
    length = len(encoded[0])
    if any(len(e) != length for e in encoded):
        return None
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).reshape(len(encoded), length)


_BATCH_BUFFER = threading.local()  # write_many's blocks, one buffer per thread
KEPT_BLOCKS = 1 << 15  # 16 MiB: a generation batch (512 samples of a few blocks) fits many times over
RECORD = 20 * BLOCK  # tarfile pads an archive to a multiple of its record size


class TarShardWriter:
    """Writes samples into one tar stream, repeatably (mtime 0, fixed owner and mode, sorted fields).
    The bytes equal what `tarfile` writes in USTAR format for the same members (tested)."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self._offset = 0
        self.count = 0

    def _put(self, data: bytes) -> None:
        self._f.write(data)
        self._offset += len(data)

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"sample key {key!r} must not contain a dot")
        parts = []  # one write per sample: the file below may hash and count every call
        size = 0
        for ext in sorted(fields):
            data = fields[ext]
            n = len(data)
            parts += (ustar_header(f"{key}.{ext}", n), data, _ZERO_BLOCK[:-n % BLOCK])
            size += BLOCK + n
        if size > MAX_SAMPLE_BYTES:  # the reader would refuse it (see iter_samples)
            raise ValueError(f"sample {key!r} holds {size} bytes, more than the {MAX_SAMPLE_BYTES} one sample may hold")
        self._put(b"".join(parts))
        self.count += 1

    def write_many(self, keys: Sequence[str], fields: Mapping[str, Sequence[bytes]]) -> None:
        """`write(keys[i], {ext: fields[ext][i] for ext in fields})` for every i, in one write: the same
        bytes, laid out in one reused buffer of blocks: the headers of a field for all samples in one numpy
        assignment, each value copied once into its place (write's Python and copies per sample were a large
        share of a generation job's CPU beside PNG encoding: bench/generate.py --fast, row d)."""
        n = len(keys)
        if n == 0:
            return
        bad = [key for key in keys if "." in key.rsplit("/", 1)[-1]]
        if bad:
            raise ValueError(f"sample key {bad[0]!r} must not contain a dot")
        exts = sorted(fields)
        sizes = {ext: np.fromiter(map(len, fields[ext]), dtype=np.int64, count=n) for ext in exts}
        total = sum(BLOCK + s for s in sizes.values())
        if int(total.max()) > MAX_SAMPLE_BYTES:  # the reader would refuse it (see iter_samples)
            i = int(total.argmax())
            raise ValueError(f"sample {keys[i]!r} holds {int(total[i])} bytes, more than the {MAX_SAMPLE_BYTES} one "
                             "sample may hold")
        blocks = {ext: 1 + (sizes[ext] + BLOCK - 1) // BLOCK for ext in exts}  # a header, then the padded value
        per_sample = sum(blocks.values())
        at = np.cumsum(per_sample) - per_sample  # the block each sample starts at
        out = self._blocks(int(per_sample.sum()))
        flat = memoryview(out.reshape(-1))
        key_bytes = _same_length_bytes(keys)
        for ext in exts:
            suffix = np.frombuffer(f".{ext}".encode(), dtype=np.uint8)
            if key_bytes is not None and key_bytes.shape[1] + len(suffix) <= 100 and int(sizes[ext].max()) < 8**11:
                names = np.concatenate([key_bytes, np.broadcast_to(suffix, (n, len(suffix)))], axis=1)
                out[at] = _ustar_rows(names, sizes[ext])
            else:  # keys of several lengths; ustar_header refuses a name too long
                out[at] = ustar_headers([f"{key}.{ext}" for key in keys], sizes[ext])
            for start, value in zip(((at + 1) * BLOCK).tolist(), fields[ext]):
                flat[start:start + len(value)] = value
            at = at + blocks[ext]
        self._put(flat)
        self.count += n

    @staticmethod
    def _blocks(count: int) -> np.ndarray:
        """`count` zeroed blocks, uint8 [count, 512], in a buffer this thread keeps from one batch (and
        shard) to the next: a fresh one per batch cost a page fault every 4 KiB."""
        buffer = getattr(_BATCH_BUFFER, "blocks", None)
        if buffer is None or len(buffer) < count:
            buffer = np.zeros((count, BLOCK), dtype=np.uint8)
            if count <= KEPT_BLOCKS:  # a batch of large samples gets its own, not kept
                _BATCH_BUFFER.blocks = buffer
            return buffer
        out = buffer[:count]
        out[:] = 0
        return out

    def close(self) -> None:
        """Write the end-of-archive marker; the caller closes the file (tarfile does not own it)."""
        end = self._offset + 2 * BLOCK
        self._put(bytes(2 * BLOCK + (-end) % RECORD))
