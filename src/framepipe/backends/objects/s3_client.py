"""The boto3 client an S3 object store talks through (:func:`open_client`).

Guarantees: boto3 is imported only here and only when a store is opened (without it,
:class:`~framepipe.errors.MissingDependencyError` says what to install). Credentials come from
the arguments, then ``FRAMEPIPE_S3_ACCESS_KEY``/``FRAMEPIPE_S3_SECRET_KEY``/
``FRAMEPIPE_S3_SESSION_TOKEN``, then the standard AWS chain; only half of a key pair, a
non-positive part size or timeout, fewer than one attempt, or settings botocore refuses are a
:class:`~framepipe.errors.ConfigError` before anything is contacted. ``max_attempts`` counts
the tries in all; an S3-compatible endpoint is addressed bucket-in-path; the memory a transfer
holds stays bounded whatever the object's size.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

from framepipe.errors import ConfigError, MissingDependencyError
from framepipe.urls import safe_text

__all__ = ["MIB", "Boto", "S3Client", "open_client"]

MIB = 1024 * 1024
_MIN_PART_BYTES = 5 * MIB  # S3's smallest multipart part (but the last)
# Memory a transfer holds stays bounded whatever the object's size: botocore hashes each part
# in flight in 1 MiB chunks (about 2 MiB a part), and a download queues at most
# _IO_QUEUE chunks of 256 KiB for the disk writer (boto3's default, 100, buffers 25 MiB).
_TRANSFER_THREADS = 4
_IO_QUEUE = 8
_POOL_CONNECTIONS = 32  # requests in flight at once: threads putting frames, transfer parts


@dataclass(frozen=True)
class Boto:
    """The parts of boto3/botocore the store uses, imported on first use."""

    boto3: Any
    Config: Any
    TransferConfig: Any
    exceptions: Any


@dataclass(frozen=True)
class S3Client:
    """An opened client: boto3's modules, the S3 client, and the transfer configuration of
    uploads, downloads and copies in parts."""

    boto: Boto
    client: Any
    transfer: Any


def _import_boto() -> Boto:
    try:
        boto3 = importlib.import_module("boto3")
        config = importlib.import_module("botocore.config")
        exceptions = importlib.import_module("botocore.exceptions")
        transfer = importlib.import_module("boto3.s3.transfer")
    except ImportError as exc:
        raise MissingDependencyError("boto3", "s3", "the S3 object store") from exc
    return Boto(boto3, config.Config, transfer.TransferConfig, exceptions)


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def open_client(
    bucket: str,
    *,
    endpoint_url: str | None,
    region: str | None,
    access_key: str | None,
    secret_key: str | None,
    session_token: str | None,
    multipart_threshold: int,
    connect_timeout: float,
    read_timeout: float,
    max_attempts: int,
) -> S3Client:
    """The client of the store of ``bucket`` at ``endpoint_url`` (see the module); nothing is
    contacted. The caller closes ``client``."""
    if multipart_threshold < 1:
        raise ConfigError(f"multipart_threshold must be positive, not {multipart_threshold}")
    if not (connect_timeout > 0 and read_timeout > 0):
        raise ConfigError("connect_timeout and read_timeout must be positive")
    if max_attempts < 1:
        raise ConfigError(f"max_attempts must be at least 1, not {max_attempts}")
    access_key = access_key or _env("FRAMEPIPE_S3_ACCESS_KEY")
    secret_key = secret_key or _env("FRAMEPIPE_S3_SECRET_KEY")
    session_token = session_token or _env("FRAMEPIPE_S3_SESSION_TOKEN")
    if (access_key is None) != (secret_key is None):
        raise ConfigError(
            "S3 credentials need both an access key and a secret key "
            "(access_key/secret_key or FRAMEPIPE_S3_ACCESS_KEY/FRAMEPIPE_S3_SECRET_KEY); "
            "only one is set"
        )

    boto = _import_boto()
    try:
        session = boto.boto3.session.Session(
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            aws_session_token=session_token if access_key else None,
            region_name=region,
        )
        config = boto.Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # botocore's own "max_attempts" counts retries (3 makes 4 tries)
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=_POOL_CONNECTIONS,
            # S3-compatible servers (MinIO, a loopback test server) take bucket-in-path
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        client = session.client("s3", endpoint_url=endpoint_url, config=config)
    except (ValueError, boto.exceptions.BotoCoreError) as exc:
        raise ConfigError(
            f"cannot configure the S3 client for bucket {bucket!r}: {safe_text(str(exc))}"
        ) from exc
    transfer = boto.TransferConfig(
        multipart_threshold=multipart_threshold,
        multipart_chunksize=max(multipart_threshold, _MIN_PART_BYTES),
        max_concurrency=_TRANSFER_THREADS,
        max_io_queue=_IO_QUEUE,
    )
    return S3Client(boto, client, transfer)
