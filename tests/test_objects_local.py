"""LocalObjectStore on the real filesystem: what only a folder store does (files and folders
on disk, temp files, reserved names, symlinks, file URLs and paths, durability). The contract
every store keeps (round trips, list, copy, atomic downloads, key rules, lifecycle) is in
test_objects_contract.py, run there on this store too."""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framepipe.backends.objects import (
    LocalObjectStore,
    ObjectStore,
    open_object_store,
    validate_key,
)
from framepipe.backends.objects import local as local_module
from framepipe.errors import (
    InvalidKeyError,
    ObjectKeyConflictError,
    ObjectNotFoundError,
    ObjectReplacedError,
    ObjectStoreError,
)


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


def test_a_store_whose_folder_became_a_file_fails_as_the_store_not_the_key(
    tmp_path: Path,
) -> None:
    """The store's own folder replaced by a file (a share gone, a mount point reused): a
    write is the store's failure (:class:`ObjectStoreError`, retried or spooled by its
    callers as an outage), not a conflict of the key (which they take as the frame's own
    refusal); once the folder is back, the write works."""
    root = tmp_path / "objects"
    store = LocalObjectStore(root)
    store.put("frames/a.jpg", b"first")
    shutil.rmtree(root)
    root.write_bytes(b"not a folder")
    with pytest.raises(ObjectStoreError) as failed:
        store.put("frames/b.jpg", b"second")
    assert not isinstance(failed.value, ObjectKeyConflictError)
    assert "'frames/b.jpg'" in str(failed.value)
    root.unlink()
    root.mkdir()
    assert store.put("frames/b.jpg", b"second").size == 6


def test_conflicting_keys_are_refused_naming_the_key(store: LocalObjectStore) -> None:
    """A folder store cannot hold ``a/b`` while ``a`` is an object, nor ``d`` while ``d/x``
    exists: both are refused as a conflict naming the key (the client's to fix, not a failure
    of the store), and nothing is left behind or changed."""
    store.put("a", b"file")
    with pytest.raises(ObjectKeyConflictError, match="'a/b'") as under:
        store.put("a/b", b"under a file")
    assert under.value.key == "a/b"
    assert str(store.root) not in str(under.value)
    store.put("d/x", b"inside")
    with pytest.raises(ObjectKeyConflictError, match="other keys are stored under 'd/'"):
        store.put("d", b"over a folder")
    assert store.get("a") == b"file" and store.get("d/x") == b"inside"
    assert not [p for p in store.root.rglob(".tmp-*")]


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


def test_links_inside_follow_the_root_rule_whatever_their_form(tmp_path: Path) -> None:
    """Relative targets, ``..`` and chains of links are followed while they stay in the root;
    a sibling folder whose name starts like the root's is outside; a loop is an error."""
    (tmp_path / "store-other").mkdir()
    (tmp_path / "store-other" / "x").write_bytes(b"sibling")
    with LocalObjectStore(tmp_path / "store") as store:
        store.put("cams/real/a.jpg", b"a")
        cams = store.root / "cams"
        (cams / "rel").symlink_to("../cams/real")  # relative, through '..', stays inside
        (cams / "chain").symlink_to("rel")  # a link to a link
        (cams / "real" / "up.jpg").symlink_to("../real/a.jpg")
        assert store.get("cams/rel/a.jpg") == b"a"
        assert store.get("cams/chain/up.jpg") == b"a"
        assert store.stat("cams/chain/up.jpg").size == 1
        store.put("cams/chain/new/b.jpg", b"b")
        assert (cams / "real" / "new" / "b.jpg").read_bytes() == b"b"
        (cams / "out").symlink_to("../..")  # one level above the root
        (cams / "sibling").symlink_to(tmp_path / "store-other")
        (cams / "to-out").symlink_to("chain/../out")
        for key in ("cams/out/store-other/x", "cams/sibling/x", "cams/to-out/store-other/x"):
            with pytest.raises(InvalidKeyError, match="symlink"):
                store.get(key)
            with pytest.raises(InvalidKeyError, match="symlink"):
                store.put(key, b"overwritten")
        (cams / "loop").symlink_to("loop")
        with pytest.raises(ObjectStoreError, match=r"'cams/loop/x'.*symbolic links"):
            store.get("cams/loop/x")
    assert (tmp_path / "store-other" / "x").read_bytes() == b"sibling"
    assert sorted(os.listdir(tmp_path)) == ["store", "store-other"]


