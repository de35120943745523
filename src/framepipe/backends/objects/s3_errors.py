"""What an S3 failure means: botocore's errors turned into framepipe's, in words a user can act
on.

Guarantees: :func:`explain` returns (does not raise) a :class:`~framepipe.errors.ConfigError`
(no credentials, or only part of them) or an :class:`~framepipe.errors.ObjectStoreError`
naming the bucket and the endpoint (and the action and key, when there is one), and says which
failure it is: the bucket does not exist, it lives in another region (naming it), access is
denied, the credentials are rejected (saying where to set them), the endpoint did not answer
within the read timeout or cannot be reached; any other S3 answer is given with its code and
message.
:func:`botocore_cause` finds botocore's error behind the wrappers of boto3 and s3transfer, so
the answer is the same whichever call failed.
"""

from __future__ import annotations

from typing import Any

from framepipe.errors import ConfigError, FramepipeError, ObjectStoreError

__all__ = ["CREDENTIAL_HINT", "MISSING_CODES", "botocore_cause", "error_code", "explain"]

MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
"""The codes S3 answers for an object (or, without a key, a bucket) that does not exist."""
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidSecurity",
    "InvalidClientTokenId",
    "403",
    "Forbidden",
}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled"}
CREDENTIAL_HINT = (
    "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or FRAMEPIPE_S3_ACCESS_KEY/FRAMEPIPE_S3_SECRET_KEY"
)
"""Where credentials go, for the messages about them."""


def error_code(exc: BaseException) -> tuple[str, str, int | None]:
    """``(code, message, HTTP status)`` of a botocore ``ClientError``, else empty."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", "", None
    error = response.get("Error") or {}
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return str(error.get("Code", "")), str(error.get("Message", "")), status


def botocore_cause(exc: BaseException, exceptions: Any) -> BaseException:
    """The botocore error behind ``exc`` (boto3 and s3transfer wrap them); ``exceptions`` is
    ``botocore.exceptions``. ``exc`` itself when there is none."""
    botocore_errors: tuple[type[BaseException], ...] = (
        exceptions.ClientError,
        exceptions.BotoCoreError,
    )
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, botocore_errors):
            return current
        seen.add(id(current))
        last = getattr(current, "last_exception", None)
        current = (
            last if isinstance(last, BaseException) else current.__cause__ or current.__context__
        )
    return exc


def explain(
    exc: BaseException,
    exceptions: Any,
    *,
    action: str,
    key: str | None,
    bucket: str,
    endpoint: str,
    url: str,
    region: str | None,
    read_timeout: float,
) -> FramepipeError:
    """A clear error for ``exc`` raised while doing ``action`` (to ``key``) on ``bucket`` at
    ``endpoint`` (the store ``url``; the client's ``region``, ``read_timeout``)."""
    cause = botocore_cause(exc, exceptions)
    if key is not None:
        doing = f" ({action} {key!r})"
    else:
        doing = "" if action == "open" else f" ({action})"
    if isinstance(cause, exceptions.ClientError):
        code, message, status = error_code(cause)
        detail = f"{code}: {message}" if message else code or str(cause)
        if code == "NoSuchBucket" or (key is None and code in MISSING_CODES):
            return ObjectStoreError(
                f"bucket {bucket!r} does not exist at {endpoint} "
                "(create it, or have framepipe create it: create=1 among the s3:// URL's "
                f"options, as in s3://{bucket}?create=1, or create_bucket=True){doing}"
            )
        elsewhere = _bucket_region(cause, region) if status in (301, 307, 400) else None
        if elsewhere is not None:
            return ObjectStoreError(
                f"bucket {bucket!r} is in region {elsewhere!r}, not "
                f"{region!r}: pass region={elsewhere}{doing}"
            )
        if code in _DENIED_CODES:
            return ObjectStoreError(
                f"access denied by {endpoint} for bucket {bucket!r} ({detail}){doing}: "
                "the credentials lack permission"
            )
        if code in _CREDENTIAL_CODES or status == 403:
            return ObjectStoreError(
                f"credentials rejected by {endpoint} for bucket {bucket!r} "
                f"({detail}){doing}; {CREDENTIAL_HINT}"
            )
        return ObjectStoreError(f"S3 error from {endpoint} for bucket {bucket!r}{doing}: {detail}")
    if isinstance(cause, exceptions.NoCredentialsError | exceptions.PartialCredentialsError):
        return ConfigError(
            f"no S3 credentials for bucket {bucket!r} at {endpoint}{doing}: {cause}; "
            f"{CREDENTIAL_HINT}"
        )
    if isinstance(cause, exceptions.ReadTimeoutError):
        return ObjectStoreError(
            f"S3 endpoint {endpoint} did not answer within {read_timeout:g} s "
            f"for bucket {bucket!r}{doing}: {cause}"
        )
    if isinstance(cause, exceptions.ConnectionError | exceptions.HTTPClientError):
        return ObjectStoreError(
            f"cannot reach S3 endpoint {endpoint}: {cause} (bucket {bucket!r}{doing})"
        )
    return ObjectStoreError(
        f"cannot {action} {key!r} in {url}: {type(cause).__name__}: {cause}"
        if key is not None
        else f"cannot {action} bucket {bucket!r} at {endpoint}: {type(cause).__name__}: {cause}"
    )


def _bucket_region(exc: BaseException, region: str | None) -> str | None:
    """The bucket's region if S3 answered that it lives in another one than ``region``."""
    response: dict[str, Any] = getattr(exc, "response", {})
    headers = (response.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}
    found = headers.get("x-amz-bucket-region") or (response.get("Error") or {}).get("Region")
    if isinstance(found, str) and found and found != region:
        return found
    return None
