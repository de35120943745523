"""The object-store contract: what every store does, run on each backend in turn.

``local`` is a LocalObjectStore in a temporary folder; ``s3`` and ``s3-prefixed`` (objects under
``tenant/one/``) are S3ObjectStores on the real S3-compatible server of tests/s3server.py,
started once per session on loopback (the ``s3_server`` fixture of conftest.py), each test in
a bucket of its own. Each test also sees the backend's raw storage (the files
under the folder, the objects in the bucket), so "nothing was written" and "nothing was left
behind" are checked where the data lives, not only through the store's own API. Behaviours of
one backend only (the filesystem for local; prefixes, paging, multipart, credentials for S3)
are in test_objects_local.py and test_objects_s3.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from framepipe.backends.objects import (
    LocalObjectStore,
    ObjectInfo,
    ObjectStore,
    S3ObjectStore,
    open_object_store,
    validate_key,
)
from framepipe.errors import (
    ConfigError,
    InvalidKeyError,
    ObjectNotFoundError,
    ObjectReplacedError,
    ObjectStoreError,
)
from s3server import REGION, S3Server

# The S3 cases share one server process, but each opens a bucket and a client: seconds in all.
BACKENDS = [
    "local",
    pytest.param("s3", marks=pytest.mark.slow),
    pytest.param("s3-prefixed", marks=pytest.mark.slow),
]
S3_PREFIX = "tenant/one"


def keys(store: ObjectStore, prefix: str = "") -> list[str]:
    return [info.key for info in store.list(prefix)]


@dataclass
class Backend:
    """The store under test, how to open another store on the same storage, and what the
    storage holds, read around the store: ``stored()`` lists the names relative to the store's
    root (a folder's files and sub-folders with a trailing ``/``; a bucket's objects under the
    prefix) and anything outside it as ``"<outside> name"``."""

    name: str
    store: ObjectStore
    open: Callable[[], ObjectStore]
    stored: Callable[[], list[str]]


def _local(tmp_path: Path) -> Iterator[Backend]:
    container = tmp_path / "objects"
    root = container / "store"

    def stored() -> list[str]:
        names = []
        for path in container.rglob("*"):
            suffix = "/" if path.is_dir() and not path.is_symlink() else ""
            if path.is_relative_to(root) and path != root:
                names.append(path.relative_to(root).as_posix() + suffix)
            elif path != root:
                names.append(f"<outside> {path.relative_to(container).as_posix()}{suffix}")
        return sorted(names)

    with LocalObjectStore(root) as store:
        yield Backend("local", store, lambda: LocalObjectStore(root, create=False), stored)


def _s3(request: pytest.FixtureRequest, name: str, prefix: str) -> Iterator[Backend]:
    request.getfixturevalue("aws_env")
    server: S3Server = request.getfixturevalue("s3_server")
    bucket = server.new_bucket()
    under = f"{prefix}/" if prefix else ""

    def open_() -> ObjectStore:
        return S3ObjectStore(bucket, prefix=prefix, endpoint_url=server.endpoint, region=REGION)

    def stored() -> list[str]:
        listed = server.client.list_objects_v2(Bucket=bucket).get("Contents", [])
        return sorted(
            item["Key"].removeprefix(under)
            if item["Key"].startswith(under)
            else f"<outside> {item['Key']}"
            for item in listed
        )

    try:
        with open_() as store:
            yield Backend(name, store, open_, stored)
    finally:
        server.drop_bucket(bucket)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        yield from _local(tmp_path)
    else:
        yield from _s3(request, request.param, S3_PREFIX if request.param == "s3-prefixed" else "")


@pytest.fixture
def store(backend: Backend) -> ObjectStore:
    return backend.store


# -- round trips ------------------------------------------------------------------------------


def test_put_get_round_trip(backend: Backend) -> None:
    store = backend.store
    info = store.put("frames/cam1/0001.jpg", b"\xff\xd8jpeg")
    assert info.key == "frames/cam1/0001.jpg"
    assert info.size == 6
    assert abs(info.modified - time.time()) < 60
    assert store.get("frames/cam1/0001.jpg") == b"\xff\xd8jpeg"
    store.put("bytearray", bytearray(b"ba"))
    store.put("memoryview", memoryview(b"mv"))
    assert store.get("bytearray") == b"ba"
    assert store.get("memoryview") == b"mv"
    assert [name for name in backend.stored() if not name.endswith("/")] == [
        "bytearray",
        "frames/cam1/0001.jpg",
        "memoryview",
    ]


def test_put_empty_object(store: ObjectStore) -> None:
    store.put("empty", b"")
    assert store.get("empty") == b""
    assert store.stat("empty").size == 0


def test_put_file_and_get_file(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "video.mp4"
    source.write_bytes(os.urandom(300_000))
    info = store.put_file("videos/v.mp4", source)
    assert info.key == "videos/v.mp4"
    assert info.size == 300_000
    dest = store.get_file("videos/v.mp4", tmp_path / "out" / "copy.mp4")
    assert dest == tmp_path / "out" / "copy.mp4"
    assert dest.read_bytes() == source.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["copy.mp4"]  # no temp file left


def test_put_file_missing_source(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.put_file("k", tmp_path / "nope")
    assert not store.exists("k")


def test_put_rejects_str(backend: Backend) -> None:
    with pytest.raises(TypeError, match="needs bytes"):
        backend.store.put("k", "text")  # type: ignore[arg-type]
    assert backend.stored() == []


def test_put_overwrites(store: ObjectStore, tmp_path: Path) -> None:
    store.put("a/b", b"first version")
    store.put("a/b", b"v2")
    assert store.get("a/b") == b"v2"
    assert store.stat("a/b").size == 2
    source = tmp_path / "v3"
    source.write_bytes(b"version 3")
    store.put_file("a/b", source)
    assert store.get("a/b") == b"version 3"
    assert keys(store) == ["a/b"]


def test_stat_exists_delete(backend: Backend) -> None:
    store = backend.store
    assert not store.exists("x/y")
    put = store.put("x/y", b"123")
    info = store.stat("x/y")
    assert info == ObjectInfo("x/y", 3, info.modified, put.version)
    assert info.modified == pytest.approx(put.modified, abs=2)
    assert store.exists("x/y")
    assert store.delete("x/y") is True
    assert store.delete("x/y") is False
    assert not store.exists("x/y")
    assert keys(store) == []
    assert backend.stored() == []  # nothing left behind: no object, no empty folder


def test_delete_many_removes_what_it_names_in_batches(backend: Backend) -> None:
    store = backend.store
    names = [f"frames/{i:05d}.jpg" for i in range(1205)]  # more than one S3 request
    for name in names:
        store.put(name, b"x")
    store.put("kept/a", b"y")
    assert store.delete_many([*names, "frames/never-there.jpg"]) == 1206
    assert keys(store) == ["kept/a"]
    assert not [n for n in backend.stored() if n.startswith("frames")]  # no empty folder
    assert store.delete_many([]) == 0


def test_delete_many_refuses_a_bad_key_before_deleting_anything(store: ObjectStore) -> None:
    store.put("a/1", b"x")
    with pytest.raises(InvalidKeyError, match=r"\.\./escape"):
        store.delete_many(["a/1", "../escape"])
    assert keys(store) == ["a/1"]


def test_missing_key_errors_name_key_and_store(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFoundError) as excinfo:
        store.get("no/such")
    assert "'no/such'" in str(excinfo.value)
    assert store.url in str(excinfo.value)
    with pytest.raises(ObjectNotFoundError):
        store.stat("no/such")
    with pytest.raises(KeyError):  # ObjectNotFoundError is also a KeyError
        store.get("no/such")


def test_folder_is_not_an_object(store: ObjectStore) -> None:
    store.put("dir/file", b"x")
    assert not store.exists("dir")
    with pytest.raises(ObjectNotFoundError):
        store.get("dir")
    with pytest.raises(ObjectNotFoundError):
        store.get("dir/file/deeper")
    assert store.delete("dir") is False
    assert store.get("dir/file") == b"x"


def test_key_reused_after_children_deleted(store: ObjectStore) -> None:
    store.put("a/b/c", b"1")
    store.delete("a/b/c")
    store.put("a", b"2")
    assert store.get("a") == b"2"
    assert keys(store) == ["a"]


# -- list -------------------------------------------------------------------------------------


def test_list_sorted_with_prefixes(store: ObjectStore) -> None:
    for key in [
        "b",
        "a/2",
        "a/1",
        "a-c",
        "a0",
        "ab/x",
        "frames/cam1/1",
        "frames/cam10/1",
        "ü/1",
        "z~",
    ]:
        store.put(key, key.encode())
    everything = keys(store)
    assert everything == sorted(everything)
    assert everything == [
        "a-c",
        "a/1",
        "a/2",
        "a0",
        "ab/x",
        "b",
        "frames/cam1/1",
        "frames/cam10/1",
        "z~",
        "ü/1",
    ]
    assert keys(store, "a/") == ["a/1", "a/2"]
    assert keys(store, "a") == ["a-c", "a/1", "a/2", "a0", "ab/x"]
    assert keys(store, "frames/cam1") == ["frames/cam1/1", "frames/cam10/1"]
    assert keys(store, "frames/cam1/") == ["frames/cam1/1"]
    assert keys(store, "nothing/") == []
    assert keys(store, "b/") == []
    infos = list(store.list("a/"))
    assert infos[0] == store.stat("a/1")


@pytest.mark.parametrize("prefix", ["/", "/a", "../", "a/../b", "a//", "a\\b"])
def test_list_rejects_bad_prefix(store: ObjectStore, prefix: str) -> None:
    with pytest.raises(InvalidKeyError, match="prefix"):
        store.list(prefix)


# -- copy -------------------------------------------------------------------------------------


def test_copy(store: ObjectStore) -> None:
    store.put("src", b"payload")
    store.put("dst/old", b"old")
    info = store.copy("src", "dst/old")
    assert info.key == "dst/old"
    assert info.size == 7
    assert info == store.stat("dst/old")
    assert store.get("dst/old") == b"payload"
    assert store.get("src") == b"payload"
    with pytest.raises(ObjectNotFoundError, match="'missing'"):
        store.copy("missing", "dst/new")
    assert not store.exists("dst/new")
    with pytest.raises(InvalidKeyError):
        store.copy("src", "../escape")


def test_base_copy_through_temp_file(store: ObjectStore) -> None:
    """The generic copy (download to a temp file, upload), which backends without a
    server-side copy use."""
    store.put("src", b"payload")
    info = ObjectStore._copy(store, "src", "via/base")
    assert info is not None
    assert info.key == "via/base"
    assert info.size == 7
    assert store.get("via/base") == b"payload"
    assert ObjectStore._copy(store, "missing", "x") is None
    assert not store.exists("x")


def test_a_version_changes_when_the_object_is_replaced_within_the_second(
    store: ObjectStore,
) -> None:
    """The version tag, not the modification time (whole seconds on S3), tells a replacement
    apart: the same size, at once."""
    put = store.put("v/a", b"first")
    info = store.stat("v/a")
    assert info.version is not None and info.version == put.version
    assert [i.version for i in store.list("v/")] == [info.version]
    replaced = store.put("v/a", b"other")
    assert replaced.version != info.version
    assert store.stat("v/a").version == replaced.version


@pytest.mark.parametrize("how", ["copy", "base"])
def test_a_copy_pinned_to_a_version_refuses_a_replaced_source_naming_the_key(
    store: ObjectStore, how: str
) -> None:
    """``copy(..., if_version=)`` copies the pinned version, and refuses the source once it
    was replaced (the same second, the same size), leaving the destination as it was; the
    generic copy through a temp file (``base``) keeps the same rule."""

    def copy(src: str, dst: str, version: str | None) -> ObjectInfo | None:
        if how == "copy":
            return store.copy(src, dst, if_version=version)
        return ObjectStore._copy(store, src, dst, version)

    pinned = store.put("uploads/clip.mp4", b"first").version
    assert pinned is not None
    store.put("job/input.mp4", b"old")
    copied = copy("uploads/clip.mp4", "job/input.mp4", pinned)
    assert copied is not None and copied.size == 5
    assert store.get("job/input.mp4") == b"first"
    store.put("uploads/clip.mp4", b"other")
    with pytest.raises(ObjectReplacedError, match=r"'uploads/clip\.mp4' was replaced") as refused:
        copy("uploads/clip.mp4", "job/input.mp4", pinned)
    assert refused.value.key == "uploads/clip.mp4" and refused.value.version == pinned
    assert store.get("job/input.mp4") == b"first"  # left as it was
    with pytest.raises(ObjectReplacedError):
        copy("uploads/clip.mp4", "job/new.mp4", pinned)
    assert not store.exists("job/new.mp4")
    store.delete("uploads/clip.mp4")
    if how == "copy":
        with pytest.raises(ObjectNotFoundError, match=r"'uploads/clip\.mp4'"):
            store.copy("uploads/clip.mp4", "job/new.mp4", if_version=pinned)
    else:
        assert ObjectStore._copy(store, "uploads/clip.mp4", "job/new.mp4", pinned) is None


def test_a_source_replaced_right_after_the_pinned_copy_looks_at_it_is_never_copied(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check of a pinned copy and the copy are one: a replacement just after the store's
    look at the source never reaches the destination. The local store copies the very file it
    opened and checked (the pinned bytes); S3 refuses, by ``CopySourceIfMatch`` or, on a
    server that ignores it, by the check after the copy, naming the key and leaving no copy.
    Once replaced, a pinned copy is refused either way."""
    store = backend.store
    pinned = store.put("uploads/clip.mp4", b"first").version
    assert pinned is not None
    look = "_open" if isinstance(store, LocalObjectStore) else "_head"
    looked = getattr(store, look)

    def look_then_replaced(key: str, *args: Any) -> Any:
        found = looked(key, *args)
        if key == "uploads/clip.mp4":
            store.put(key, b"other")
        return found

    monkeypatch.setattr(store, look, look_then_replaced)
    if isinstance(store, LocalObjectStore):
        copied = store.copy("uploads/clip.mp4", "job/input.mp4", if_version=pinned)
        assert copied.version != pinned and store.get("job/input.mp4") == b"first"
    else:
        with pytest.raises(
            ObjectReplacedError, match=r"'uploads/clip\.mp4' was replaced"
        ) as refused:
            store.copy("uploads/clip.mp4", "job/input.mp4", if_version=pinned)
        assert refused.value.key == "uploads/clip.mp4"
        assert "job/input.mp4" not in backend.stored()
    monkeypatch.undo()
    assert store.get("uploads/clip.mp4") == b"other"
    with pytest.raises(ObjectReplacedError, match=r"'uploads/clip\.mp4' was replaced"):
        store.copy("uploads/clip.mp4", "job/again.mp4", if_version=pinned)
    assert "job/again.mp4" not in backend.stored()


