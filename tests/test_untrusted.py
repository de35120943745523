"""The boundary checks every entry point shares (HTTP bodies, detector messages, execution
inputs, file lists): what passes is storable and encodable JSON, what is refused names where."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from framepipe.confined import LinkRefusedError, confine, open_beneath, relative_parts
from framepipe.errors import InputTooLargeError, InvalidInputError, PathNotAllowedError
from framepipe.untrusted import check_json, check_size, dumps

_any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=20)
_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_any_text, inner, max_size=3),
    max_leaves=12,
)


def _storable(value: Any) -> bool:
    """What PostgreSQL's JSONB and a UTF-8 response can both hold."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return False
    return "\\u0000" not in json.dumps(value)


@given(_values)
def test_check_json_accepts_exactly_what_can_be_stored_and_sent(value: Any) -> None:
    if _storable(value):
        check_json({"v": value}, "inputs")
    else:
        with pytest.raises(InvalidInputError) as refused:
            check_json({"v": value}, "inputs")
        assert str(refused.value.where).startswith("inputs.v")
    # Whatever it is, it can always be sent (stored before the checks existed).
    text = dumps({"v": value})
    text.encode("utf-8")
    json.loads(text)


def test_refusals_name_the_field() -> None:
    cases = [
        ({"files": ["a", "b\ud800"]}, "inputs.files[1]", "surrogate"),
        ({"n": "a\x00b"}, "inputs.n", "NUL"),
        ({"x": {"\udfff": 1}}, "inputs.x", "surrogate"),
        ({"x": math.inf}, "inputs.x", "JSON"),
        ({"x": b"bytes"}, "inputs.x", "not JSON"),
    ]
    for value, where, word in cases:
        with pytest.raises(InvalidInputError) as refused:
            check_json(value, "inputs")
        assert refused.value.where == where
        assert word in str(refused.value)
    deep: Any = []
    for _ in range(100_000):  # no RecursionError, however deep
        deep = [deep]
    with pytest.raises(InvalidInputError, match="nested more than 64") as refused:
        check_json({"d": deep}, "inputs")
    where = refused.value.where or ""  # named, but not by 64 "[0]"s
    assert where.startswith("inputs.d[0][0]") and where.endswith("[0]") and "…" in where
    assert len(str(refused.value)) < 250
    with pytest.raises(InputTooLargeError, match="FRAMEPIPE_MAX_INPUTS_BYTES"):
        check_size({"blob": "x" * 2000}, "inputs", limit=1000, setting="FRAMEPIPE_MAX_INPUTS_BYTES")


def test_relative_paths_from_outside() -> None:
    assert relative_parts("DCIM/100/a.mp4", "files[0]") == ("DCIM", "100", "a.mp4")
    for bad in (
        "",
        " ",
        ".",
        "..",
        "a/../b",
        "/etc/passwd",
        "C:\\x",
        "a\\b",
        "x\x00.mp4",
        "a/./b",
        "\ud800.mp4",
        5,
    ):
        with pytest.raises(InvalidInputError) as refused:
            relative_parts(bad, "files[3]")
        assert refused.value.where == "files[3]"


def test_open_beneath_follows_no_link_and_creates_exclusively(tmp_path: Path) -> None:
    root = tmp_path / "share"
    (root / "CARD").mkdir(parents=True)
    (root / "CARD" / "a.txt").write_text("inside")
    outside = tmp_path / "secret.txt"
    outside.write_text("outside")
    (root / "CARD" / "link.txt").symlink_to(outside)
    (root / "DCIM").symlink_to(tmp_path)
    fd = open_beneath(root, ("CARD", "a.txt"))
    with os.fdopen(fd) as f:
        assert f.read() == "inside"
    with pytest.raises(LinkRefusedError, match=r"'CARD/link\.txt' is a symbolic link"):
        open_beneath(root, ("CARD", "link.txt"))
    with pytest.raises(LinkRefusedError, match="'DCIM' is a symbolic link"):
        open_beneath(root, ("DCIM", "secret.txt"))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    with pytest.raises(FileExistsError):  # a planted link is never written through
        open_beneath(root, ("CARD", "link.txt"), flags)
    assert outside.read_text() == "outside"
    with pytest.raises(FileExistsError):
        open_beneath(root, ("CARD", "a.txt"), flags)
    os.close(open_beneath(root, ("new", "dir", "b.part"), flags, make_dirs=True))
    assert (root / "new" / "dir" / "b.part").is_file()


def test_confine_says_the_same_whether_a_path_exists_or_not(tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    (root / "clip.mp4").write_bytes(b"x")
    (tmp_path / "private.mp4").write_bytes(b"y")
    (root / "escape.mp4").symlink_to(tmp_path / "private.mp4")
    assert confine(root / "clip.mp4", [root], where="inputs.input") == root / "clip.mp4"
    messages = []
    for path in (
        tmp_path / "private.mp4",
        tmp_path / "nothing.mp4",
        root / "escape.mp4",
        root / ".." / "private.mp4",
    ):
        with pytest.raises(PathNotAllowedError) as refused:
            confine(path, [root], where="inputs.input")
        messages.append(
            str(refused.value).replace("nothing", "private").replace("escape", "private")
        )
        assert str(tmp_path) not in str(refused.value)
    assert len(set(messages)) == 1
    with pytest.raises(PathNotAllowedError, match="no roots are configured"):
        confine(root / "clip.mp4", [], where="inputs.input")
