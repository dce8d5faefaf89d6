"""URLs -> files: local paths and s3://bucket/prefix (through fsspec), brace patterns, atomic writes.

A reader never sees a half-written file: on a folder we write `.<name>.tmp-<pid>-<rand>-<host>` and
rename; on S3 we write a local temporary file and upload it whole on success (an object appears on close).
Temporary names carry their writer's PID and host, so a later run can tell a killed writer's debris
from a live writer's file (`remove_debris`). An OSError while writing (full disk, quota, read-only file
system) becomes one StorageError line naming the file and what it is (`storage_errors`).
The S3 endpoint and credentials come from the standard AWS environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) and are never logged or stored in configs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import IO, Any

from gensynth.errors import GensynthError, StorageError, UsageError

log = logging.getLogger("gensynth")
REMOTE_SCHEMES = ("s3://",)
TMP_MARK = ".tmp-"  # temporary names carry this; listings skip them
HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
# `<TMP_MARK><pid>-<8 hex>-<host>` at the end of a temporary name (see owner_tag)
_OWNER = re.compile(rf"{re.escape(TMP_MARK)}(\d+)-[0-9a-f]{{8}}-([A-Za-z0-9._-]+)$")


def is_remote(url: str) -> bool:
    return str(url).startswith(REMOTE_SCHEMES)


def join(base: str, *names: str) -> str:
    """Join path parts for either a local path or a URL (always with '/')."""
    base = str(base)
    if is_remote(base):
        return "/".join([base.rstrip("/"), *[n.strip("/") for n in names]])
    return str(Path(base, *names))


def basename(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def parent(url: str) -> str:
    url = str(url).rstrip("/")
    if is_remote(url):
        return url.rsplit("/", 1)[0]
    return str(Path(url).parent)


READ_TIMEOUT_ENV = "GENSYNTH_S3_READ_TIMEOUT"
READ_TIMEOUT_S = 30.0  # an S3 request answers in well under a second; this bounds a silent (half-open) endpoint
S3_ATTEMPTS = 3  # botocore's standard retry mode: throttling, 5xx and time-outs, with backoff
S3FS_RETRIES = 2  # s3fs retries every call on top of botocore (its default 5: 5 x 3 x 60 s, 15 minutes a call)


def s3_read_timeout() -> float:
    """Seconds an S3 request may wait for an answer: $GENSYNTH_S3_READ_TIMEOUT, default READ_TIMEOUT_S."""
    raw = os.environ.get(READ_TIMEOUT_ENV, "")
    if not raw.strip():
        return READ_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:
        raise UsageError(f"{READ_TIMEOUT_ENV}={raw!r}: must be a number of seconds in (0, 3600] "
                         f"(default {READ_TIMEOUT_S:g})")
    return value


def s3_options() -> dict[str, Any]:
    """fsspec options for s3fs, from the environment only. Short time-outs so a dead endpoint fails fast; a
    silent one after S3FS_RETRIES x S3_ATTEMPTS read time-outs per call (a read makes two calls)."""
    opts: dict[str, Any] = {
        "config_kwargs": {"connect_timeout": 5, "read_timeout": s3_read_timeout(),
                          "retries": {"max_attempts": S3_ATTEMPTS, "mode": "standard"}},
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


def endpoint_description() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a remote URL."""
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - fsspec is a core dependency
        raise StorageError(f"fsspec is needed for {url}") from e
    if url.startswith("s3://"):
        try:
            import s3fs  # noqa: F401
        except ImportError:
            raise UsageError(f"{url}: S3 support is not installed; pip install 'gensynth[s3]'") from None
        fs, path = fsspec.core.url_to_fs(url, **s3_options())
        fs.retries = S3FS_RETRIES  # an instance attribute: s3fs reads self.retries on every call
        _without_expect_continue(fs)
        return fs, path
    return fsspec.core.url_to_fs(url)


def _drop_expect_continue(params: dict[str, Any], **_: Any) -> None:
    params.get("headers", {}).pop("Expect", None)


