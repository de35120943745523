"""The S3 object store: objects in a bucket of AWS S3 or an S3-compatible server (MinIO ...).

Needs ``pip install 'framepipe[s3]'`` (boto3, imported only when a store is opened). Open one
with ``open_object_store("s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1")``
or :class:`S3ObjectStore` directly. The object of key ``k`` is ``<prefix>/k`` in the bucket, so
stores with different prefixes share a bucket without seeing each other's objects.

Credentials, first found wins: the ``access_key``/``secret_key``/``session_token`` arguments,
``FRAMEPIPE_S3_ACCESS_KEY``/``FRAMEPIPE_S3_SECRET_KEY``/``FRAMEPIPE_S3_SESSION_TOKEN``, then the
standard AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, instance roles).
Credentials never go in the URL.

S3 makes every ``PUT`` and completed multipart upload visible atomically, so the contract's
atomic visibility holds. Files stream: ``put_file`` uploads in parts of ``multipart_threshold``
bytes above that size and ``get_file`` downloads straight into the temporary file the base class
renames into place; neither reads the whole object into memory. The bucket is checked when the
store opens, so a wrong bucket, wrong credentials or an unreachable endpoint fail at start with
an error naming the bucket and the endpoint, not at the first frame.

S3 keeps modification times to the second; ``modified`` is whole seconds from ``stat`` and
``list``, and the server's clock at the response for ``put``. An object's ``version`` is its
ETag (:mod:`~framepipe.backends.objects.versions`); ``copy(..., if_version=)`` sends it as
``CopySourceIfMatch``, so S3 itself refuses (``412 PreconditionFailed``, raised as
:class:`~framepipe.errors.ObjectReplacedError`) a source replaced at any moment before the copy.
On an S3-compatible server that ignores the condition, a pinned copy whose result is not the
pinned ETag is checked against the source afterwards, and deleted and refused when the source
has changed (the destination then holds no object, not its former one).

What each failure of S3 is reported as (a missing bucket, another region, rejected
credentials, an unreachable endpoint ...) is :mod:`framepipe.backends.objects.s3_errors`.

One concept, the S3 object store; the client it talks through is
:mod:`framepipe.backends.objects.s3_client`.
"""

from __future__ import annotations

import math
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from framepipe.backends.objects.base import (
    MAX_KEY_BYTES,
    ObjectInfo,
    ObjectStore,
    _key_problem,
)
from framepipe.backends.objects.s3_client import MIB, open_client
from framepipe.backends.objects.s3_errors import (
    MISSING_CODES,
    botocore_cause,
    error_code,
    explain,
)
from framepipe.backends.objects.s3_location import (
    S3Location,
    check_location,
    normalise_prefix,
    parse_s3_url,
)
from framepipe.backends.objects.versions import check_pinned, replaced
from framepipe.errors import (
    FramepipeError,
    InvalidKeyError,
    ObjectStoreError,
)
from framepipe.urls import safe_url

__all__ = ["S3ObjectStore"]

_MAX_COPY_OBJECT_BYTES = 5 * 1024**3  # largest object a single CopyObject accepts
_COPY_ATTEMPTS = 3
_LIST_PAGE_SIZE = 1000  # keys per ListObjectsV2 request (S3's maximum)
_DELETE_BATCH = 1000  # keys per DeleteObjects request (S3's maximum)


