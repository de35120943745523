"""``framepipe sources`` and ``framepipe health`` on snapshots another process wrote: every
value is shown as written, whatever its type, and none is read as Rich markup."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from framepipe.cli import app
from framepipe.config import Settings

runner = CliRunner()


def write_snapshot(home: Path, data: dict[str, Any]) -> None:
    folder = Settings(home=home).run_dir / "apps"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{data['name']}.json").write_text(json.dumps(data))


def rows(home: Path, command: str) -> list[str]:
    result = runner.invoke(app, ["--home", str(home), command], env={"COLUMNS": "250"})
    assert result.exit_code == 0, (result.output, result.exception)
    return [line for line in result.stdout.splitlines() if "odd" in line]


def test_values_of_any_type_or_looking_like_markup_are_shown_as_written(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_snapshot(
        home,
        {
            "name": "odd",
            "state": "[/running]",
            "pid": os.getpid(),  # alive: its pipelines' own states are shown
            "performance_score": "[/score]",
            "uptime": [1],
            "pipeline_status": {
                "number": {"state": 5, "frames_captured": "[/frames]"},
                "listed": {"state": ["ok"], "source": {"restarts": "[/r]", "stalls": {"x": 1}}},
                "tagged": {"state": "[/ok]", "segments_completed": None, "last_error": 7},
            },
            "event_sinks": [
                {"sink": "redis", "pending": 12, "dropped": 3, "failing_since": 1.0},
                {"sink": "[/store]", "pending": 0, "dropped": 0, "failing_since": None},
                "[/odd]",
            ],
        },
    )
    sources = rows(home, "sources")
    assert len(sources) == 3
    by_pipeline = {line.split("│")[2].strip(): line for line in sources}
    assert "│ 5 " in by_pipeline["number"] and "│ [/frames] " in by_pipeline["number"]
    assert "│ ['ok'] " in by_pipeline["listed"] and "│ [/r] " in by_pipeline["listed"]
    assert "│ {'x': 1} " in by_pipeline["listed"]
    assert "│ [/ok] " in by_pipeline["tagged"] and "│ 7 " in by_pipeline["tagged"]

    [health] = rows(home, "health")
    shown_sinks = "redis failing (12 pending, 3 dropped), [/store] ok, [/odd]"
    for shown in ("[/running]", "[/score]", "[1]", "number=5", "tagged=[/ok]", shown_sinks):
        assert shown in health, health