def _without_expect_continue(fs: Any) -> None:
    """botocore sends every file-like body with "Expect: 100-continue", and aiohttp waits for the "100
    Continue" with no time-out (no read is in flight for the read time-out to bound), so on a silent endpoint
    a write would hang for ever. Without the header the request is sent whole and the read time-out applies;
    all it saves is sending a body the store refuses."""
    client = fs.connect()  # s3fs's client, made once per filesystem instance
    client.meta.events.register_last("before-call.s3", _drop_expect_continue, unique_id="gensynth-no-expect")
    fs.session.register("before-call.s3", _drop_expect_continue, unique_id="gensynth-no-expect")  # later clients


@contextlib.contextmanager
def storage_errors(url: str, action: str, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn low-level I/O and network errors into one StorageError line: "cannot <action> <url>: why".

    `action` says what was being done, e.g. "write shard" or "write checkpoint step-000100 to". On any
    failure `cleanup` runs first (remove this writer's temporary files); its own errors are not
    reported, the first failure is the one the user needs to see.
    """
    try:
        yield
    except BaseException as e:
        if cleanup is not None:
            with contextlib.suppress(Exception):
                cleanup()
        error = e if isinstance(e, GensynthError) or not isinstance(e, Exception) \
            else _storage_error(url, action, e)
        if error is e:
            raise
        raise error from e


def _storage_error(url: str, action: str, e: Exception) -> Exception:
    if isinstance(e, FileNotFoundError):
        return StorageError(f"cannot {action} {url}: not found")
    if isinstance(e, PermissionError):
        return StorageError(f"cannot {action} {url}: permission denied")
    if isinstance(e, OSError) and e.errno is not None and not _is_network_error(e):
        why = os.strerror(e.errno)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            why += " (free some space there or write elsewhere; nothing half-written was kept)"
        elif e.errno == errno.EROFS:
            why += " (write elsewhere)"
        return StorageError(f"cannot {action} {url}: {why}")
    if not is_remote(url) and not _is_network_error(e):
        return e  # a bug, not the storage: keep its traceback
    where = f" (endpoint {endpoint_description()})" if is_remote(url) else ""
    if is_remote(url) and any(type(c).__name__ == "ReadTimeoutError" for c in _chain(e)):
        return StorageError(f"cannot {action} {url}{where}: no answer within {s3_read_timeout():g} s a request, "
                            f"retried (the endpoint accepts connections but does not respond; for a slow store "
                            f"raise {READ_TIMEOUT_ENV})")
    return StorageError(f"cannot {action} {url}{where}: {type(e).__name__}: {e}")


def _is_network_error(e: BaseException) -> bool:
    names = {type(c).__name__ for c in _chain(e)}
    return bool(names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                         "ConnectionError", "ReadTimeoutError", "ClientError", "NoCredentialsError"})


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def open_read(url: str, block_size: int = 8 << 20) -> IO[bytes]:
    """A binary file object for reading; caller closes it."""
    url = str(url)
    with storage_errors(url, "read"):
        if is_remote(url):
            fs, path = filesystem(url)
            return fs.open(path, "rb", block_size=block_size, cache_type="readahead")
        return open(url, "rb", buffering=1 << 20)


def read_bytes(url: str) -> bytes:
    with open_read(url) as f, storage_errors(url, "read"):
        return f.read()


def exists(url: str) -> bool:
    url = str(url)
    with storage_errors(url, "check"):
        if is_remote(url):
            fs, path = filesystem(url)
            fs.invalidate_cache(path)  # ask the store: another process may have added or removed it
            return fs.exists(path)
        return os.path.exists(url)


def listdir(url: str, temporary: bool = False) -> list[str]:
    """Names (not paths) directly inside a folder or prefix, sorted; temporary files are left out
    unless `temporary`."""
    url = str(url)
    with storage_errors(url, "list"):
        if is_remote(url):
            fs, path = filesystem(url)
            try:
                entries = fs.ls(path, detail=False, refresh=True)
            except FileNotFoundError:
                return []
            finally:
                fs.invalidate_cache(path)  # a cached listing would answer later exists() calls wrongly
            names = [basename(e) for e in entries]
        else:
            if not os.path.isdir(url):
                return []
            names = os.listdir(url)
    return sorted(n for n in names if temporary or TMP_MARK not in n)


def remove(url: str) -> None:
    url = str(url)
    with storage_errors(url, "remove"):
        if is_remote(url):
            fs, path = filesystem(url)
            if fs.exists(path):
                fs.rm(path)
        else:
            with contextlib.suppress(FileNotFoundError):  # gone already (another cleaner got there first)
                os.remove(url)


def makedirs(url: str) -> None:
    if not is_remote(url):
        with storage_errors(url, "create folder"):
            os.makedirs(url, exist_ok=True)


def remove_folder(url: str) -> None:
    """Remove an empty local folder (a no-op on S3, where a prefix with no objects does not exist)."""
    url = str(url)
    if not is_remote(url) and os.path.isdir(url):
        with storage_errors(url, "remove"):
            os.rmdir(url)


def move(src: str, dst: str) -> None:
    """Rename a stored file, replacing `dst`: os.replace on a folder (atomic), copy + delete on S3 (the
    copy happens inside the object store; `dst` appears whole)."""
    src, dst = str(src), str(dst)
    with storage_errors(dst, "write"):
        if is_remote(src):
            fs, src_path = filesystem(src)
            _, dst_path = filesystem(dst)
            fs.copy(src_path, dst_path)
            fs.rm(src_path)
            fs.invalidate_cache(dst_path)
        else:
            os.replace(src, dst)


def copy(src: str, dst: str) -> None:
    """The same bytes under a second name; `dst` is replaced whole, never seen half-written. On a folder
    a hard link (no data copied) renamed over `dst`, or a copy where links are not supported; on S3 a
    copy inside the object store."""
    src, dst = str(src), str(dst)
    if is_remote(src):
        with storage_errors(dst, "write"):
            fs, src_path = filesystem(src)
            _, dst_path = filesystem(dst)
            fs.copy(src_path, dst_path)
            fs.invalidate_cache(dst_path)
        return
    tmp = _temporary_name(dst)
    with storage_errors(dst, "write", cleanup=lambda: os.path.exists(tmp) and os.remove(tmp)):
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            with open_read(src) as f, atomic_write(dst) as out:  # no hard links here: copy the bytes
                shutil.copyfileobj(f, out, 1 << 20)
            return
        os.replace(tmp, dst)


def owner_tag() -> str:
    """`<pid>-<8 hex>-<host>`: what this process puts after TMP_MARK in the temporary names it makes."""
    return f"{os.getpid()}-{secrets.token_hex(4)}-{HOST}"


def _temporary_name(url: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(url)), f".{os.path.basename(url)}{TMP_MARK}{owner_tag()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, but alive
    try:  # a killed child its parent has not reaped yet is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_debris(name: str) -> bool:
    """Whether `name` is a temporary file whose writer is provably dead.

    The rule: the name ends in TMP_MARK + `<pid>-<rand>-<host>` (owner_tag), the host is this one and
    no process with that PID is alive here. A live writer's PID is alive, so its files are never taken;
    a dead writer's PID reused by another process only keeps the debris a while longer. Names from
    another host (a shared folder, S3) are left alone: their PIDs cannot be checked from here.
    """
    m = _OWNER.search(name)
    return bool(m) and m.group(2) == HOST and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1)))


def remove_debris(folder: str, keep: Collection[str] = ()) -> list[str]:
    """Remove the temporary files (and folders) in `folder` that killed writers left (see is_debris),
    except the names in `keep`; for an S3 folder also this host's local upload copies. Returns the names
    removed."""
    folder = str(folder)
    # list first, then check each PID: a name made after the listing is never looked at
    removed = [n for n in listdir(folder, temporary=True) if n not in keep and is_debris(n)]
    for name in removed:
        url = join(folder, name)
        with storage_errors(url, "remove"):
            if is_remote(url):
                fs, path = filesystem(url)
                fs.rm(path, recursive=True)
            elif os.path.isdir(url):
                shutil.rmtree(url, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(url)
    if is_remote(folder):
        local = tempfile.gettempdir()
        for name in os.listdir(local):
            if name.startswith(_UPLOAD_PREFIX) and is_debris(name):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(local, name))
    if removed:
        log.info("removed %d temporary files of killed runs from %s", len(removed), folder)
    return removed


_UPLOAD_PREFIX = "gensynth-upload-"


@contextlib.contextmanager
def atomic_write(url: str, action: str = "write", shown: str | None = None) -> Iterator[IO[bytes]]:
    """Write `url` so that it appears whole or not at all. On an exception nothing is published and
    the temporary file is removed; an OSError becomes one StorageError line, "cannot <action> <shown>"
    (`shown` defaults to `url`)."""
    url = str(url)
    shown = shown or url
    if is_remote(url):
        fs, path = filesystem(url)
        with tempfile.NamedTemporaryFile(prefix=_UPLOAD_PREFIX, suffix=TMP_MARK + owner_tag()) as tmp:
            # the local copy fails like a local file (a full /tmp); the caller's own errors pass as they are
            with storage_errors(tmp.name, f"{action} {shown} through its local copy"):
                yield tmp
                tmp.flush()
            with storage_errors(shown, action):
                fs.put_file(tmp.name, path)
                fs.invalidate_cache(path)
        return
    tmp_path = _temporary_name(url)

    def cleanup() -> None:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)

    with storage_errors(shown, action, cleanup=cleanup):
        os.makedirs(os.path.dirname(tmp_path), exist_ok=True)
        with open(tmp_path, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, url)


def write_bytes(url: str, data: bytes, action: str = "write") -> None:
    with atomic_write(url, action) as f:
        f.write(data)


def sha256_of(url: str) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a stored file, read in blocks."""
    h = hashlib.sha256()
    size = 0
    with open_read(url) as f, storage_errors(url, "read"):
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}")
MAX_EXPANDED = 1_000_000  # shards one pattern may name: a typo such as {0..99999999999} fails fast, not in memory


def expand_braces(pattern: str) -> list[str]:
    """Shell brace expansion with the braceexpand package (as webdataset does): `a-{000..002}.tar`,
    `{x,{1..2}}`, `{0..6..3}`, `{a..c}`; several groups multiply; a range keeps its zero padding."""
    from braceexpand import UnbalancedBracesError, braceexpand

    size = 1  # braceexpand builds a range whole: size the numeric ones first
    for lo, hi, step in _RANGE.findall(pattern):
        size *= abs(int(hi) - int(lo)) // max(abs(int(step or 1)), 1) + 1
    if size > MAX_EXPANDED:
        raise UsageError(f"{pattern!r} names more than {MAX_EXPANDED:,} shards; check its ranges")
    try:
        urls = list(itertools.islice(braceexpand(pattern), MAX_EXPANDED + 1))
    except UnbalancedBracesError:
        raise UsageError(f"unbalanced braces in {pattern!r}: e.g. train-{{000000..000009}}.tar") from None
    if len(urls) > MAX_EXPANDED:
        raise UsageError(f"{pattern!r} names more than {MAX_EXPANDED:,} shards; check its ranges")
    if any("{" in u or "}" in u for u in urls):
        raise UsageError(f"cannot expand the braces of {pattern!r}: use ranges {{000..009}}, {{0..6..3}}, {{a..c}} or "
                         "lists {a,b}")
    return urls


def register_webdataset_s3() -> None:
    """Let plain `webdataset` read and write s3:// URLs through the same fsspec set-up.

    webdataset 1.0.2 has no s3 handler of its own (docs/pitfalls.md).
    """
    import webdataset

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
        fs, path = filesystem(url)
        return fs.open(path, mode)

    webdataset.gopen_schemes["s3"] = gopen_s3