def test_absolute_links_through_the_configured_root_path_are_followed(tmp_path: Path) -> None:
    """A store configured as ``srv/store``, itself a link to ``data/store``: an absolute link
    written with the configured path (``latest -> srv/store/2024``) stays inside, as one
    written with the real path does; ``//`` and ``.`` in a target are no obstacle. A sibling
    whose name starts like the configured one, or a climb above it, is outside. The link is
    walked from the root opened at start: the configured path repointed elsewhere later
    never leads the store there."""
    real = tmp_path / "data" / "store"
    real.mkdir(parents=True)
    (tmp_path / "srv").mkdir()
    configured = tmp_path / "srv" / "store"
    configured.symlink_to(real, target_is_directory=True)
    (tmp_path / "srv" / "store-other").mkdir()
    (tmp_path / "srv" / "store-other" / "x").write_bytes(b"sibling")
    store = LocalObjectStore(configured)
    assert store.root == real.resolve()
    store.put("2024/cam/a.jpg", b"A")
    (real / "latest").symlink_to(f"{configured}/2024")
    (real / "odd").symlink_to(f"{tmp_path}/srv//./store/2024/")
    (real / "by-real-path").symlink_to(real / "2024")
    (real / "2024" / "cam" / "top.jpg").symlink_to(f"{configured}/2024/cam/a.jpg")
    for key in ("latest/cam/a.jpg", "odd/cam/a.jpg", "by-real-path/cam/a.jpg", "2024/cam/top.jpg"):
        assert store.get(key) == b"A", key
        assert store.stat(key).size == 1, key
    store.put("latest/cam/b.jpg", b"B")
    assert (real / "2024" / "cam" / "b.jpg").read_bytes() == b"B"
    store.copy("latest/cam/b.jpg", "latest/cam/c.jpg")
    assert store.delete("latest/cam/c.jpg") is True
    assert not (real / "2024" / "cam" / "c.jpg").exists()
    (real / "sibling").symlink_to(tmp_path / "srv" / "store-other")
    (real / "climb").symlink_to(f"{configured}/../store-other")
    for key in ("sibling/x", "climb/x"):
        with pytest.raises(InvalidKeyError, match="symlink"):
            store.get(key)
        with pytest.raises(InvalidKeyError, match="symlink"):
            store.put(key, b"overwritten")
    # repointed after open: the configured path now names another folder with the same layout
    decoy = tmp_path / "decoy"
    (decoy / "2024" / "cam").mkdir(parents=True)
    (decoy / "2024" / "cam" / "a.jpg").write_bytes(b"DECOY")
    configured.unlink()
    configured.symlink_to(decoy, target_is_directory=True)
    assert store.get("latest/cam/a.jpg") == b"A"
    store.put("latest/cam/d.jpg", b"D")
    assert (real / "2024" / "cam" / "d.jpg").read_bytes() == b"D"
    assert sorted(os.listdir(decoy / "2024" / "cam")) == ["a.jpg"]
    assert (tmp_path / "srv" / "store-other" / "x").read_bytes() == b"sibling"


def test_a_configured_root_path_that_is_not_the_root_is_no_alias(tmp_path: Path) -> None:
    """Only a configured path that resolves to the root at open is another name for it: a
    path whose ``..`` follows a link normalises to another folder, which stays outside."""
    (tmp_path / "elsewhere" / "store").mkdir(parents=True)
    (tmp_path / "elsewhere" / "store" / "x").write_bytes(b"elsewhere")
    (tmp_path / "a" / "store").mkdir(parents=True)
    (tmp_path / "hop").symlink_to(tmp_path / "a" / "store", target_is_directory=True)
    # tmp/hop/../store is tmp/a/store for the kernel, tmp/store by name
    store = LocalObjectStore(f"{tmp_path}/hop/../store")
    assert store.root == (tmp_path / "a" / "store").resolve()
    (store.root / "by-name").symlink_to(tmp_path / "store")
    (tmp_path / "store").symlink_to(tmp_path / "elsewhere" / "store")
    with pytest.raises(InvalidKeyError, match="symlink"):
        store.get("by-name/x")