class S3ObjectStore(ObjectStore):
    """Objects in S3 bucket ``bucket`` under ``prefix``, at ``endpoint_url`` (AWS if ``None``).

    ``create_bucket=True`` creates a missing bucket instead of failing. Objects of at least
    ``multipart_threshold`` bytes are uploaded, downloaded and copied in parts of that size.
    Each request times out after ``connect_timeout``/``read_timeout`` seconds and is tried up
    to ``max_attempts`` times in all (botocore's standard retry mode: throttling, 5xx,
    connection errors); an upload also waits up to 1 s for the server's ``100 Continue``
    before it sends its body. Invalid arguments raise :class:`ConfigError` (also an endpoint
    carrying a user, a password or a secret query value, shown masked); a missing bucket,
    rejected credentials or an unreachable endpoint raise :class:`ObjectStoreError` at
    construction.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        create_bucket: bool = False,
        multipart_threshold: int = 8 * MIB,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        check_location(bucket, prefix, endpoint_url)
        self._bucket = bucket
        self._prefix = normalise_prefix(prefix)
        opened = open_client(
            bucket,
            endpoint_url=endpoint_url,
            region=region,
            access_key=access_key,
            secret_key=secret_key,
            session_token=session_token,
            multipart_threshold=multipart_threshold,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
        )
        self._boto, self._transfer = opened.boto, opened.transfer
        self._client: Any = opened.client
        self._endpoint_url = endpoint_url
        self._region = region
        self._read_timeout = read_timeout
        self._endpoint = safe_url(str(self._client.meta.endpoint_url))
        self._url = self._make_url()
        try:
            self._open_bucket(create_bucket)
        except BaseException:
            self._client.close()
            raise

    # -- identity -----------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str) -> S3ObjectStore:
        """Open ``s3://bucket[/prefix][?endpoint=URL&region=NAME&create=1]`` (also
        ``connect_timeout``, ``read_timeout``, ``max_attempts``); credentials come from the
        environment (see the module docstring), never from the URL. A URL that is wrong raises
        :class:`ConfigError` (see :func:`parse_s3_url`). The store's :attr:`url` names where
        its objects are (bucket, prefix, endpoint, region), not its timeouts."""
        return cls.from_location(parse_s3_url(url))

    @classmethod
    def from_location(cls, loc: S3Location) -> S3ObjectStore:
        """Open the store an ``s3://`` URL read by :func:`parse_s3_url` names."""
        return cls(
            loc.bucket,
            prefix=loc.prefix,
            endpoint_url=loc.endpoint_url,
            region=loc.region,
            create_bucket=loc.create_bucket,
            connect_timeout=loc.connect_timeout,
            read_timeout=loc.read_timeout,
            max_attempts=loc.max_attempts,
        )

    def _make_url(self) -> str:
        path = urllib.parse.quote(self._prefix.removesuffix("/"), safe="/")
        query: dict[str, str] = {}
        if self._endpoint_url is not None:
            query["endpoint"] = self._endpoint_url
        if self._region is not None:
            query["region"] = self._region
        url = f"s3://{self._bucket}/{path}" if path else f"s3://{self._bucket}"
        if query:
            url += "?" + urllib.parse.urlencode(query, safe=":/")
        return url

    @property
    def url(self) -> str:
        return self._url

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def prefix(self) -> str:
        """The prefix every key is stored under, ``""`` or ending with ``/``."""
        return self._prefix

    @property
    def endpoint(self) -> str:
        """The endpoint requests go to (without credentials)."""
        return self._endpoint

    # -- errors -------------------------------------------------------------------------------

    def _cause(self, exc: BaseException) -> BaseException:
        """The botocore error behind ``exc`` (boto3 and s3transfer wrap them)."""
        return botocore_cause(exc, self._boto.exceptions)

    def _is_missing(self, exc: BaseException) -> bool:
        return error_code(self._cause(exc))[0] in MISSING_CODES

    def _error(self, action: str, key: str | None, exc: BaseException) -> FramepipeError:
        """A clear error for ``exc`` raised while doing ``action`` (to ``key``); see
        :func:`~framepipe.backends.objects.s3_errors.explain`."""
        return explain(
            exc,
            self._boto.exceptions,
            action=action,
            key=key,
            bucket=self._bucket,
            endpoint=self._endpoint,
            url=self._url,
            region=self._client.meta.region_name,
            read_timeout=self._read_timeout,
        )

    # -- bucket -------------------------------------------------------------------------------

    def _open_bucket(self, create: bool) -> None:
        """Check the bucket once, so a bad configuration fails now, not at the first frame."""
        try:
            self._client.head_bucket(Bucket=self._bucket)
        except Exception as exc:
            code = error_code(self._cause(exc))[0]
            if not (create and code in MISSING_CODES | {"NoSuchBucket"}):
                raise self._error("open", None, exc) from exc
        else:
            return
        kwargs: dict[str, Any] = {}
        region = self._client.meta.region_name
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(Bucket=self._bucket, **kwargs)
        except Exception as exc:
            if error_code(self._cause(exc))[0] != "BucketAlreadyOwnedByYou":  # a racing opener
                raise self._error("create", None, exc) from exc

    # -- keys ---------------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        full = self._prefix + key
        size = len(full.encode("utf-8"))
        if size > MAX_KEY_BYTES:
            raise InvalidKeyError(
                f"invalid object key {key!r}: with the prefix {self._prefix!r} it is {size} "
                f"bytes, longer than S3's {MAX_KEY_BYTES}"
            )
        return full

    # -- writes -------------------------------------------------------------------------------

    def _put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        full = self._full(key)
        body = data if isinstance(data, bytes | bytearray) else bytes(data)
        try:
            response = self._client.put_object(Bucket=self._bucket, Key=full, Body=body)
        except Exception as exc:
            raise self._error("put", key, exc) from exc
        return ObjectInfo(key, len(body), _response_time(response), response.get("ETag"))

    def _put_file(self, key: str, path: Path) -> ObjectInfo:
        full = self._full(key)
        try:
            size = path.stat().st_size
            self._client.upload_file(str(path), self._bucket, full, Config=self._transfer)
        except Exception as exc:
            raise self._error("upload", key, exc) from exc
        info = self._stat(key)
        return info if info is not None else ObjectInfo(key, size, time.time())

    def _copy(self, src_key: str, dst_key: str, if_version: str | None = None) -> ObjectInfo | None:
        """A server-side copy of the ETag the source has (``if_version``, or else the one read
        first, tried again up to :data:`_COPY_ATTEMPTS` times when the source changes in
        between), sent as ``CopySourceIfMatch`` so S3 copies no other. A pinned copy is
        confirmed too where the server may not enforce that condition (:meth:`_confirm`)."""
        src, dst = self._full(src_key), self._full(dst_key)
        for _ in range(_COPY_ATTEMPTS):
            head = self._head(src_key, src)
            if head is None:
                return None
            etag, size = head["ETag"], int(head["ContentLength"])
            check_pinned(self._url, src_key, dst_key, if_version, etag)
            source = {"Bucket": self._bucket, "Key": src}
            info: ObjectInfo | None = None
            try:
                if size <= _MAX_COPY_OBJECT_BYTES:  # one server-side request
                    response = self._client.copy_object(
                        Bucket=self._bucket, Key=dst, CopySource=source, CopySourceIfMatch=etag
                    )
                    result = response["CopyObjectResult"]
                    modified = float(math.floor(result["LastModified"].timestamp()))
                    info = ObjectInfo(dst_key, size, modified, result.get("ETag"))
                else:
                    self._client.copy(
                        source,
                        self._bucket,
                        dst,
                        ExtraArgs={"CopySourceIfMatch": etag},
                        Config=self._transfer,
                    )
            except Exception as exc:
                code = error_code(self._cause(exc))[0]
                if code in ("PreconditionFailed", "412"):  # replaced since the head
                    if if_version is not None:
                        raise replaced(self._url, src_key, dst_key, if_version, None) from None
                    continue  # unpinned: copy the new one
                if code in MISSING_CODES:
                    return None
                raise self._error(f"copy {src_key!r} to", dst_key, exc) from exc
            if info is None:
                info = self._stat(dst_key) or ObjectInfo(dst_key, size, time.time())
            if if_version is not None and info.version != if_version:
                self._confirm(src_key, dst_key, if_version)
            return info
        raise ObjectStoreError(
            f"cannot copy {src_key!r} to {dst_key!r} in {self._url}: the source changed "
            f"during {_COPY_ATTEMPTS} attempts"
        )

    def _confirm(self, src_key: str, dst_key: str, version: str) -> None:
        """After a copy pinned to ``version`` whose result has another ETag (a multipart or
        encrypted source's copy has one of its own): the source must still be ``version``,
        else the copy is deleted and refused. S3 enforces ``CopySourceIfMatch`` itself; some
        S3-compatible servers ignore it, and there the copy of a replacement is not kept."""
        head = self._head(src_key, self._full(src_key))
        now = None if head is None else head["ETag"]
        if now != version:
            self._delete(dst_key)
            raise replaced(self._url, src_key, dst_key, version, now)

    def _delete(self, key: str) -> bool:
        full = self._full(key)
        if self._head(key, full) is None:  # S3 deletes are idempotent and do not say
            return False
        try:
            self._client.delete_object(Bucket=self._bucket, Key=full)
        except Exception as exc:
            raise self._error("delete", key, exc) from exc
        return True

    def _delete_many(self, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            objects = [{"Key": self._full(key)} for key in batch]
            try:
                answer = self._client.delete_objects(
                    Bucket=self._bucket, Delete={"Objects": objects, "Quiet": True}
                )
            except Exception as exc:
                raise self._error("delete", batch[0], exc) from exc
            for refused in answer.get("Errors", []):
                code = refused.get("Code", "")
                if code in MISSING_CODES:
                    continue
                key = str(refused.get("Key", "")).removeprefix(self._prefix)
                error = self._boto.exceptions.ClientError(
                    {"Error": {"Code": code, "Message": refused.get("Message", "")}},
                    "DeleteObjects",
                )
                raise self._error("delete", key, error)

    # -- reads --------------------------------------------------------------------------------

    def _head(self, key: str, full: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self._client.head_object(Bucket=self._bucket, Key=full)
        except Exception as exc:
            if self._is_missing(exc):
                return None
            raise self._error("stat", key, exc) from exc
        return head

    def _get_bytes(self, key: str) -> bytes | None:
        full = self._full(key)
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=full)
            with response["Body"] as body:
                data: bytes = body.read()
        except Exception as exc:
            if self._is_missing(exc):
                return None
            raise self._error("get", key, exc) from exc
        return data

    def _get_file(self, key: str, path: Path) -> bool:
        full = self._full(key)
        try:
            with path.open("wb") as file:  # the base's temp file: parts are written in place
                self._client.download_fileobj(self._bucket, full, file, Config=self._transfer)
        except Exception as exc:
            if self._is_missing(exc):
                return False
            raise self._error("download", key, exc) from exc
        return True

    def _stat(self, key: str) -> ObjectInfo | None:
        head = self._head(key, self._full(key))
        if head is None:
            return None
        modified = float(math.floor(head["LastModified"].timestamp()))
        return ObjectInfo(key, int(head["ContentLength"]), modified, head.get("ETag"))

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        # S3 lists in UTF-8 byte order, which is str order; the store prefix is common to all
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self._bucket,
            Prefix=self._prefix + prefix,
            PaginationConfig={"PageSize": _LIST_PAGE_SIZE},
        )
        start = len(self._prefix)
        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    key = item["Key"][start:]
                    if _key_problem(key) is not None:  # e.g. "folder/" markers of other tools
                        continue
                    modified = float(math.floor(item["LastModified"].timestamp()))
                    yield ObjectInfo(key, int(item["Size"]), modified, item.get("ETag"))
        except Exception as exc:
            raise self._error("list", prefix or None, exc) from exc

    def _close(self) -> None:
        self._client.close()


def _response_time(response: dict[str, Any]) -> float:
    """The server's ``Date`` of a response (whole seconds), or the local clock."""
    date = ((response.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}).get("date")
    if isinstance(date, str):
        try:
            return parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            pass
    return float(math.floor(time.time()))
