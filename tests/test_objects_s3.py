"""S3ObjectStore against real HTTP servers on loopback: what only the S3 store does (prefixes,
paging, URLs, multipart streaming, bucket and credential errors, timeouts, packaging). The
contract every store keeps is in test_objects_contract.py, run there on S3 too.

The S3 server is moto's (``moto[server]``), started once per session (conftest.py's
``s3_server``) in its own process on a free port of 127.0.0.1, so the memory the server spends
on a 20 MiB upload does not count in the client's ``tracemalloc`` peak. Error cases the S3
server cannot produce (credentials rejected, a server that accepts connections but never
answers) use tiny ``http.server`` servers on loopback that answer as S3 does. No request leaves
the machine: the AWS credential chain is confined to test values and the instance-metadata
lookup is disabled.

Without boto3 or moto the S3 cases skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import service_missing
from framepipe.backends.objects import (
    ObjectStore,
    S3ObjectStore,
    open_object_store,
)
from framepipe.backends.objects import s3 as s3_module
from framepipe.errors import (
    ConfigError,
    InvalidKeyError,
    MissingDependencyError,
    ObjectNotFoundError,
    ObjectStoreError,
)
from s3server import REGION, S3Server, _wait_listening, start_moto
from waiting import free_port, wait_until

MIB = 1024 * 1024


def keys(store: ObjectStore, prefix: str = "") -> list[str]:
    return [info.key for info in store.list(prefix)]


pytestmark = pytest.mark.usefixtures("aws_env")  # only the test credentials (conftest.py)


# -- the S3 server (conftest.py's ``s3_server``, once per session) -----------------------------


@pytest.fixture
def bucket(s3_server: S3Server) -> Iterator[str]:
    name = s3_server.new_bucket()
    yield name
    s3_server.drop_bucket(name)


@pytest.fixture
def s3_store(s3_server: S3Server, bucket: str) -> Iterator[S3ObjectStore]:
    with S3ObjectStore(bucket, endpoint_url=s3_server.endpoint, region=REGION) as opened:
        yield opened


# -- servers that answer like S3 when it refuses ----------------------------------------------

S3_ERRORS = {
    "InvalidAccessKeyId": "The AWS Access Key Id you provided does not exist in our records.",
    "SignatureDoesNotMatch": "The request signature we calculated does not match the "
    "signature you provided. Check your key and signing method.",
    "ExpiredToken": "The provided token has expired.",
}


class RefusingServer(ThreadingHTTPServer):
    """An HTTP server on loopback that answers every S3 request with 403 and S3's XML error
    body; with ``allow_head`` it answers ``HEAD`` with 200, so a store opens and then sees its
    requests refused (credentials revoked or expired while running)."""

    daemon_threads = True

    def __init__(self, code: str, allow_head: bool) -> None:
        super().__init__(("127.0.0.1", 0), RefusingHandler)
        self.code = code
        self.allow_head = allow_head
        self.requests: list[tuple[str, str, dict[str, str]]] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class RefusingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RefusingServer

    def answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.requests.append((self.command, self.path, dict(self.headers)))
        if self.command == "HEAD":
            self.send_response(200 if self.server.allow_head else 403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error>'
            f"<Code>{self.server.code}</Code><Message>{S3_ERRORS[self.server.code]}</Message>"
            "<RequestId>4442587FB7D0A2F9</RequestId></Error>"
        ).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = answer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@pytest.fixture
def refusing() -> Iterator[Callable[..., RefusingServer]]:
    servers: list[RefusingServer] = []

    def start(code: str = "InvalidAccessKeyId", allow_head: bool = False) -> RefusingServer:
        server = RefusingServer(code, allow_head)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def needs_boto3() -> None:
    if importlib.util.find_spec("boto3") is None:
        service_missing("boto3 (pip install 'framepipe[s3]')", ModuleNotFoundError("boto3"))


# -- S3: layout, prefixes, URLs ---------------------------------------------------------------


@pytest.mark.slow  # the real S3 server
def test_objects_live_under_the_prefix(s3_server: S3Server, bucket: str) -> None:
    with S3ObjectStore(bucket, prefix="frames/site1/", endpoint_url=s3_server.endpoint) as store:
        assert store.prefix == "frames/site1/"
        store.put("cam1/0001.jpg", b"jpeg")
        head = s3_server.client.head_object(Bucket=bucket, Key="frames/site1/cam1/0001.jpg")
        assert head["ContentLength"] == 4
        assert keys(store) == ["cam1/0001.jpg"]


@pytest.mark.slow  # the real S3 server
def test_prefix_isolation(s3_server: S3Server, bucket: str) -> None:
    ep = s3_server.endpoint
    with (
        S3ObjectStore(bucket, prefix="tenant-a", endpoint_url=ep) as a,
        S3ObjectStore(bucket, prefix="tenant-b/", endpoint_url=ep) as b,
        S3ObjectStore(bucket, prefix="tenant", endpoint_url=ep) as parent,
    ):
        a.put("k", b"from a")
        b.put("k", b"from b")
        a.put("only-a", b"1")
        assert a.get("k") == b"from a"
        assert b.get("k") == b"from b"
        assert keys(a) == ["k", "only-a"]
        assert keys(b) == ["k"]
        assert not b.exists("only-a")
        with pytest.raises(ObjectNotFoundError):
            b.get("only-a")
        assert b.delete("only-a") is False
        assert a.exists("only-a")
        b.copy("k", "copied")
        assert not a.exists("copied")
        # "tenant" is a folder: it does not see "tenant-a/..." and "tenant-b/..."
        assert keys(parent) == []
        parent.put("k", b"parent")
        assert a.get("k") == b"from a"
    listed = s3_server.client.list_objects_v2(Bucket=bucket)["Contents"]
    assert [item["Key"] for item in listed] == [
        "tenant-a/k",
        "tenant-a/only-a",
        "tenant-b/copied",
        "tenant-b/k",
        "tenant/k",
    ]


@pytest.mark.slow  # the real S3 server
def test_list_skips_foreign_keys_and_pages(
    s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_module, "_LIST_PAGE_SIZE", 3)  # many pages from a few objects
    client = s3_server.client
    client.put_object(Bucket=bucket, Key="p/folder/", Body=b"")  # a console "folder" marker
    client.put_object(Bucket=bucket, Key="p/a//b", Body=b"")  # not a valid framepipe key
    client.put_object(Bucket=bucket, Key="p", Body=b"")  # beside the prefix, not under it
    client.put_object(Bucket=bucket, Key="p0", Body=b"")
    names = [f"p/frames/{i:02d}" for i in range(20)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b"x"), names))
    with S3ObjectStore(bucket, prefix="p", endpoint_url=s3_server.endpoint) as store:
        assert keys(store) == [name.removeprefix("p/") for name in names]
        assert keys(store, "frames/1") == [f"frames/1{i}" for i in range(10)]
        assert keys(store, "folder/") == []


@pytest.mark.slow  # the real S3 server
def test_url_reopens_the_same_store(
    s3_store: S3ObjectStore, s3_server: S3Server, bucket: str
) -> None:
    port = s3_server.endpoint.rsplit(":", 1)[1]
    assert s3_store.url == f"s3://{bucket}?endpoint=http://127.0.0.1:{port}&region={REGION}"
    assert repr(s3_store) == f"S3ObjectStore({s3_store.url!r})"
    assert s3_store.bucket == bucket
    assert s3_store.endpoint == s3_server.endpoint
    s3_store.put("k", b"v")
    with open_object_store(s3_store.url) as again:
        assert isinstance(again, S3ObjectStore)
        assert again.get("k") == b"v"


@pytest.mark.slow  # the real S3 server
def test_open_object_store_s3(s3_server: S3Server) -> None:
    name = f"fp-{uuid.uuid4().hex[:16]}"
    url = f"s3://{name}/frames/my%20site?endpoint={s3_server.endpoint}&region={REGION}&create=1"
    with open_object_store(url) as store:
        assert isinstance(store, S3ObjectStore)
        assert store.prefix == "frames/my site/"
        assert store.url == (
            f"s3://{name}/frames/my%20site?endpoint={s3_server.endpoint}&region={REGION}"
        )
        store.put("cam/1.jpg", b"jpeg")
        assert store.get("cam/1.jpg") == b"jpeg"
    assert (
        s3_server.client.get_object(Bucket=name, Key="frames/my site/cam/1.jpg")["Body"].read()
        == b"jpeg"
    )
    with open_object_store(f"s3://{name}?endpoint={s3_server.endpoint}") as whole:
        assert keys(whole) == ["frames/my site/cam/1.jpg"]
    s3_server.drop_bucket(name)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://key:hunter2@bucket/prefix", r"'s3://key:\*\*\*@bucket/prefix' carries credentials"),
        ("s3://AKIDEXAMPLE@bucket", "carries credentials"),
        ("s3:///prefix", "names no bucket"),
        ("s3://bucket?endpoint=http://h:1&endpoint=http://h:2", "'endpoint' given twice"),
        ("s3://bucket?secret=x", "unknown option 'secret'.*endpoint, region, create, connect_"),
        ("s3://bucket?create=maybe", "create='maybe'"),
        ("s3://bucket#frag", "fragment"),
    ],
)
def test_open_s3_url_rejects(url: str, message: str) -> None:
    """A wrong URL is a setting to fix (ConfigError), not a store that is away."""
    needs_boto3()
    with pytest.raises(ConfigError, match=message) as excinfo:
        open_object_store(url)
    assert "hunter2" not in str(excinfo.value)


def test_open_redacts_credentials() -> None:
    """Even without boto3 installed (no needs_boto3 here), the URL is refused redacted."""
    with pytest.raises(ConfigError) as excinfo:
        open_object_store("s3://key:hunter2@bucket/prefix")
    assert "hunter2" not in str(excinfo.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bucket": "has space"}, "invalid S3 bucket name 'has space'"),
        ({"bucket": ""}, "invalid S3 bucket name"),
        ({"prefix": "../up"}, r"invalid S3 prefix '\.\./up'"),
        ({"prefix": "/abs"}, "invalid S3 prefix"),
        ({"endpoint_url": "127.0.0.1:9000"}, "invalid S3 endpoint"),
        ({"endpoint_url": "http://key:hunter2@127.0.0.1:9000"}, "carries credentials"),
        ({"access_key": "only-the-id"}, "both an access key and a secret key"),
        ({"multipart_threshold": 0}, "multipart_threshold"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"read_timeout": 0}, "read_timeout"),
    ],
)
def test_bad_configuration_is_a_config_error(kwargs: dict[str, Any], message: str) -> None:
    needs_boto3()
    arguments: dict[str, Any] = {"bucket": "frames", "endpoint_url": "http://127.0.0.1:9"}
    arguments.update(kwargs)
    bucket = arguments.pop("bucket")
    with pytest.raises(ConfigError, match=message) as excinfo:
        S3ObjectStore(bucket, **arguments)
    assert "hunter2" not in str(excinfo.value)


def test_half_credentials_in_env_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    needs_boto3()
    monkeypatch.setenv("FRAMEPIPE_S3_SECRET_KEY", "secret")
    with pytest.raises(ConfigError, match="FRAMEPIPE_S3_ACCESS_KEY"):
        S3ObjectStore("frames", endpoint_url="http://127.0.0.1:9")


# -- S3: large objects stream -----------------------------------------------------------------


def _write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as file:
        for _ in range(size // MIB):
            chunk = os.urandom(MIB)
            digest.update(chunk)
            file.write(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _peak(call: Callable[[], object]) -> int:
    tracemalloc.reset_peak()
    call()
    return tracemalloc.get_traced_memory()[1]


@pytest.mark.slow  # the real S3 server
def test_large_object_streams(
    s3_store: S3ObjectStore,
    s3_server: S3Server,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    size = 20 * MIB
    source = tmp_path / "big.bin"
    checksum = _write_random(source, size)
    dest = tmp_path / "out" / "big.bin"
    tracemalloc.start()
    try:
        upload_peak = _peak(lambda: s3_store.put_file("videos/big.bin", source))
        download_peak = _peak(lambda: s3_store.get_file("videos/big.bin", dest))
    finally:
        tracemalloc.stop()
    # the whole object never sits in memory: parts of 8 MiB are streamed from and to disk
    assert upload_peak < size * 0.4, f"upload peak {upload_peak / MIB:.1f} MiB"
    assert download_peak < size // 4, f"download peak {download_peak / MIB:.1f} MiB"
    assert _sha256(dest) == checksum
    assert s3_store.stat("videos/big.bin").size == size
    # uploaded in 3 parts (20 MiB in parts of 8 MiB): a multipart ETag ends with "-3"
    etag = s3_server.client.head_object(Bucket=bucket, Key="videos/big.bin")["ETag"]
    assert etag.strip('"').endswith("-3")

    # a managed (multipart, server-side) copy, as objects above 5 GiB get
    monkeypatch.setattr(s3_module, "_MAX_COPY_OBJECT_BYTES", MIB)
    info = s3_store.copy("videos/big.bin", "videos/copy.bin")
    assert info == s3_store.stat("videos/copy.bin")
    assert info.size == size
    etag = s3_server.client.head_object(Bucket=bucket, Key="videos/copy.bin")["ETag"]
    assert etag.strip('"').endswith("-3")
    again = s3_store.get_file("videos/copy.bin", tmp_path / "copy.bin")
    assert _sha256(again) == checksum


# -- S3: clear errors -------------------------------------------------------------------------


@pytest.mark.slow  # the real S3 server
def test_missing_bucket(s3_server: S3Server) -> None:
    name = f"fp-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ObjectStoreError) as excinfo:
        S3ObjectStore(name, endpoint_url=s3_server.endpoint)
    assert str(excinfo.value) == (
        f"bucket '{name}' does not exist at {s3_server.endpoint} "
        "(create it, or have framepipe create it: create=1 among the s3:// URL's options, "
        f"as in s3://{name}?create=1, or create_bucket=True)"
    )
    with pytest.raises(ObjectStoreError, match="does not exist"):
        open_object_store(f"s3://{name}?endpoint={s3_server.endpoint}")

    with S3ObjectStore(name, endpoint_url=s3_server.endpoint, create_bucket=True) as store:
        store.put("k", b"v")
        # opening again with create_bucket=True is fine
        with S3ObjectStore(name, endpoint_url=s3_server.endpoint, create_bucket=True) as again:
            assert again.get("k") == b"v"
        s3_server.drop_bucket(name)  # the bucket goes away while the store is open
        for call in (
            lambda: store.put("k", b"v"),
            lambda: store.get("k"),
            lambda: list(store.list()),
        ):
            with pytest.raises(ObjectStoreError, match=f"bucket '{name}' does not exist at "):
                call()


@pytest.mark.slow  # an S3 stand-in server and boto3 clients
@pytest.mark.parametrize("allow_head", [False, True], ids=["at-open", "per-request"])
def test_wrong_credentials(
    refusing: Callable[..., RefusingServer], allow_head: bool, tmp_path: Path
) -> None:
    needs_boto3()
    server = refusing("InvalidAccessKeyId", allow_head=allow_head)
    expected = f"credentials rejected by {server.endpoint} for bucket 'frames'"
    if not allow_head:
        with pytest.raises(ObjectStoreError, match=expected) as excinfo:
            S3ObjectStore("frames", endpoint_url=server.endpoint, max_attempts=1)
        assert "AWS_ACCESS_KEY_ID" in str(excinfo.value)
        return
    source = tmp_path / "source"
    source.write_bytes(b"data")
    dest = tmp_path / "dest"
    dest.write_bytes(b"previous")
    with S3ObjectStore("frames", endpoint_url=server.endpoint, max_attempts=1) as store:
        for call in (
            lambda: store.put("k", b"v"),
            lambda: store.get("k"),
            lambda: store.put_file("k", source),
            lambda: list(store.list("a/")),
            lambda: store.get_file("k", dest),
        ):
            with pytest.raises(ObjectStoreError, match=expected) as excinfo:
                call()
            assert "InvalidAccessKeyId" in str(excinfo.value)
            assert "'k'" in str(excinfo.value) or "'a/'" in str(excinfo.value)
    assert dest.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "source"]


@pytest.mark.slow  # an S3 stand-in server and boto3 clients
@pytest.mark.parametrize("code", ["SignatureDoesNotMatch", "ExpiredToken"])
def test_other_credential_errors(refusing: Callable[..., RefusingServer], code: str) -> None:
    needs_boto3()
    server = refusing(code, allow_head=True)
    with (
        S3ObjectStore("frames", endpoint_url=server.endpoint, max_attempts=1) as store,
        pytest.raises(ObjectStoreError, match=f"credentials rejected by .*{code}"),
    ):
        store.put("k", b"v")


@pytest.mark.slow  # an S3 stand-in server and boto3 clients
def test_invalid_keys_make_no_request(
    refusing: Callable[..., RefusingServer], tmp_path: Path
) -> None:
    needs_boto3()
    server = refusing(allow_head=True)
    source = tmp_path / "source"
    source.write_bytes(b"data")
    with S3ObjectStore("frames", prefix="p" * 1000, endpoint_url=server.endpoint) as store:
        assert [r[0] for r in server.requests] == ["HEAD"]  # the bucket check at open
        for key in ["../escape", "a//b", "", "x" * 30]:  # the last is too long with the prefix
            with pytest.raises(InvalidKeyError):
                store.put(key, b"data")
            with pytest.raises(InvalidKeyError):
                store.put_file(key, source)
            with pytest.raises(InvalidKeyError):
                store.get_file(key, tmp_path / "dest")
            with pytest.raises(InvalidKeyError):
                store.copy("ok", key)
            for call in (store.get, store.stat, store.exists, store.delete):
                with pytest.raises(InvalidKeyError):
                    call(key)
        with pytest.raises(InvalidKeyError):
            store.list("../")
    assert len(server.requests) == 1
    assert not (tmp_path / "dest").exists()


@pytest.mark.slow  # an S3 stand-in server and boto3 clients
def test_credentials_precedence(
    refusing: Callable[..., RefusingServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_boto3()
    server = refusing(allow_head=True)

    def credential_of_last_request() -> str:
        authorization = server.requests[-1][2]["Authorization"]
        return authorization.split("Credential=", 1)[1].split("/", 1)[0]

    S3ObjectStore("frames", endpoint_url=server.endpoint).close()
    assert credential_of_last_request() == "testing"  # AWS_ACCESS_KEY_ID
    monkeypatch.setenv("FRAMEPIPE_S3_ACCESS_KEY", "fp-key")
    monkeypatch.setenv("FRAMEPIPE_S3_SECRET_KEY", "fp-secret")
    S3ObjectStore("frames", endpoint_url=server.endpoint).close()
    assert credential_of_last_request() == "fp-key"
    S3ObjectStore(
        "frames", endpoint_url=server.endpoint, access_key="arg-key", secret_key="arg-secret"
    ).close()
    assert credential_of_last_request() == "arg-key"


@pytest.mark.slow  # an S3 stand-in server and boto3 clients
def test_no_credentials_is_a_config_error(
    refusing: Callable[..., RefusingServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_boto3()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_DEFAULT_REGION")  # and no region: S3's default applies
    server = refusing(allow_head=True)
    with pytest.raises(
        ConfigError,
        match="no S3 credentials for bucket 'frames' at "
        f"{server.endpoint}.*FRAMEPIPE_S3_ACCESS_KEY",
    ):
        S3ObjectStore("frames", endpoint_url=server.endpoint)
    assert server.requests == []  # found missing before sending anything
    monkeypatch.setenv("FRAMEPIPE_S3_ACCESS_KEY", "fp-key")
    monkeypatch.setenv("FRAMEPIPE_S3_SECRET_KEY", "fp-secret")
    S3ObjectStore("frames", endpoint_url=server.endpoint).close()
    assert [r[0] for r in server.requests] == ["HEAD"]


@pytest.mark.slow  # boto3 clients waiting on dead endpoints
def test_unreachable_endpoint() -> None:
    needs_boto3()
    port = free_port()  # nothing listens there
    endpoint = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with pytest.raises(ObjectStoreError, match=f"cannot reach S3 endpoint {endpoint}: ") as exc:
        S3ObjectStore("frames", endpoint_url=endpoint, max_attempts=1)
    assert "'frames'" in str(exc.value)
    assert time.monotonic() - started < 10
    with pytest.raises(ObjectStoreError, match=f"cannot reach S3 endpoint {endpoint}"):
        open_object_store(f"s3://frames?endpoint={endpoint}")


@pytest.mark.slow  # boto3 clients waiting on dead endpoints
def test_endpoint_that_never_answers() -> None:
    needs_boto3()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog; nothing ever answers
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(
            ObjectStoreError, match=f"S3 endpoint {endpoint} did not answer within 0.3 s"
        ):
            S3ObjectStore("frames", endpoint_url=endpoint, read_timeout=0.3, max_attempts=1)


# -- packaging ---------------------------------------------------------------------------------


def test_missing_boto3_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if it were not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'framepipe\[s3\]'"):
        S3ObjectStore("frames", endpoint_url="http://127.0.0.1:9")
    with pytest.raises(
        MissingDependencyError, match="the S3 object store needs the 'boto3' package"
    ):
        open_object_store("s3://frames")


@pytest.mark.slow  # a fresh interpreter
def test_package_import_does_not_import_boto3() -> None:
    code = (
        "import sys, framepipe, framepipe.backends.objects as objects\n"
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules\n"
        "assert objects.S3ObjectStore.__name__ == 'S3ObjectStore'\n"
        "assert 'boto3' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("read_timeout=0", "read_timeout='0', expected seconds above 0"),
        ("connect_timeout=soon", "connect_timeout='soon', expected seconds"),
        ("read_timeout=nan", "read_timeout='nan'"),
        ("max_attempts=0", "max_attempts='0', expected a whole number 1-20"),
        ("max_attempts=2.5", "max_attempts='2.5'"),
    ],
)
def test_an_s3_url_s_timeouts_are_checked(query: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_object_store(f"s3://bucket?endpoint=http://127.0.0.1:9&{query}")


@pytest.mark.parametrize("attempts", [1, 2])
def test_max_attempts_counts_every_attempt(aws_env: None, attempts: int) -> None:
    """``max_attempts`` is the number of tries in all, as its name says (botocore's own
    ``max_attempts`` counts retries: 3 made 4 tries). A server that accepts and never answers
    is asked exactly that many times."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = hung.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        with pytest.raises(ObjectStoreError):
            S3ObjectStore(
                "frames",
                endpoint_url=f"http://127.0.0.1:{hung.getsockname()[1]}",
                connect_timeout=1,
                read_timeout=0.3,
                max_attempts=attempts,
            )
        assert len(accepted) == attempts
    finally:
        hung.close()
        for conn in accepted:
            conn.close()