def test_delete_through_a_linked_folder_prunes_the_keys_real_folders(tmp_path: Path) -> None:
    """A key reached through a link leaves no empty folder of its own behind, so a later put
    of a parent key does not find a folder there; the link, the folders its target names
    and the root stay, whatever the link's form."""
    with LocalObjectStore(tmp_path / "store", durable=False) as store:
        real = store.root
        store.put("2024/keep.jpg", b"k")
        (real / "rel").symlink_to("2024")
        store.put("rel/cam2/b.jpg", b"B")
        assert (real / "2024" / "cam2" / "b.jpg").read_bytes() == b"B"
        assert store.delete("rel/cam2/b.jpg") is True
        assert not (real / "2024" / "cam2").exists()
        assert store.put("2024/cam2", b"x").size == 1
        assert (real / "rel").is_symlink() and store.get("rel/keep.jpg") == b"k"

        # the folders a target names are the link's, kept even when left empty
        (real / "2024" / "cam3").mkdir()
        (real / "deep").symlink_to("2024/cam3")
        store.put("deep/x/y/z.jpg", b"z")
        assert store.delete("deep/x/y/z.jpg") is True
        assert (real / "2024" / "cam3").is_dir()
        assert os.listdir(real / "2024" / "cam3") == []
        assert (real / "deep").is_symlink()

        # an absolute link to the root itself: pruning stops below the root
        (real / "top").symlink_to(real)
        store.put("top/t/u.jpg", b"u")
        assert store.delete("top/t/u.jpg") is True
        assert not (real / "t").exists() and real.is_dir() and (real / "top").is_symlink()

        # a link deeper in the key, climbing with '..': only the folders after it go
        store.put("a/b/keep", b"k")
        (real / "a" / "b" / "up").symlink_to("../../2024")
        store.put("a/b/up/n/o.jpg", b"o")
        assert store.delete("a/b/up/n/o.jpg") is True
        assert not (real / "2024" / "n").exists()
        assert (real / "a" / "b" / "up").is_symlink()
        assert tree(real) == {
            "2024",
            "2024/keep.jpg",
            "2024/cam2",
            "2024/cam3",
            "rel",
            "deep",
            "top",
            "a",
            "a/b",
            "a/b/keep",
            "a/b/up",
        }


def test_errors_name_the_key_not_the_folder(store: LocalObjectStore) -> None:
    """A message shows the key and the store's URL (which the service replaces); no path
    below the root leaks through the reason of an ``OSError``."""
    (store.root / "cams").mkdir()
    (store.root / "cams" / "loop.jpg").symlink_to("loop.jpg")
    os.mkfifo(store.root / "cams" / "fifo.jpg")
    store.put("file", b"x")
    calls: list[Callable[[], object]] = [
        lambda: store.get("cams/loop.jpg"),
        lambda: store.get("cams/fifo.jpg"),
        lambda: store.put("file/under", b"x"),
    ]
    for call in calls:
        with pytest.raises(ObjectStoreError) as excinfo:
            call()
        message = str(excinfo.value)
        assert "'cams/" in message or "'file/under'" in message
        assert str(store.root) not in message.replace(store.url, "the object store")


# -- a neighbour swapping a folder for a link during a call ------------------------------------


@contextlib.contextmanager
def swap_before_call(k: int, swap: Callable[[], None]) -> Iterator[None]:
    """Run ``swap`` just before the ``k``-th call (from 0) this thread makes into ``os`` or
    ``io.open``: a neighbour's rename landing between two system calls of the store, at a
    chosen point instead of by luck."""
    count = 0

    def profile(frame: FrameType, event: str, arg: object) -> None:
        nonlocal count
        if event == "c_call" and (getattr(arg, "__module__", None) == "posix" or arg is io.open):
            if count == k:
                swap()
            count += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(previous)


OPERATIONS = ["get", "get_file", "stat", "copy", "put", "delete", "list"]


