"""URLs -> files: local paths and s3://bucket/prefix (through fsspec), brace patterns, atomic writes.

A reader never sees a half-written file: on a folder we write `.<name>.tmp-<pid>-<rand>` and rename;
on S3 we write a local temporary file and upload it whole on success (an object appears on close).
The S3 endpoint and credentials come from the standard AWS environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) and are never logged or stored in configs.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from gensynth.errors import StorageError, UsageError

REMOTE_SCHEMES = ("s3://",)
TMP_MARK = ".tmp-"  # temporary names carry this; listings skip them


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


def s3_options() -> dict[str, Any]:
    """fsspec options for s3fs, from the environment only. Short time-outs so a dead endpoint fails fast."""
    opts: dict[str, Any] = {
        "config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                          "retries": {"max_attempts": 3, "mode": "standard"}},
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
        return fsspec.core.url_to_fs(url, **s3_options())
    return fsspec.core.url_to_fs(url)


@contextlib.contextmanager
def storage_errors(url: str, action: str) -> Iterator[None]:
    """Turn low-level I/O and network errors into one StorageError line that names the URL."""
    try:
        yield
    except (StorageError, UsageError):
        raise
    except FileNotFoundError as e:
        raise StorageError(f"cannot {action} {url}: not found") from e
    except PermissionError as e:
        raise StorageError(f"cannot {action} {url}: permission denied") from e
    except Exception as e:
        if not is_remote(url) and not _is_network_error(e):
            raise
        where = f" (endpoint {endpoint_description()})" if is_remote(url) else ""
        raise StorageError(f"cannot {action} {url}{where}: {type(e).__name__}: {e}") from e


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


def listdir(url: str) -> list[str]:
    """Names (not paths) directly inside a folder or prefix, sorted; temporary files are left out."""
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
    return sorted(n for n in names if TMP_MARK not in n)


def remove(url: str) -> None:
    url = str(url)
    with storage_errors(url, "remove"):
        if is_remote(url):
            fs, path = filesystem(url)
            if fs.exists(path):
                fs.rm(path)
        elif os.path.exists(url):
            os.remove(url)


def makedirs(url: str) -> None:
    if not is_remote(url):
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


@contextlib.contextmanager
def atomic_write(url: str) -> Iterator[IO[bytes]]:
    """Write `url` so that it appears whole or not at all. On an exception nothing is published."""
    url = str(url)
    if is_remote(url):
        fs, path = filesystem(url)
        with tempfile.NamedTemporaryFile(prefix="gensynth-", suffix=TMP_MARK + "upload") as tmp:
            yield tmp
            tmp.flush()
            with storage_errors(url, "write"):
                fs.put_file(tmp.name, path)
                fs.invalidate_cache(path)
        return
    folder = os.path.dirname(os.path.abspath(url))
    os.makedirs(folder, exist_ok=True)
    tmp_path = os.path.join(folder, f".{os.path.basename(url)}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp_path, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, url)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def write_bytes(url: str, data: bytes) -> None:
    with atomic_write(url) as f:
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


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar a-001.tar a-002.tar; `{x,y}` lists too; several groups multiply."""
    parts: list[list[str]] = []
    pos = 0
    for m in _BRACE.finditer(pattern):
        parts.append([pattern[pos:m.start()]])
        body = m.group(1)
        rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if rng:
            lo, hi = rng.group(1), rng.group(2)
            width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
            if int(hi) < int(lo):
                raise UsageError(f"brace range {{{body}}} in {pattern!r} counts down; write it low..high")
            parts.append([str(i).zfill(width) for i in range(int(lo), int(hi) + 1)])
        elif "," in body:
            parts.append(body.split(","))
        else:
            raise UsageError(f"cannot expand {{{body}}} in {pattern!r}: use {{000..009}} or {{a,b}}")
        pos = m.end()
    parts.append([pattern[pos:]])
    return ["".join(p) for p in itertools.product(*parts)]


def register_webdataset_s3() -> None:
    """Let plain `webdataset` read and write s3:// URLs through the same fsspec set-up.

    webdataset 1.0.2 has no s3 handler of its own (see notes/stack-pitfalls.md).
    """
    import webdataset

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
        fs, path = filesystem(url)
        return fs.open(path, mode)

    webdataset.gopen_schemes["s3"] = gopen_s3
