"""The README's Python snippets and the commands that follow them, run as written, so that a
renamed function, option or command fails here before a reader meets it.

Each ```python block of README.md is found under its section heading. A section's block is
either run here (:data:`RUNNERS`) or listed in :data:`NOT_RUN` with the reason; a new block in
neither fails :func:`test_every_readme_python_block_is_accounted_for`. Only the embedded
defaults are used (SQLite and local files under the test's own folder): nothing here needs a
service, a camera or a network. The relative links of README.md, docs/*.md and the examples'
READMEs are checked too: each names a file that exists and, with ``#``, one of its headings.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from framepipe import App
from framepipe.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

runner = CliRunner()


def sections(text: str) -> list[tuple[str, str, str]]:
    """``(heading, language, body)`` of every fenced block, in order; the heading is the
    nearest ``#`` heading above it."""
    found: list[tuple[str, str, str]] = []
    heading = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            end = i + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            found.append((heading, fence.group(1), "\n".join(lines[i + 1 : end]) + "\n"))
            i = end + 1
            continue
        title = re.match(r"^#+\s+(.*)", line)
        if title:
            heading = title.group(1).strip()
        i += 1
    return found


def blocks(heading: str, language: str) -> list[str]:
    return [
        body for h, lang, body in sections(README.read_text()) if (h, lang) == (heading, language)
    ]


def commands(block: str, program: str = "framepipe") -> list[list[str]]:
    """The lines of a shell block that run ``program``, split as the shell would (comments and
    their continuation lines dropped)."""
    out = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == program:
            out.append(words[1:])
    return out


def cli(home: Path, args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, ["--home", str(home), *args])
    return result.exit_code, result.output


def test_a_pipeline_and_its_commands_run_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline of "A pipeline", saved as sd_import.py, runs with the README's ``framepipe
    run`` line; the ``jobs`` lines after it are commands and options that exist (retry and
    cancel of a completed execution are refused as such, not as a usage error)."""
    (code,) = blocks("A pipeline", "python")
    (shell,) = blocks("A pipeline", "sh")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sd_import.py").write_text(code)
    home = tmp_path / "home"

    lines = commands(shell)
    assert [words[:2] for words in lines] == [
        ["run", "sd_import.py:sd_import"],
        ["jobs", "list"],
        ["jobs", "show"],
        ["jobs", "retry"],
        ["jobs", "cancel"],
        ["jobs", "prune"],
    ]
    exit_code, output = cli(home, lines[0])
    assert exit_code == 0, output
    listed = json.loads(cli(home, ["jobs", "list", "--json"])[1])
    (execution,) = listed
    prefix = execution["id"][:6]
    example_prefix = lines[2][2]

    for words in lines[1:]:
        args = [prefix if word == example_prefix else word for word in words]
        exit_code, output = cli(home, args)
        if args[1] in ("retry", "cancel"):
            assert exit_code == 1, output
            assert "completed" in output
        else:
            assert exit_code == 0, output

    shown = json.loads(cli(home, ["jobs", "show", prefix, "--json"])[1])
    assert shown["status"] == "completed"
    assert shown["data"] == {
        "count": 2,
        "copied:a.mp4": True,
        "copied:b.mp4": True,
        "rendered:a.mp4": True,
        "rendered:b.mp4": True,
    }
    keys = {step["key"] for step in shown["steps"]}
    assert "scan" in keys
    # "name:<file name>-param_hash when a parameter names a file" (What the engine guarantees)
    assert {re.sub(r"-[0-9a-f]{12}$", "-HASH", key) for key in keys - {"scan"}} == {
        "copy:a.mp4-HASH",
        "copy:b.mp4-HASH",
        "render:a.mp4-HASH",
        "render:b.mp4-HASH",
    }


def test_a_live_station_builds_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The app of "A live station" is built as written (its camera is an RTSP URL, so it is
    built, not run): every name imports and every argument is one its class takes."""
    (code,) = blocks("A live station", "python")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "station"}
    exec(compile(code, "README.md: A live station", "exec"), namespace)
    station_app: App = namespace["app"]  # type: ignore[assignment]
    assert list(station_app.pipelines) == ["station_1"]


RUNNERS: dict[str, Callable[..., None]] = {
    "A pipeline": test_a_pipeline_and_its_commands_run_as_written,
    "A live station": test_a_live_station_builds_as_written,
}
NOT_RUN: dict[str, str] = {}


def anchors(markdown: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings (lower case, punctuation dropped, spaces
    as ``-``, ``-1``, ``-2`` ... for repeats)."""
    made: set[str] = set()
    for line in _outside_fences(markdown.read_text()):
        title = re.match(r"^#+\s+(.*)", line)
        if not title:
            continue
        slug = re.sub(r"[^\w\- ]", "", title.group(1).strip().lower().replace("`", ""))
        slug = slug.replace(" ", "-")
        anchor, n = slug, 0
        while anchor in made:
            n += 1
            anchor = f"{slug}-{n}"
        made.add(anchor)
    return made


def _outside_fences(text: str) -> list[str]:
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return out


def test_relative_links_between_docs_point_at_files_and_headings_that_exist() -> None:
    pages = [
        README,
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted(ROOT.glob("examples/*/README.md")),
    ]
    broken = []
    for page in pages:
        text = "\n".join(_outside_fences(page.read_text()))
        for match in re.finditer(r"\]\(([^)\s]+)\)|src=\"([^\"]+)\"", text):
            link = match.group(1) or match.group(2)
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: {link}"
            if not target.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in anchors(target):
                broken.append(f"{where} (no such heading)")
    assert broken == []


def test_every_readme_python_block_is_accounted_for() -> None:
    headings = {h for h, lang, _ in sections(README.read_text()) if lang == "python"}
    assert headings == set(RUNNERS) | set(NOT_RUN), (
        "a ```python block of README.md is neither run by tests/test_docs_snippets.py nor "
        "listed there in NOT_RUN with the reason"
    )
