"""LocalObjectStore on the real filesystem: what only a folder store does (files and folders
on disk, temp files, reserved names, symlinks, file URLs and paths, durability). The contract
every store keeps (round trips, list, copy, atomic downloads, key rules, lifecycle) is in
test_objects_contract.py, run there on this store too."""

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
    ObjectStore,
    open_object_store,
    validate_key,
)
from framepipe.errors import InvalidKeyError, ObjectStoreError


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalObjectStore]:
    with LocalObjectStore(tmp_path / "store") as opened:
        yield opened


def keys(store: ObjectStore, prefix: str = "") -> list[str]:
    return [info.key for info in store.list(prefix)]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- files on disk ----------------------------------------------------------------------------


def test_objects_are_files_under_the_root(store: LocalObjectStore, tmp_path: Path) -> None:
    store.put("frames/cam1/0001.jpg", b"\xff\xd8jpeg")
    assert (store.root / "frames" / "cam1" / "0001.jpg").read_bytes() == b"\xff\xd8jpeg"
    source = tmp_path / "video.mp4"
    source.write_bytes(os.urandom(1000))
    store.put_file("videos/v.mp4", source)
    assert (store.root / "videos" / "v.mp4").read_bytes() == source.read_bytes()
    assert tree(store.root) == {
        "frames",
        "frames/cam1",
        "frames/cam1/0001.jpg",
        "videos",
        "videos/v.mp4",
    }  # no temp file left


def test_stat_is_the_file_and_delete_prunes_folders(store: LocalObjectStore) -> None:
    store.put("x/y", b"123")
    store.put("x/z/deeper", b"1")
    assert store.stat("x/y").modified == pytest.approx((store.root / "x" / "y").stat().st_mtime)
    assert store.delete("x/z/deeper") is True
    assert tree(store.root) == {"x", "x/y"}  # the emptied folder x/z is pruned
    assert store.delete("x/y") is True
    assert not (store.root / "x").exists()  # empty directories are pruned
    assert store.root.is_dir()  # but never the root


def test_conflicting_keys_raise_store_error(store: LocalObjectStore) -> None:
    store.put("a", b"file")
    with pytest.raises(ObjectStoreError, match="'a/b'"):
        store.put("a/b", b"under a file")
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]


def test_list_excludes_temp_files(store: LocalObjectStore) -> None:
    store.put("d/real", b"x")
    (store.root / "d" / ".tmp-abandoned").write_bytes(b"partial")
    (store.root / ".tmp-top").write_bytes(b"partial")
    assert keys(store) == ["d/real"]


# -- reserved names ---------------------------------------------------------------------------


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


def test_a_symlink_that_stays_inside_the_root_is_followed(tmp_path: Path) -> None:
    """Only a path that leaves the root is refused: a link from one folder of the store to
    another (a second name for a camera's folder) works, at any depth of the key."""
    with LocalObjectStore(tmp_path / "store") as store:
        store.put("cams/real/a.jpg", b"a")
        (store.root / "cams" / "alias").symlink_to(store.root / "cams" / "real")
        (store.root / "cams" / "real" / "b.jpg").symlink_to(store.root / "cams" / "real" / "a.jpg")
        assert store.get("cams/alias/a.jpg") == b"a"
        assert store.get("cams/real/b.jpg") == b"a"
        store.put("cams/alias/new/c.jpg", b"c")
        assert (store.root / "cams" / "real" / "new" / "c.jpg").read_bytes() == b"c"
        (store.root / "cams" / "real" / "up").symlink_to(tmp_path)  # a link out, deeper down
        with pytest.raises(InvalidKeyError, match="symlink"):
            store.put("cams/alias/up/x.jpg", b"x")
    assert not (tmp_path / "x.jpg").exists()


# -- lifecycle --------------------------------------------------------------------------------


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


# -- properties -------------------------------------------------------------------------------

segment = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/\\:"),
    min_size=1,
    max_size=20,
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
