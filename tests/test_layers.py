"""The layers run one way: the live side does not reach into the job store's records, the job
broker does not depend on the processor fleet, and the media toolkit does not load the job
engine. Checked on the source (every import, also inside functions) and in a fresh process."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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
    live = [
        *(SRC / name for name in ("app.py", "app_health.py", "event_sinks.py", "health.py")),
        *(SRC / name for name in ("app_events.py", "app_recovery.py", "app_reporting.py")),
        SRC / "app_starts.py",
        *(SRC / name for name in ("snapshots.py", "supervise.py", "supervise_report.py")),
        *(SRC / name for name in ("supervise_restarts.py", "supervise_stall.py")),
        *sorted((SRC / "stream").glob("*.py")),
        *sorted((SRC / "sources").glob("*.py")),
    ]
    for path in live:
        bad = {m for m in _imports(path) if m.startswith("framepipe.jobs")}
        assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"


def test_the_job_broker_does_not_import_the_processor_fleet() -> None:
    modules = sorted((SRC / "jobs" / "delivery").glob("*.py"))
    assert modules
    for path in modules:
        bad = {m for m in _imports(path) if m.startswith("framepipe.processors")}
        assert not bad, f"jobs/delivery/{path.name} imports {sorted(bad)}"


@pytest.mark.slow
def test_importing_the_media_toolkit_or_the_package_loads_no_job_engine() -> None:
    for module in ("framepipe", "framepipe.media", "framepipe.jobs.pipeline"):
        loaded = subprocess.run(
            [sys.executable, "-c", f"import sys, {module}; print(' '.join(sys.modules))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert "framepipe.jobs.engine" not in loaded, module
        if module != "framepipe.jobs.pipeline":
            assert "sqlalchemy" not in loaded, module


_TABLES = {"events", "executions", "ledger", "step_deps", "steps", "workers", "metadata"}
# The modules that hold the jobs' queries: the reads, the engine's batched writes, its hold on
# an execution, cancelling, the monitoring counts, the workers' transitions (with their claims
# and step graph), the recovery of dead engines' executions and the ledger (see jobs/records.py).
_STORE_MODULES = {
    "jobs/records.py",
    "jobs/batches.py",
    "jobs/ownership.py",
    "jobs/cancel_requests.py",
    "jobs/counts.py",
    "jobs/dispatch.py",
    "jobs/transitions.py",
    "jobs/claims.py",
    "jobs/step_graph.py",
    "jobs/leases.py",
    "jobs/recovery.py",
    "jobs/ledger.py",
    "jobs/pruning.py",
}


def _table_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "framepipe.backends.state"
        ):
            found.update(a.name for a in node.names if a.name in _TABLES)
    return found


def test_only_the_store_modules_query_the_jobs_tables() -> None:
    """No engine, worker, client, command or endpoint writes SQL on the jobs tables: they call
    the store modules, so a change of schema or of a query's rule is made in one place."""
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("backends/state/") or rel in _STORE_MODULES:
            continue
        tables = _table_imports(path)
        if tables:
            offenders[rel] = sorted(tables)
    assert not offenders, f"modules querying the jobs tables directly: {offenders}"
    assert all((SRC / m).exists() for m in _STORE_MODULES)


def test_both_modes_run_a_step_and_decide_its_fate_with_the_same_code() -> None:
    """The embedded engine's scheduler (its transitions in jobs/lifecycle.py, its commits in
    jobs/group_commit.py) and the worker run an attempt through jobs/running.py and take their
    scheduling decisions from jobs/rules.py; neither calls a step function or checks an output
    itself."""
    for name in ("scheduler.py", "worker/runs.py"):
        imports = _imports(SRC / "jobs" / name)
        assert "framepipe.jobs.running" in imports, name
        assert "framepipe.jobs.rules" in imports, name
    assert "framepipe.jobs.rules" in _imports(SRC / "jobs" / "lifecycle.py")
    for name in ("scheduler.py", "lifecycle.py", "group_commit.py", "worker/runs.py"):
        source = (SRC / "jobs" / name).read_text()
        assert "check_output" not in source, name
        assert ".fn(ctx" not in source, name
    assert "framepipe.jobs.rules" in _imports(SRC / "jobs" / "dispatch.py")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _framepipe_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The framepipe modules ``path`` imports anywhere in it: at the top, in functions, under
    ``TYPE_CHECKING``; a package's name is its ``__init__``, a node as any other (a circle
    through a package that both defines names and imports its submodules counts)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        found.update(t for t in targets if t in modules and t != name)
    return found


def test_no_modules_import_each_other_round_in_a_circle() -> None:
    """Each module sits on one floor: no chain of imports (type hints included) leads from a
    module back to itself. A module that needs a few names of one above it takes a Protocol."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py") if "migrations" not in p.parts}
    graph = {name: _framepipe_imports(name, path, modules) for name, path in modules.items()}
    circles: list[list[str]] = []
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        order[module] = low[module] = len(order)
        stack.append(module)
        for other in graph.get(module, ()):
            if other not in order:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], order[other])
        if low[module] == order[module]:
            members = []
            while (top := stack.pop()) != module:
                members.append(top)
            if members:
                circles.append(sorted([module, *members]))

    for module in graph:
        if module not in order:
            visit(module)
    assert not circles, f"modules importing each other in a circle: {circles}"