@pytest.mark.parametrize("operation", OPERATIONS)
def test_a_folder_swapped_for_a_link_mid_call_is_never_followed(
    tmp_path: Path, operation: str
) -> None:
    """Whenever during a call the folder ``d`` becomes a link out of the store, the call
    works in the folder it opened or refuses the key: it never reads, sizes, lists, writes
    or deletes outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"TOP SECRET, outside the store")
    (outside / "outside-only.txt").write_bytes(b"outside")
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    store = LocalObjectStore(tmp_path / "store")
    d, parked = store.root / "d", store.root / "d.real"

    swapped_at: list[int] = []

    def swap() -> None:
        if d.exists():  # a delete may have pruned it: then the link takes its free name
            d.rename(parked)
        d.symlink_to(outside, target_is_directory=True)
        swapped_at.append(k)

    calls: dict[str, Callable[[], object]] = {
        "get": lambda: store.get("d/secret.txt"),
        "get_file": lambda: store.get_file("d/secret.txt", tmp_path / "dest").read_bytes(),
        "stat": lambda: store.stat("d/secret.txt").size,
        "copy": lambda: store.copy("d/secret.txt", "copied") and store.get("copied"),
        "put": lambda: store.put("d/new.txt", b"new"),
        "delete": lambda: store.delete("d/secret.txt"),
        "list": lambda: [info.key for info in store.list()],
    }
    for k in range(60):
        for leftover in (d, parked):
            if leftover.is_symlink():
                leftover.unlink()
            elif leftover.exists():
                shutil.rmtree(leftover)
        store.root.joinpath("copied").unlink(missing_ok=True)
        d.mkdir()
        (d / "secret.txt").write_bytes(b"harmless")
        with swap_before_call(k, swap):
            try:
                result = calls[operation]()
            except InvalidKeyError:
                result = "refused"
        if k not in swapped_at:
            break  # the call made fewer than k system calls: every point was tried
        assert {p.name: p.read_bytes() for p in outside.iterdir()} == before, k
        assert result not in (b"TOP SECRET, outside the store", len(before["secret.txt"])), k
        if operation == "list":
            assert isinstance(result, list)
            assert "d/outside-only.txt" not in result, k
    assert len(swapped_at) >= 3


def test_a_folder_swapped_for_a_link_while_listing_is_not_entered(
    store: LocalObjectStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "outside-only.txt").write_bytes(b"outside")
    store.put("a/1", b"1")
    store.put("b/1", b"1")
    listing = store.list()
    assert next(listing).key == "a/1"  # the listing has seen folder b, not yet entered it
    (store.root / "b").rename(store.root / "b.real")
    (store.root / "b").symlink_to(outside, target_is_directory=True)
    assert [info.key for info in listing] == []


# -- what a neighbour plants where the store writes -------------------------------------------


def test_put_replaces_a_link_at_the_key_never_writes_through_it(
    store: LocalObjectStore, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim")
    (store.root / "k").symlink_to(victim)
    (store.root / "dangling").symlink_to(tmp_path / "would-be-created")
    store.put("k", b"new")
    store.put("dangling", b"new")
    assert victim.read_bytes() == b"victim"
    assert not (tmp_path / "would-be-created").exists()
    for name in ("k", "dangling"):
        assert not (store.root / name).is_symlink()
        assert (store.root / name).read_bytes() == b"new"
    (store.root / "gone").symlink_to(victim)
    assert store.delete("gone") is True  # the link is removed, not what it points to
    assert victim.read_bytes() == b"victim"


@pytest.mark.parametrize("planted", ["link-to-file", "dangling-link"])
def test_a_link_planted_at_the_temp_name_is_never_written_through(
    store: LocalObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planted: str
) -> None:
    """The temp file is created exclusively (``O_EXCL | O_NOFOLLOW``): a link at its name
    (guessed here by fixing the random part) fails the put and is left as it was."""
    monkeypatch.setattr(secrets, "token_hex", lambda nbytes=None: "0" * 16)
    victim = tmp_path / "victim"
    if planted == "link-to-file":
        victim.write_bytes(b"victim")
    (store.root / "cam").mkdir()
    temp = store.root / "cam" / ".tmp-0000000000000000"
    temp.symlink_to(victim)
    with pytest.raises(ObjectStoreError, match="'cam/k'"):
        store.put("cam/k", b"new")
    assert temp.is_symlink()
    assert not (store.root / "cam" / "k").exists()
    if planted == "link-to-file":
        assert victim.read_bytes() == b"victim"
    else:
        assert not victim.exists()


# -- special files ----------------------------------------------------------------------------


def within(seconds: float, call: Callable[[], object]) -> BaseException | object:
    """What ``call()`` returns or raises, failing the test if it takes longer than
    ``seconds`` (it runs in a daemon thread, so a blocked call cannot hang the suite)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for more than {seconds} s"
    return outcome[0]