@pytest.mark.slow  # an S3 server of its own, frozen
def test_the_url_s_timeouts_bound_how_long_a_frozen_server_holds_a_put(
    tmp_path: Path, aws_env: None
) -> None:
    """A server that takes the connection and never answers (frozen with SIGSTOP) holds a put
    for ``read_timeout x max_attempts`` (60 s x 3 by default): with ``read_timeout=1`` and
    ``max_attempts=2`` in the URL it is refused after about 2 s, naming the timeout."""
    import signal

    port = free_port()
    proc = start_moto(port, tmp_path / "s3.log")
    try:
        assert _wait_listening(proc, port, time.monotonic() + 60), "moto did not start"
        url = f"s3://frames?endpoint=http://127.0.0.1:{port}&create=1"
        with open_object_store(f"{url}&read_timeout=1&max_attempts=2") as store:
            assert store.url == f"s3://frames?endpoint=http://127.0.0.1:{port}"
            store.put("a", b"x")
            proc.send_signal(signal.SIGSTOP)
            outcome: list[BaseException | None] = []

            def put() -> None:
                try:
                    store.put("b", b"y")
                except BaseException as exc:
                    outcome.append(exc)
                else:
                    outcome.append(None)

            threading.Thread(target=put, daemon=True).start()
            wait_until("the put refused", lambda: outcome, 30)  # 180 s with the defaults
            [error] = outcome
            assert isinstance(error, ObjectStoreError)
            assert "timeout" in str(error).lower() or "timed out" in str(error).lower(), error
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()
