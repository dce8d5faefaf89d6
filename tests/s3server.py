"""A real S3-protocol server for tests: moto_server on 127.0.0.1, started and stopped by its PID.

    server = MotoServer.start()          # raises MotoUnavailable when moto[server] is not installed
    ...  server.endpoint                 # http://127.0.0.1:PORT
    server.stop()                        # terminate, wait, kill if it will not go

`aws_env()` is the environment that points boto3/s3fs (and so gensynth.storage) at an endpoint with
throw-away credentials, isolated from any ~/.aws config on the machine.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import free_port

BUCKET = "gensynth-test"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"

# Variables that could point boto3 elsewhere or hand it other credentials: cleared for the tests.
AWS_VARS_TO_CLEAR = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                     "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CA_BUNDLE")


class MotoUnavailable(RuntimeError):
    """moto_server is not installed (pip install 'moto[server]')."""


def moto_command() -> list[str]:
    """How to start moto's server: the console script beside this interpreter, on PATH, or `-m moto.server`."""
    beside = Path(sys.executable).parent / "moto_server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    on_path = shutil.which("moto_server")
    if on_path:
        return [on_path]
    if importlib.util.find_spec("moto") is not None and importlib.util.find_spec("moto.server") is not None:
        return [sys.executable, "-m", "moto.server"]
    raise MotoUnavailable("moto_server not found next to the interpreter, on PATH, or as `python -m moto.server`")


def aws_env(endpoint: str, secret: str = SECRET_KEY, access: str = ACCESS_KEY) -> dict[str, str]:
    """The AWS variables to set (plus config files that do not exist, so ~/.aws is not read)."""
    nowhere = os.path.join(tempfile.gettempdir(), "gensynth-tests-no-aws-config")
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": access,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": nowhere,
        "AWS_SHARED_CREDENTIALS_FILE": nowhere,
        "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata lookup
    }


@dataclass
class MotoServer:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, log_dir: Path, timeout: float = 30.0) -> MotoServer:
        cmd = moto_command()
        last_error: Exception | None = None
        for _ in range(3):  # another process may grab the free port between free_port() and bind
            port = free_port()
            log_path = Path(log_dir) / f"moto-{port}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            server = cls(proc, port, log_path)
            try:
                server._wait_ready(timeout)
                return server
            except RuntimeError as e:
                server.stop()
                last_error = e
        raise RuntimeError(f"moto_server did not start: {last_error}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2) as r:
                    if r.status < 500:
                        return
            except urllib.error.HTTPError as e:  # any HTTP answer means it is serving
                if e.code < 500:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"moto_server on port {self.port} did not answer within {timeout:.0f} s: "
                           f"{self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop this server by its PID: terminate, wait, kill if it does not go."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class S3:
    server: MotoServer
    client: Any  # boto3 S3 client: an independent view of what is really in the bucket

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def clear_fsspec_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
