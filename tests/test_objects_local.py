"""LocalObjectStore on the real filesystem, and the key rules every store enforces."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framepipe.backends.objects import (
    LocalObjectStore,
    ObjectInfo,
    ObjectStore,
    open_object_store,
    validate_key,
)
from framepipe.errors import InvalidKeyError, ObjectNotFoundError, ObjectStoreError


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalObjectStore]:
    with LocalObjectStore(tmp_path / "store") as opened:
        yield opened


def keys(store: ObjectStore, prefix: str = "") -> list[str]:
    return [info.key for info in store.list(prefix)]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- round trips ------------------------------------------------------------------------------


def test_put_get_round_trip(store: LocalObjectStore) -> None:
    info = store.put("frames/cam1/0001.jpg", b"\xff\xd8jpeg")
    assert info.key == "frames/cam1/0001.jpg"
    assert info.size == 6
    assert store.get("frames/cam1/0001.jpg") == b"\xff\xd8jpeg"
    assert (store.root / "frames" / "cam1" / "0001.jpg").read_bytes() == b"\xff\xd8jpeg"


def test_put_empty_object(store: LocalObjectStore) -> None:
    store.put("empty", b"")
    assert store.get("empty") == b""
    assert store.stat("empty").size == 0


def test_put_file_and_get_file(store: LocalObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "video.mp4"
    source.write_bytes(os.urandom(300_000))
    info = store.put_file("videos/v.mp4", source)
    assert info.size == 300_000
    dest = store.get_file("videos/v.mp4", tmp_path / "out" / "copy.mp4")
    assert dest == tmp_path / "out" / "copy.mp4"
    assert dest.read_bytes() == source.read_bytes()
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".tmp-")]


def test_put_file_missing_source(store: LocalObjectStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.put_file("k", tmp_path / "nope")
    assert not store.exists("k")


def test_put_rejects_str(store: LocalObjectStore) -> None:
    with pytest.raises(TypeError, match="needs bytes"):
        store.put("k", "text")  # type: ignore[arg-type]


def test_put_overwrites(store: LocalObjectStore) -> None:
    store.put("a/b", b"first version")
    store.put("a/b", b"v2")
    assert store.get("a/b") == b"v2"
    assert store.stat("a/b").size == 2
    assert keys(store) == ["a/b"]


def test_stat_exists_delete(store: LocalObjectStore) -> None:
    assert not store.exists("x/y")
    store.put("x/y", b"123")
    info = store.stat("x/y")
    assert info == ObjectInfo("x/y", 3, info.modified)
    assert info.modified == pytest.approx((store.root / "x" / "y").stat().st_mtime)
    assert store.exists("x/y")
    assert store.delete("x/y") is True
    assert store.delete("x/y") is False
    assert not store.exists("x/y")
    assert not (store.root / "x").exists()  # empty directories are pruned


def test_missing_key_errors_name_key_and_store(store: LocalObjectStore) -> None:
    with pytest.raises(ObjectNotFoundError) as excinfo:
        store.get("no/such")
    assert "'no/such'" in str(excinfo.value)
    assert store.url in str(excinfo.value)
    with pytest.raises(ObjectNotFoundError):
        store.stat("no/such")
    with pytest.raises(KeyError):  # ObjectNotFoundError is also a KeyError
        store.get("no/such")


def test_directory_is_not_an_object(store: LocalObjectStore) -> None:
    store.put("dir/file", b"x")
    assert not store.exists("dir")
    with pytest.raises(ObjectNotFoundError):
        store.get("dir")
    with pytest.raises(ObjectNotFoundError):
        store.get("dir/file/deeper")


def test_key_reused_after_children_deleted(store: LocalObjectStore) -> None:
    store.put("a/b/c", b"1")
    store.delete("a/b/c")
    store.put("a", b"2")
    assert store.get("a") == b"2"


def test_conflicting_keys_raise_store_error(store: LocalObjectStore) -> None:
    store.put("a", b"file")
    with pytest.raises(ObjectStoreError, match="'a/b'"):
        store.put("a/b", b"under a file")
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]


# -- list -------------------------------------------------------------------------------------


def test_list_sorted_with_prefixes(store: LocalObjectStore) -> None:
    for key in ["b", "a/2", "a/1", "a-c", "a0", "ab/x", "frames/cam1/1", "frames/cam10/1"]:
        store.put(key, key.encode())
    everything = keys(store)
    assert everything == sorted(everything)
    assert everything == ["a-c", "a/1", "a/2", "a0", "ab/x", "b", "frames/cam1/1",
                          "frames/cam10/1"]
    assert keys(store, "a/") == ["a/1", "a/2"]
    assert keys(store, "a") == ["a-c", "a/1", "a/2", "a0", "ab/x"]
    assert keys(store, "frames/cam1") == ["frames/cam1/1", "frames/cam10/1"]
    assert keys(store, "frames/cam1/") == ["frames/cam1/1"]
    assert keys(store, "nothing/") == []
    assert keys(store, "b/") == []
    infos = list(store.list("a/"))
    assert infos[0] == store.stat("a/1")


def test_list_excludes_temp_files(store: LocalObjectStore) -> None:
    store.put("d/real", b"x")
    (store.root / "d" / ".tmp-abandoned").write_bytes(b"partial")
    (store.root / ".tmp-top").write_bytes(b"partial")
    assert keys(store) == ["d/real"]


@pytest.mark.parametrize("prefix", ["/", "/a", "../", "a/../b", "a//", "a\\b"])
def test_list_rejects_bad_prefix(store: LocalObjectStore, prefix: str) -> None:
    with pytest.raises(InvalidKeyError, match="prefix"):
        store.list(prefix)


# -- copy -------------------------------------------------------------------------------------


def test_copy(store: LocalObjectStore) -> None:
    store.put("src", b"payload")
    store.put("dst/old", b"old")
    info = store.copy("src", "dst/old")
    assert info.key == "dst/old"
    assert info.size == 7
    assert store.get("dst/old") == b"payload"
    assert store.get("src") == b"payload"
    with pytest.raises(ObjectNotFoundError, match="'missing'"):
        store.copy("missing", "dst/new")
    assert not store.exists("dst/new")
    with pytest.raises(InvalidKeyError):
        store.copy("src", "../escape")


def test_base_copy_through_temp_file(store: LocalObjectStore) -> None:
    store.put("src", b"payload")
    info = ObjectStore._copy(store, "src", "via/base")
    assert info is not None
    assert store.get("via/base") == b"payload"
    assert ObjectStore._copy(store, "missing", "x") is None


# -- get_file atomicity -----------------------------------------------------------------------


def test_get_file_missing_key_leaves_dest_untouched(store: LocalObjectStore,
                                                     tmp_path: Path) -> None:
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


def test_get_file_failure_mid_download_leaves_no_partial(tmp_path: Path) -> None:
    class Failing(LocalObjectStore):
        def _get_file(self, key: str, path: Path) -> bool:
            path.write_bytes(b"half")
            raise OSError("connection reset")

    with Failing(tmp_path / "store") as store:
        store.put("k", b"whole object")
        dest = tmp_path / "out" / "k"
        with pytest.raises(OSError, match="connection reset"):
            store.get_file("k", dest)
        assert list((tmp_path / "out").iterdir()) == []


# -- invalid keys -----------------------------------------------------------------------------

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
def test_invalid_keys_rejected(tmp_path: Path, key: str) -> None:
    with pytest.raises(InvalidKeyError, match="invalid object key") as excinfo:
        validate_key(key)
    assert isinstance(excinfo.value, ValueError)
    with LocalObjectStore(tmp_path / "store") as store:
        with pytest.raises(InvalidKeyError):
            store.put(key, b"data")
        source = tmp_path / "source"
        source.write_bytes(b"data")
        with pytest.raises(InvalidKeyError):
            store.put_file(key, source)
        store.put("ok", b"data")
        with pytest.raises(InvalidKeyError):
            store.copy("ok", key)
        for call in (store.get, store.stat, store.exists, store.delete):
            with pytest.raises(InvalidKeyError):
                call(key)
        with pytest.raises(InvalidKeyError):
            store.get_file(key, tmp_path / "dest")
    assert tree(tmp_path) == {"store", "store/ok", "source"}


def test_invalid_key_message_says_what_is_wrong() -> None:
    with pytest.raises(InvalidKeyError, match=r"'a/\.\./b'.*'\.\.' segment"):
        validate_key("a/../b")
    with pytest.raises(InvalidKeyError, match="must be a str"):
        validate_key(b"bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["a", "a/b.jpg", "..foo", "a/.hidden", "ab:c", "a/C:", "ü/ñ",
                                 "x" * 1024, "with space/and-dash_under.score"])
def test_valid_keys(key: str) -> None:
    assert validate_key(key) == key


def test_local_store_reserves_temp_names_and_long_segments(store: LocalObjectStore) -> None:
    with pytest.raises(InvalidKeyError, match="reserved"):
        store.put("a/.tmp-x", b"data")
    with pytest.raises(InvalidKeyError, match="255"):
        store.put("a/" + "x" * 256, b"data")


# -- symlinks ---------------------------------------------------------------------------------


def test_symlink_escape_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    with LocalObjectStore(tmp_path / "store") as store:
        (store.root / "link").symlink_to(outside, target_is_directory=True)
        (store.root / "filelink").symlink_to(outside / "secret")
        with pytest.raises(InvalidKeyError, match="symlink"):
            store.put("link/new", b"data")
        with pytest.raises(InvalidKeyError):
            store.get("link/secret")
        with pytest.raises(InvalidKeyError):
            store.get("filelink")
        with pytest.raises(InvalidKeyError):
            store.delete("link/secret")
        assert keys(store) == []
        assert keys(store, "link/") == []
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_bytes() == b"secret"


# -- lifecycle --------------------------------------------------------------------------------


def test_use_after_close(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    store.put("k", b"v")
    store.close()
    store.close()  # idempotent
    assert store.closed
    for call in (lambda: store.get("k"), lambda: store.put("k", b"v"),
                 lambda: store.exists("k"), lambda: store.list(""), lambda: store.delete("k"),
                 lambda: store.copy("k", "j"), lambda: store.stat("k"),
                 lambda: store.get_file("k", tmp_path / "d")):
        with pytest.raises(ObjectStoreError, match="closed"):
            call()


def test_context_manager_closes(tmp_path: Path) -> None:
    with LocalObjectStore(tmp_path / "store") as store:
        assert not store.closed
    assert store.closed


def test_create_false_requires_existing_dir(tmp_path: Path) -> None:
    with pytest.raises(ObjectStoreError, match="does not exist"):
        LocalObjectStore(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ObjectStoreError):
        LocalObjectStore(tmp_path / "file")


# -- open_object_store ------------------------------------------------------------------------


def test_open_file_url(tmp_path: Path) -> None:
    root = tmp_path / "objs dir"
    with open_object_store(root.as_uri()) as store:
        assert isinstance(store, LocalObjectStore)
        assert store.root == root.resolve()
        assert store.url == root.resolve().as_uri()
        store.put("k", b"v")
    assert (root / "k").read_bytes() == b"v"
    with open_object_store(store.url) as again:
        assert again.get("k") == b"v"


def test_open_plain_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_object_store(str(tmp_path / "plain")) as store:
        assert isinstance(store, LocalObjectStore)
        assert store.root == (tmp_path / "plain").resolve()
    monkeypatch.chdir(tmp_path)
    with open_object_store(".framepipe/objects") as store:
        assert isinstance(store, LocalObjectStore)
        assert store.root == (tmp_path / ".framepipe" / "objects").resolve()


@pytest.mark.parametrize(("url", "message"), [
    ("memory://", "unsupported.*'memory'.*file:///"),
    ("https://example.com/x", "unsupported.*'https'"),
    ("file://otherhost/path", "host 'otherhost'"),
    ("file:///tmp/x?create=false", "no options"),
    ("", "empty"),
])
def test_open_rejects(url: str, message: str) -> None:
    with pytest.raises(ObjectStoreError, match=message):
        open_object_store(url)


def test_open_redacts_credentials() -> None:
    with pytest.raises(ObjectStoreError) as excinfo:
        open_object_store("s3://key:hunter2@bucket/prefix")
    assert "hunter2" not in str(excinfo.value)


# -- properties -------------------------------------------------------------------------------

segment = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs"),
                           blacklist_characters="/\\:"),
    min_size=1, max_size=20,
).filter(lambda s: s not in (".", "..") and not s.startswith(".tmp-"))
segments = st.lists(segment, min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(parts=segments, data=st.binary(max_size=64))
def test_safe_keys_round_trip(parts: list[str], data: bytes) -> None:
    key = "/".join(parts)
    with tempfile.TemporaryDirectory() as tmp, LocalObjectStore(tmp) as store:
        assert validate_key(key) == key
        store.put(key, data)
        assert store.get(key) == data
        assert keys(store) == [key]
        assert store.delete(key)
        assert os.listdir(tmp) == []


@settings(max_examples=100, deadline=None)
@given(parts=segments, where=st.integers(min_value=0))
def test_dotdot_segment_rejected(parts: list[str], where: int) -> None:
    parts.insert(where % (len(parts) + 1), "..")
    key = "/".join(parts)
    with pytest.raises(InvalidKeyError):
        validate_key(key)
    with tempfile.TemporaryDirectory() as tmp:
        with LocalObjectStore(Path(tmp) / "store") as store, pytest.raises(InvalidKeyError):
            store.put(key, b"x")
        assert os.listdir(tmp) == ["store"]
        assert os.listdir(Path(tmp) / "store") == []


def test_non_durable_store_is_still_atomic(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "fast", durable=False)
    store.put("frames/a/1.jpg", b"x" * 1000)
    assert store.get("frames/a/1.jpg") == b"x" * 1000
    assert [o.key for o in store.list()] == ["frames/a/1.jpg"]
    assert not [p for p in (tmp_path / "fast").rglob("*") if p.name.startswith(".tmp-")]