@pytest.fixture
def fifo(store: LocalObjectStore) -> Iterator[Path]:
    """A FIFO at the key ``cam/x.jpg``; a reader left blocked on it is released at the end."""
    (store.root / "cam").mkdir()
    path = store.root / "cam" / "x.jpg"
    os.mkfifo(path)
    yield path
    for _ in range(100):  # each open for writing releases the readers waiting on it
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            break


def test_a_fifo_at_a_key_is_refused_at_once(
    store: LocalObjectStore, fifo: Path, tmp_path: Path
) -> None:
    (store.root / "cam" / "alias.jpg").symlink_to("x.jpg")
    dest = tmp_path / "dest"
    dest.write_bytes(b"previous")
    reads: list[Callable[[], object]] = [
        lambda: store.get("cam/x.jpg"),
        lambda: store.get("cam/alias.jpg"),
        lambda: store.get_file("cam/x.jpg", dest),
        lambda: store.copy("cam/x.jpg", "copied"),
    ]
    for read in reads:
        error = within(5, read)
        assert isinstance(error, ObjectStoreError), error
        assert not isinstance(error, ObjectNotFoundError)
        assert "not a regular file" in str(error)
        assert "'cam/x.jpg'" in str(error) or "'cam/alias.jpg'" in str(error)
    assert dest.read_bytes() == b"previous"
    assert not store.exists("copied")
    assert within(5, lambda: store.exists("cam/x.jpg")) is False
    assert isinstance(within(5, lambda: store.stat("cam/x.jpg")), ObjectNotFoundError)
    assert within(5, lambda: keys(store)) == []
    store.put("cam/x.jpg", b"jpeg")  # a put replaces it
    assert store.get("cam/x.jpg") == b"jpeg"


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


def test_a_pinned_copy_refuses_a_file_written_in_place_while_it_is_copied(
    store: LocalObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that bypasses the store and rewrites the file in place during the copy moves
    its version: the copy is dropped before it reaches the key."""
    pinned = store.put("uploads/clip.mp4", b"first").version
    assert pinned is not None
    store.put("job/input.mp4", b"old")
    path = store.root / "uploads" / "clip.mp4"
    real_copy = local_module._copy_into

    def copy_then_rewritten(source: Any, fd: int) -> None:
        real_copy(source, fd)
        path.write_bytes(b"rewritten in place")

    monkeypatch.setattr(local_module, "_copy_into", copy_then_rewritten)
    with pytest.raises(ObjectReplacedError, match=r"'uploads/clip\.mp4'"):
        store.copy("uploads/clip.mp4", "job/input.mp4", if_version=pinned)
    monkeypatch.undo()
    assert store.get("job/input.mp4") == b"old"
    assert sorted(p.name for p in (store.root / "job").iterdir()) == ["input.mp4"]


def test_a_version_does_not_name_the_device_the_store_is_mounted_as(
    store: LocalObjectStore,
) -> None:
    """A version stays valid wherever the same files are seen: the device number is not part
    of it (an NFS share seen from another machine, an overlay or btrfs subvolume mounted
    again after a restart has another one, and a job pinned before would be refused as
    replaced). It is the file's inode, modification time in ns and size, in hex."""
    version = store.put("uploads/clip.mp4", b"first").version
    st = os.stat(store.root / "uploads" / "clip.mp4")
    assert version == f"{st.st_ino:x}.{st.st_mtime_ns:x}.{st.st_size:x}"
    assert store.stat("uploads/clip.mp4").version == version
    assert [o.version for o in store.list("uploads/")] == [version]
