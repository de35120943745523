"""A real S3-compatible server for the tests: moto's (``moto[server]``), in its own process on
a free port of 127.0.0.1, with the AWS credential chain confined to test values (no request
leaves the machine, the instance-metadata lookup is disabled)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import service_missing
from waiting import free_port

REGION = "us-east-1"
TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@contextlib.contextmanager
def aws_test_env() -> Iterator[None]:
    """Only the test credentials: nothing from the developer's AWS setup leaks in."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith(("AWS_", "FRAMEPIPE_S3_")):
                patch.delenv(name)
        for name, value in TEST_ENV.items():
            patch.setenv(name, value)
        yield


@dataclass
class S3Server:
    endpoint: str
    client: Any  # a plain boto3 client, for setup and for checks the store API does not offer

    def new_bucket(self) -> str:
        name = f"fp-{uuid.uuid4().hex[:16]}"
        self.client.create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            objects = [{"Key": item["Key"]} for item in page.get("Contents", ())]
            if objects:
                self.client.delete_objects(Bucket=name, Delete={"Objects": objects})
        self.client.delete_bucket(Bucket=name)


def _wait_listening(proc: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def start_moto(port: int, log: Path) -> subprocess.Popen[bytes]:
    """moto's S3 server on 127.0.0.1:``port`` (not yet listening when this returns), its
    output appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@contextlib.contextmanager
def s3_server_at(log_dir: Path) -> Iterator[S3Server]:
    """Start the server (call inside :func:`aws_test_env`); skip, or fail under CI, when moto
    or boto3 is missing or the server does not come up."""
    missing = [
        name
        for name in ("boto3", "moto", "werkzeug", "flask")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        service_missing(
            "the S3 test server (pip install 'framepipe[test]': boto3, moto[server])",
            ModuleNotFoundError(f"not installed: {', '.join(missing)}"),
        )
    import boto3

    log = log_dir / "server.log"
    proc: subprocess.Popen[bytes] | None = None
    for _ in range(3):  # the free port may be taken before the server binds it
        port = free_port()
        proc = start_moto(port, log)
        if _wait_listening(proc, port, time.monotonic() + 60):
            break
        proc.kill()
        proc.wait()
        proc = None
    if proc is None:
        service_missing("the moto S3 server", RuntimeError(log.read_text()[-2000:]))
    assert proc is not None
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    try:
        yield S3Server(endpoint, client)
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
