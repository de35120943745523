"""The layers run one way: the live side does not reach into the job store's records, the job
broker does not depend on the processor fleet, and the media toolkit does not load the job
engine. Checked on the source (every import, also inside functions) and in a fresh process."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "framepipe"


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_live_side_does_not_import_the_job_records() -> None:
    for name in ("app.py", "event_sinks.py"):
        bad = {m for m in _imports(SRC / name) if m.startswith("framepipe.jobs")}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_the_job_broker_does_not_import_the_processor_fleet() -> None:
    modules = sorted((SRC / "jobs" / "delivery").glob("*.py"))
    assert modules
    for path in modules:
        bad = {m for m in _imports(path) if m.startswith("framepipe.processors")}
        assert not bad, f"jobs/delivery/{path.name} imports {sorted(bad)}"


def test_importing_the_media_toolkit_or_the_package_loads_no_job_engine() -> None:
    for module in ("framepipe", "framepipe.media", "framepipe.jobs.pipeline"):
        loaded = subprocess.run(
            [sys.executable, "-c", f"import sys, {module}; print(' '.join(sys.modules))"],
            capture_output=True, text=True, check=True).stdout.split()
        assert "framepipe.jobs.engine" not in loaded, module
        if module != "framepipe.jobs.pipeline":
            assert "sqlalchemy" not in loaded, module