# -- get_file atomicity -----------------------------------------------------------------------


def test_get_file_missing_key_leaves_dest_untouched(store: ObjectStore, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "frame.jpg"
    dest.write_bytes(b"previous")
    with pytest.raises(ObjectNotFoundError):
        store.get_file("missing.jpg", dest)
    assert dest.read_bytes() == b"previous"
    assert [p.name for p in out.iterdir()] == ["frame.jpg"]

    fresh = out / "fresh.jpg"
    with pytest.raises(ObjectNotFoundError):
        store.get_file("missing.jpg", fresh)
    assert not fresh.exists()
    assert [p.name for p in out.iterdir()] == ["frame.jpg"]


def test_get_file_failure_mid_download_leaves_no_partial(
    store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put("k", b"whole object")
    download = store._get_file

    def fails_half_way(key: str, path: Path) -> bool:
        assert download(key, path)  # the real download, then the connection drops
        with path.open("r+b") as file:
            file.truncate(4)
        raise OSError("connection reset")

    monkeypatch.setattr(store, "_get_file", fails_half_way)
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous").write_bytes(b"previous")
    with pytest.raises(OSError, match="connection reset"):
        store.get_file("k", out / "k")
    with pytest.raises(OSError, match="connection reset"):
        store.get_file("k", out / "previous")
    assert sorted(p.name for p in out.iterdir()) == ["previous"]
    assert (out / "previous").read_bytes() == b"previous"


# -- keys -------------------------------------------------------------------------------------

INVALID_KEYS = [
    pytest.param("", id="empty"),
    pytest.param("/abs/path", id="leading-slash"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("..\\escape", id="backslash-dotdot"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\x7fb", id="del"),
    pytest.param("..", id="dotdot"),
    pytest.param("../escape", id="dotdot-first"),
    pytest.param("a/../../escape", id="dotdot-middle"),
    pytest.param("a/..", id="dotdot-last"),
    pytest.param(".", id="dot"),
    pytest.param("a/./b", id="dot-middle"),
    pytest.param("a//b", id="empty-segment"),
    pytest.param("a/", id="trailing-slash"),
    pytest.param("x" * 1025, id="too-long"),
    pytest.param("é" * 513, id="too-long-utf8"),
    pytest.param("C:", id="drive"),
    pytest.param("c:/Windows/x", id="drive-path"),
    pytest.param("C:escape", id="drive-relative"),
    pytest.param("a\ud800", id="lone-surrogate"),
]


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_rejected(backend: Backend, tmp_path: Path, key: str) -> None:
    store = backend.store
    source = tmp_path / "source"
    source.write_bytes(b"data")
    store.put("ok", b"data")
    with pytest.raises(InvalidKeyError):
        store.put(key, b"data")
    with pytest.raises(InvalidKeyError):
        store.put_file(key, source)
    with pytest.raises(InvalidKeyError):
        store.copy("ok", key)
    for call in (store.get, store.stat, store.exists, store.delete):
        with pytest.raises(InvalidKeyError):
            call(key)
    with pytest.raises(InvalidKeyError):
        store.get_file(key, tmp_path / "dest")
    assert keys(store) == ["ok"]
    assert backend.stored() == ["ok"]  # nothing written anywhere else, inside or outside
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "objects") == ["source"]


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_validate_key_rejects(key: str) -> None:
    with pytest.raises(InvalidKeyError, match="invalid object key") as excinfo:
        validate_key(key)
    assert isinstance(excinfo.value, ValueError)


def test_invalid_key_message_says_what_is_wrong() -> None:
    with pytest.raises(InvalidKeyError, match=r"'a/\.\./b'.*'\.\.' segment"):
        validate_key("a/../b")
    with pytest.raises(InvalidKeyError, match="must be a str"):
        validate_key(b"bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "a/b.jpg",
        "..foo",
        "a/.hidden",
        "ab:c",
        "a/C:",
        "ü/ñ",
        "x" * 1024,
        "with space/and-dash_under.score",
    ],
)
def test_valid_keys(key: str) -> None:
    assert validate_key(key) == key


# -- lifecycle --------------------------------------------------------------------------------


def test_use_after_close(store: ObjectStore, tmp_path: Path) -> None:
    store.put("k", b"v")
    store.close()
    store.close()  # idempotent
    assert store.closed
    for call in (
        lambda: store.get("k"),
        lambda: store.put("k", b"v"),
        lambda: store.exists("k"),
        lambda: store.list(""),
        lambda: store.delete("k"),
        lambda: store.copy("k", "j"),
        lambda: store.stat("k"),
        lambda: store.get_file("k", tmp_path / "d"),
    ):
        with pytest.raises(ObjectStoreError, match="closed"):
            call()


def test_context_manager_closes_and_storage_outlives_the_store(backend: Backend) -> None:
    backend.store.put("k", b"v")
    with backend.open() as other:
        assert not other.closed
        assert other.get("k") == b"v"
        other.put("from-other", b"o")
    assert other.closed
    assert backend.store.get("from-other") == b"o"
    with open_object_store(backend.store.url) as by_url:  # the url names the same storage
        assert keys(by_url) == ["from-other", "k"]


# -- open_object_store ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory://", "unsupported.*'memory'.*file:///"),
        ("https://example.com/x", "unsupported.*'https'"),
        ("file://otherhost/path", "host 'otherhost'"),
        ("file:///tmp/x?create=false", "no options"),
        ("", "empty"),
    ],
)
def test_open_rejects(url: str, message: str) -> None:
    """A wrong URL is a setting to fix (ConfigError), not a store that is away."""
    with pytest.raises(ConfigError, match=message):
        open_object_store(url)
