"""The ``framepipe`` command line, for real: pipeline files written to tmp_path, a fresh SQLite
state under each test's own ``--home``, signals sent to a real ``python -m framepipe.cli``."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from conftest import REDIS_URL, redis_namespace
from framepipe import __version__
from framepipe.backends.state import SCHEMA_HEAD
from framepipe.cli import app, parse_inputs
from framepipe.cli.progress import ProgressView
from framepipe.config import load_settings
from framepipe.errors import PipelineCycleError, PipelineDefinitionError
from framepipe.events import Event
from framepipe.jobs.loading import load_pipeline, resolve_pipeline
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.runner import run_pipeline
from waiting import wait_until

runner = CliRunner()

HEADER = """\
import os
import time
from pathlib import Path

from framepipe import Pipeline

HERE = Path(__file__).parent


def mark(name):
    with open(HERE / "runs.log", "a") as fh:
        fh.write(name + "\\n")

"""

OK = (
    HEADER
    + """
pipeline = Pipeline("ok")


@pipeline.step()
def scan(ctx):
    mark("scan")
    for f in ctx.inputs.get("files", []):
        ctx.spawn_step("copy", params={"path": f})
    return {"inputs": dict(ctx.inputs)}


@pipeline.step()
def copy(ctx, path):
    ctx.progress(50, f"copying {path}")
    mark("copy")
    return {f"copied:{path}": True}


@pipeline.step(depends_on=["copy", "scan"])
def report(ctx):
    return {"report": sorted(k for k in ctx.data if k.startswith("copied:"))}
"""
)

FLAKY = (
    HEADER
    + """
pipeline = Pipeline("flaky")


@pipeline.step()
def prepare(ctx):
    mark("prepare")
    return {"prepared": True}


@pipeline.step(depends_on=["prepare"])
def process(ctx):
    mark("process")
    if not (HERE / "fixed").exists():
        raise RuntimeError("input is broken")
    return {"processed": True}
"""
)

LONG = (
    HEADER
    + """
pipeline = Pipeline("long")


@pipeline.step()
def quick(ctx):
    mark("quick")
    return {"quick": True}


@pipeline.step(depends_on=["quick"])
def slow(ctx):
    mark("slow")
    (HERE / "slow.started").touch()
    if (HERE / "finish").exists():
        return {"slow": "done"}
    i = 0
    while True:
        ctx.progress(min(99, i), "working")
        time.sleep(0.05)
        i += 1
"""
)

STUBBORN = (
    HEADER
    + """
pipeline = Pipeline("stubborn")


@pipeline.step()
def hang(ctx):
    mark("hang")
    (HERE / "hang.started").touch()
    while not (HERE / "finish").exists():
        with open(HERE / "hang.beats", "a") as beats:  # one byte a beat, for the test to see
            beats.write(".")
        time.sleep(0.05)  # never looks at ctx.cancelled
    return {"hang": "done"}
"""
)

CRASH = (
    HEADER
    + """
pipeline = Pipeline("crashy")


@pipeline.step()
def first(ctx):
    mark("first")
    return {"first": 1}


@pipeline.step(depends_on=["first"])
def boom(ctx):
    mark("boom")
    ctx.progress(10, "working")
    if not (HERE / "safe").exists():
        os._exit(9)
    return {"boom": "survived"}
"""
)

INSTANT_CRASH = (
    HEADER
    + """
pipeline = Pipeline("instant")


@pipeline.step()
def first(ctx):
    return {"first": 1}


@pipeline.step(depends_on=["first"])
def boom(ctx):
    os._exit(9)
"""
)


# -- helpers --------------------------------------------------------------------------------------


def cli(home: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, ["--home", str(home), *args], env=env)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def runs(folder: Path) -> list[str]:
    log = folder / "runs.log"
    return log.read_text().split() if log.exists() else []


def show(home: Path, execution_id: str) -> dict[str, Any]:
    result = cli(home, "jobs", "show", execution_id, "--json")
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def only_execution(home: Path) -> dict[str, Any]:
    result = cli(home, "jobs", "list", "--json")
    assert result.exit_code == 0, result.output
    items = json.loads(result.stdout)
    assert len(items) == 1, items
    item: dict[str, Any] = items[0]
    return item


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(result: Result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def spawn_cli(
    home: Path, *args: str, grace: float = 5.0, heartbeat: float = 2.0
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "FRAMEPIPE_SHUTDOWN_GRACE": str(grace),
        "FRAMEPIPE_HEARTBEAT_INTERVAL": str(heartbeat),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "framepipe.cli", "--home", str(home), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the CLI exited ({proc.returncode}) before {path.name}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} did not appear within {timeout}s")
        time.sleep(0.02)


# -- run ------------------------------------------------------------------------------------------


def test_run_completes_and_show_has_the_data(tmp_path: Path) -> None:
    file = write(tmp_path / "ok.py", OK)
    home = tmp_path / "home"
    result = cli(home, "run", f"{file}:ok", "--input", 'files=["a", "b"]')
    assert result.exit_code == 0, result.output
    assert "completed" in result.stdout
    assert "steps 4/4" in result.stdout
    execution = only_execution(home)
    assert execution["status"] == "completed"
    assert (execution["steps_done"], execution["steps_total"]) == (4, 4)
    info = show(home, execution["id"][:10])
    assert info["status"] == "completed"
    assert info["progress"] == 100.0
    assert info["data"]["report"] == ["copied:a", "copied:b"]
    assert info["pipeline_ref"] == f"{file.resolve()}:ok"
    assert sorted(runs(tmp_path)) == ["copy", "copy", "scan"]

    table = cli(home, "jobs", "show", execution["id"])
    assert table.exit_code == 0, table.output
    assert "completed" in table.stdout
    assert "report" in table.stdout
    assert "copy:" in table.stdout


def test_run_json_and_pipeline_found_by_variable_or_name(tmp_path: Path) -> None:
    file = write(
        tmp_path / "named.py",
        HEADER
        + """
        my_pipe = Pipeline("renamed")

        @my_pipe.step()
        def only(ctx):
            return {"ran": "only"}
        """.replace("\n        ", "\n"),
    )
    home = tmp_path / "home"
    for ref in (f"{file}:my_pipe", f"{file}:renamed", str(file)):
        result = cli(home, "run", ref, "--quiet", "--json")
        assert result.exit_code == 0, result.output
        info = json.loads(result.stdout)
        assert info["status"] == "completed"
        assert info["pipeline"] == "renamed"
        assert info["data"] == {"ran": "only"}
        assert info["pipeline_ref"] == f"{file.resolve()}:renamed"


def test_input_values_are_json_or_strings_and_repeated_keys_make_lists(tmp_path: Path) -> None:
    file = write(tmp_path / "ok.py", OK)
    extra = tmp_path / "inputs.json"
    extra.write_text(json.dumps({"from_file": {"deep": [1, 2]}, "n": "overridden"}))
    result = cli(
        tmp_path / "home",
        "run",
        f"{file}:ok",
        "--quiet",
        "--json",
        "--inputs-json",
        str(extra),
        "-i",
        "n=3",
        "-i",
        "ratio=0.5",
        "-i",
        'tags=["a", "b"]',
        "-i",
        'obj={"k": 1}',
        "-i",
        "flag=true",
        "-i",
        "nothing=null",
        "-i",
        "name=hello world",
        "-i",
        "f=x",
        "-i",
        "f=2",
        "-i",
        "f=y",
        "-i",
        "empty=",
        "-i",
        "nan=NaN",
        "-i",
        "eq=a=b",
    )
    assert result.exit_code == 0, result.output
    inputs = json.loads(result.stdout)["data"]["inputs"]
    assert inputs == {
        "from_file": {"deep": [1, 2]},
        "n": 3,
        "ratio": 0.5,
        "tags": ["a", "b"],
        "obj": {"k": 1},
        "flag": True,
        "nothing": None,
        "name": "hello world",
        "f": ["x", 2, "y"],
        "empty": "",
        "nan": "NaN",
        "eq": "a=b",
    }


def test_parse_inputs_rejects_bad_pairs_and_files(tmp_path: Path) -> None:
    assert parse_inputs(["a=1", "a=[1]"]) == {"a": [1, [1]]}
    file = write(tmp_path / "ok.py", OK)
    home = tmp_path / "home"
    assert_one_line_error(cli(home, "run", f"{file}:ok", "-i", "novalue"), 2, "KEY=VALUE")
    assert_one_line_error(cli(home, "run", f"{file}:ok", "-i", "=1"), 2, "KEY=VALUE")
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    assert_one_line_error(
        cli(home, "run", f"{file}:ok", "--inputs-json", str(listing)), 2, "JSON object"
    )
    assert_one_line_error(
        cli(home, "run", f"{file}:ok", "--inputs-json", str(tmp_path / "missing.json")),
        2,
        "missing.json",
    )


def test_inputs_nested_too_deep_to_parse_exit_2_naming_the_option(tmp_path: Path) -> None:
    file = write(tmp_path / "ok.py", OK)
    home = tmp_path / "home"
    deep = "[" * 30_000 + "]" * 30_000
    result = cli(home, "run", f"{file}:ok", "-q", "-i", "a=1", "-i", f"x={deep}")
    assert_one_line_error(result, 2, "error: --input x: nested too deep")
    inputs = tmp_path / "inputs.json"
    inputs.write_text(f'{{"x": {deep}}}')
    result = cli(home, "run", f"{file}:ok", "-q", "--inputs-json", str(inputs))
    assert_one_line_error(result, 2, f"error: --inputs-json {inputs}: nested too deep")
    assert runs(tmp_path) == []
    assert json.loads(cli(home, "jobs", "list", "--json").stdout) == []


def test_failed_step_exits_1_then_retry_resumes_without_rerunning(tmp_path: Path) -> None:
    file = write(tmp_path / "flaky.py", FLAKY)
    home = tmp_path / "home"
    result = cli(home, "run", f"{file}:flaky", "--json")
    assert result.exit_code == 1, result.output
    assert "step 'process' failed: RuntimeError: input is broken" in result.stderr
    assert "Traceback" not in result.stderr
    failed = json.loads(result.stdout)
    assert failed["status"] == "failed"
    assert "process" in failed["error"]
    assert "flaky" in failed["error"]
    assert runs(tmp_path) == ["prepare", "process"]
    execution_id = failed["id"]

    listing = cli(home, "jobs", "list")
    assert listing.exit_code == 0, listing.output
    assert execution_id[:12] in listing.stdout
    assert "failed" in listing.stdout
    only_failed = json.loads(cli(home, "jobs", "list", "--status", "failed", "--json").stdout)
    assert [item["id"] for item in only_failed] == [execution_id]
    assert json.loads(cli(home, "jobs", "list", "-s", "completed", "--json").stdout) == []
    assert json.loads(cli(home, "jobs", "list", "-p", "other", "--json").stdout) == []
    assert_one_line_error(cli(home, "jobs", "list", "--status", "weird"), 2, "weird")

    (tmp_path / "fixed").touch()
    retried = cli(home, "jobs", "retry", execution_id[:8])
    assert retried.exit_code == 0, retried.output
    assert "completed" in retried.stdout
    assert runs(tmp_path) == ["prepare", "process", "process"]
    info = show(home, execution_id)
    assert info["status"] == "completed"
    assert info["runs"] == 2
    assert info["data"] == {"prepared": True, "processed": True}
    steps = {s["key"]: s for s in info["steps"]}
    assert steps["prepare"]["attempt"] == 1
    assert steps["process"]["status"] == "completed"

    again = cli(home, "jobs", "retry", execution_id)
    assert_one_line_error(again, 1, "has completed; nothing to retry")


def test_cancel_a_failed_execution(tmp_path: Path) -> None:
    file = write(tmp_path / "flaky.py", FLAKY)
    home = tmp_path / "home"
    assert cli(home, "run", f"{file}:flaky", "-q").exit_code == 1
    execution_id = only_execution(home)["id"]
    result = cli(home, "jobs", "cancel", execution_id[:6])
    assert result.exit_code == 0, result.output
    assert f"cancelled execution {execution_id}" in result.stdout
    info = show(home, execution_id)
    assert info["status"] == "cancelled"
    assert_one_line_error(cli(home, "jobs", "cancel", execution_id), 1, "already cancelled")


LOUD = """
from framepipe import Pipeline

pipeline = Pipeline("loud")


@pipeline.step()
def first(ctx):
    return {"first": 1}


@pipeline.step(depends_on=["first"])
def boom(ctx):
    raise RuntimeError("x" * 300)
"""


@pytest.mark.parametrize("columns", [None, "60"])
def test_piped_tables_keep_every_column_and_cut_only_a_long_error(
    tmp_path: Path, columns: str | None
) -> None:
    # Into a pipe (no terminal; COLUMNS unset: 200 wide, or a narrow COLUMNS): the error is
    # cut short, never the id (copied into `jobs show`), the status or the progress.
    file = write(tmp_path / "loud.py", LOUD)
    home = tmp_path / "home"
    assert cli(home, "run", f"{file}:pipeline", "-q").exit_code == 1
    execution_id = only_execution(home)["id"]
    env = {"COLUMNS": columns}

    listing = runner.invoke(app, ["--home", str(home), "jobs", "list"], env=env)
    assert listing.exit_code == 0, listing.output
    header, _, row = listing.stdout.splitlines()
    names = ["id", "pipeline", "status", "progress", "steps", "created", "error"]
    assert header.split() == names
    cells = row.split()
    assert cells[:5] == [execution_id[:12], "loud", "failed", "50%", "1/2"]
    assert "   pipeline 'loud', st" in row
    assert row.endswith("…")
    assert "x" * 300 not in row
    if columns is None:
        assert len(row) == 200

    shown = runner.invoke(app, ["--home", str(home), "jobs", "show", cells[0]], env=env)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("steps (2)")))
    header, _, first, boom = lines[at + 1 : at + 5]
    assert header.split() == [
        "key", "status", "attempt", "failures", "progress", "duration", "error"
    ]  # fmt: skip
    assert first.split()[:5] == ["first", "completed", "1", "0", "100%"]
    assert boom.split()[:5] == ["boom", "failed", "1", "1", "0%"]
    assert "s   RuntimeError: xxx" in boom
    assert boom.endswith("…")


def test_unknown_execution_ids(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for command in (
        ["jobs", "show", "feedbeef"],
        ["jobs", "retry", "feedbeef"],
        ["jobs", "cancel", "feedbeef"],
    ):
        assert_one_line_error(cli(home, *command), 1, "no execution 'feedbeef'")


def test_retry_without_a_stored_ref_needs_pipeline_option(tmp_path: Path) -> None:
    home = tmp_path / "home"
    namespace: dict[str, Any] = {}
    # Defined through exec without __name__/__file__, the pipeline has no reference to store.
    exec(
        FLAKY.replace("HERE = Path(__file__).parent", f"HERE = Path({str(tmp_path)!r})"), namespace
    )
    pipeline: Pipeline = namespace["pipeline"]
    assert pipeline.ref is None
    info = run_pipeline(pipeline, settings=load_settings(home=home), raise_on_failure=False)
    assert info.status == "failed"
    assert info.pipeline_ref is None

    result = cli(home, "jobs", "retry", info.id)
    assert_one_line_error(result, 2, "--pipeline FILE.py:NAME")

    (tmp_path / "fixed").touch()
    file = write(tmp_path / "flaky.py", FLAKY)
    result = cli(home, "jobs", "retry", info.id, "--pipeline", f"{file}:flaky", "-q")
    assert result.exit_code == 0, result.output
    assert show(home, info.id)["status"] == "completed"
    assert runs(tmp_path) == ["prepare", "process", "process"]


# -- bad references -------------------------------------------------------------------------------


def test_bad_references_exit_2_with_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert_one_line_error(
        cli(home, "run", f"{tmp_path}/nothere.py:p"), 2, "not found", "nothere.py"
    )

    two = write(
        tmp_path / "two.py",
        HEADER
        + """
        alpha = Pipeline("alpha")
        beta = Pipeline("beta")

        @alpha.step()
        def a(ctx):
            return None

        @beta.step()
        def b(ctx):
            return None
        """.replace("\n        ", "\n"),
    )
    assert_one_line_error(
        cli(home, "run", f"{two}:gamma"), 2, "no pipeline 'gamma'", "alpha", "beta"
    )
    assert_one_line_error(cli(home, "run", str(two)), 2, ":NAME", "alpha", "beta")
    assert_one_line_error(cli(home, "run", f"{two}:mark"), 2, "function, not a Pipeline")

    cycle = write(
        tmp_path / "cycle.py",
        HEADER
        + """
        pipeline = Pipeline("loop")

        @pipeline.step(depends_on=["b"])
        def a(ctx):
            return None

        @pipeline.step(depends_on=["a"])
        def b(ctx):
            return None
        """.replace("\n        ", "\n"),
    )
    assert_one_line_error(
        cli(home, "run", f"{cycle}:loop"), 2, "pipeline 'loop'", "dependency cycle"
    )

    broken = write(tmp_path / "broken.py", "import framepipe\nvalue = 1 / 0\n")
    assert_one_line_error(
        cli(home, "run", f"{broken}:p"), 2, "broken.py", "ZeroDivisionError: division by zero"
    )
    syntax = write(tmp_path / "syntax.py", "def oops(:\n")
    assert_one_line_error(cli(home, "run", f"{syntax}:p"), 2, "SyntaxError")
    assert_one_line_error(
        cli(home, "run", "no_such_module_xyz:p"), 2, "no module named 'no_such_module_xyz'"
    )
    # Nothing was created for any of them.
    assert json.loads(cli(home, "jobs", "list", "--json").stdout) == []


def test_a_pipeline_file_whose_path_is_not_utf8_is_refused_before_it_is_imported(
    tmp_path: Path,
) -> None:
    # The reference stored with each execution is the file's path: bytes that are not UTF-8
    # cannot be stored (the CLI used to fail at the insert, serve on every submit).
    name = os.fsdecode(b"n\xffame.py")
    file = write(tmp_path / name, OK + '\nmark("imported")\n')
    home = tmp_path / "home"
    for command in (["run", f"{file}:ok", "-q"], ["serve", "--pipeline", f"{file}:ok"]):
        line = assert_one_line_error(cli(home, *command), 2, "rename it")
        assert f"pipeline file {tmp_path}/n\\xffame.py: its path is not valid UTF-8" in line
    assert runs(tmp_path) == []
    assert json.loads(cli(home, "jobs", "list", "--json").stdout) == []


def test_a_blank_home_option_is_refused_and_a_blank_variable_is_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for blank in ("", " "):
        result = runner.invoke(app, ["--home", blank, "jobs", "list"])
        assert_one_line_error(result, 2, "error: --home is blank")
        result = runner.invoke(app, ["demo", "--home", blank])  # its own --home too
        assert_one_line_error(result, 2, "error: --home is blank")
    assert list(tmp_path.iterdir()) == []
    result = runner.invoke(app, ["jobs", "list"], env={"FRAMEPIPE_HOME": ""})
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == [".framepipe"]
    assert (tmp_path / ".framepipe" / "state.db").is_file()


def test_bad_settings_exit_2(tmp_path: Path) -> None:
    file = write(tmp_path / "ok.py", OK)
    result = cli(tmp_path / "home", "run", f"{file}:ok", env={"FRAMEPIPE_RETRY_MAX_DELAY": "-1"})
    assert_one_line_error(result, 2, "FRAMEPIPE_RETRY_MAX_DELAY")
    result = runner.invoke(app, ["--log-level", "loud", "--home", str(tmp_path), "jobs", "list"])
    assert_one_line_error(result, 2, "log level")


def test_load_pipeline_from_a_module_and_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "cli_pkg_for_tests"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write(package / "flows.py", FLAKY)
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = resolve_pipeline("cli_pkg_for_tests.flows:flaky")
    assert loaded.pipeline.name == "flaky"
    assert loaded.ref == "cli_pkg_for_tests.flows:flaky"
    assert load_pipeline("cli_pkg_for_tests.flows:pipeline") is loaded.pipeline
    assert load_pipeline("cli_pkg_for_tests.flows") is loaded.pipeline

    file = write(tmp_path / "flaky_file.py", FLAKY)
    first, second = load_pipeline(f"{file}:flaky"), load_pipeline(f"{file}:flaky")
    assert first is not second  # the file is read again, so an edited file is picked up
    assert first.ref == f"{file.resolve()}:flaky"
    assert str(tmp_path) in sys.path

    with pytest.raises(PipelineCycleError):
        load_pipeline(
            str(
                write(
                    tmp_path / "cyc.py",
                    HEADER
                    + """
            p = Pipeline("c")

            @p.step(depends_on=["c2"])
            def c1(ctx):
                return None

            @p.step(depends_on=["c1"])
            def c2(ctx):
                return None
            """.replace("\n            ", "\n"),
                )
            )
        )
    with pytest.raises(PipelineDefinitionError, match="defines no pipeline"):
        load_pipeline(str(write(tmp_path / "empty.py", "x = 1\n")))
    with pytest.raises(PipelineDefinitionError, match="not found"):
        load_pipeline(str(tmp_path / "absent.py"))


# -- signals and crashes --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_interrupts_and_retry_resumes(tmp_path: Path, signum: int, code: int) -> None:
    file = write(tmp_path / "long.py", LONG)
    home = tmp_path / "home"
    proc = spawn_cli(home, "run", f"{file}:long")
    wait_for(tmp_path / "slow.started", proc)
    time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, (out, err)
    assert "interrupted: resume with `framepipe jobs retry" in err
    assert "Traceback" not in err

    execution = only_execution(home)
    assert err.count(execution["id"]) >= 1
    info = show(home, execution["id"])
    assert info["status"] == "interrupted"
    steps = {s["key"]: s for s in info["steps"]}
    assert steps["quick"]["status"] == "completed"
    assert steps["slow"]["status"] == "pending"

    (tmp_path / "finish").touch()
    retried = cli(home, "jobs", "retry", execution["id"], "-q")
    assert retried.exit_code == 0, retried.output
    info = show(home, execution["id"])
    assert info["status"] == "completed"
    assert info["data"] == {"quick": True, "slow": "done"}
    assert runs(tmp_path) == ["quick", "slow", "slow"]


@pytest.mark.slow
def test_cancel_a_running_execution_from_another_process(tmp_path: Path) -> None:
    file = write(tmp_path / "long.py", LONG)
    home = tmp_path / "home"
    proc = spawn_cli(home, "run", f"{file}:long", heartbeat=0.2)
    wait_for(tmp_path / "slow.started", proc)
    execution = only_execution(home)
    assert execution["status"] == "running"
    result = cli(home, "jobs", "cancel", execution["id"])
    assert result.exit_code == 0, result.output
    assert "cancel requested" in result.stdout
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    assert "execution cancelled: cancelled by request" in err
    info = show(home, execution["id"])
    assert info["status"] == "cancelled"
    assert {s["key"]: s["status"] for s in info["steps"]} == {
        "quick": "completed",
        "slow": "cancelled",
    }


@pytest.mark.slow
def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    file = write(tmp_path / "stubborn.py", STUBBORN)
    home = tmp_path / "home"
    proc = spawn_cli(home, "run", f"{file}:stubborn", grace=60)
    wait_for(tmp_path / "hang.started", proc)
    assert proc.stderr is not None and proc.stdout is not None
    lines: list[str] = []

    def read_stderr() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    proc.send_signal(signal.SIGTERM)
    wait_until(
        "the first SIGTERM to be taken",
        lambda: any("SIGTERM: stopping; running steps get 60s to stop" in line for line in lines),
    )
    beats = tmp_path / "hang.beats"
    taken_at = beats.stat().st_size
    # the step ignores the stop request: the grace period runs, and so does the step
    wait_until(
        "the step to go on after the stop request", lambda: beats.stat().st_size >= taken_at + 3
    )
    assert proc.poll() is None
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert time.monotonic() - started < 10
    reader.join(10)
    out, err = proc.stdout.read(), "".join(lines)
    assert proc.returncode == 143, (out, err)
    assert "interrupted: resume with `framepipe jobs retry" in err

    execution = only_execution(home)  # recovers the dead process's execution
    info = show(home, execution["id"])
    assert info["status"] == "interrupted"
    assert "hang" in info["error"]

    (tmp_path / "finish").touch()
    assert cli(home, "jobs", "retry", execution["id"], "-q").exit_code == 0
    assert show(home, execution["id"])["status"] == "completed"


@pytest.mark.slow
def test_step_killing_its_process_then_retry(tmp_path: Path) -> None:
    file = write(tmp_path / "crash.py", CRASH)
    home = tmp_path / "home"
    proc = spawn_cli(home, "run", f"{file}:crashy")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, (out, err)
    assert runs(tmp_path) == ["first", "boom"]

    execution = only_execution(home)
    info = show(home, execution["id"])
    assert info["status"] == "interrupted"
    assert "crashy" in info["error"]
    assert "boom" in info["error"]
    steps = {s["key"]: s for s in info["steps"]}
    assert steps["first"]["status"] == "completed"
    assert steps["boom"]["crashes"] == 1
    shown = cli(home, "jobs", "show", execution["id"])
    assert "interrupted" in shown.stdout
    assert "died" in shown.stdout

    (tmp_path / "safe").touch()
    retried = cli(home, "jobs", "retry", execution["id"], "-q")
    assert retried.exit_code == 0, retried.output
    info = show(home, execution["id"])
    assert info["status"] == "completed"
    assert info["data"] == {"first": 1, "boom": "survived"}
    assert runs(tmp_path) == ["first", "boom", "boom"]


@pytest.mark.slow
def test_step_killing_its_process_at_once_is_named(tmp_path: Path) -> None:
    file = write(tmp_path / "instant.py", INSTANT_CRASH)
    home = tmp_path / "home"
    proc = spawn_cli(home, "run", f"{file}:instant", "-q")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 9, (out, err)
    info = show(home, only_execution(home)["id"])
    assert info["status"] == "interrupted"
    assert "boom" in info["error"]
    assert {s["key"]: s for s in info["steps"]}["boom"]["crashes"] == 1


# -- the progress display -------------------------------------------------------------------------


def test_progress_view_caps_the_step_rows() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, color_system=None)
    view = ProgressView(console, "demo", max_rows=2)

    def ev(kind: str, key: str | None = None, **data: Any) -> None:
        view.on_event(Event(kind, time.time(), "x1", key, data))

    def render() -> str:
        buffer.truncate(0)
        buffer.seek(0)
        console.print(view)
        return buffer.getvalue()

    for key in ("a", "b", "c"):
        ev("step.spawned", key)
        ev("step.started", key)
    ev("step.progress", "c", progress=40.0, message="c is busy", execution_progress=12.5)
    text = render()
    assert "+1 more running" in text
    assert "0/3 steps" in text
    assert " a " in text
    assert " b " in text
    assert "c is busy" not in text
    ev("step.completed", "a", execution_progress=40.0)
    text = render()
    assert "more running" not in text
    assert "c is busy" in text
    assert "1/3 steps" in text
    assert "40%" in text
    ev("step.failed", "b")
    ev("step.completed", "c", execution_progress=80.0)
    text = render()
    assert "2/3 steps" in text
    assert "c is busy" not in text


# -- other commands -------------------------------------------------------------------------------


def test_db_current_and_upgrade(tmp_path: Path) -> None:
    home = tmp_path / "home"
    fresh = cli(home, "db", "current")
    assert fresh.exit_code == 0, fresh.output
    assert "revision none" in fresh.stdout
    upgraded = cli(home, "db", "upgrade")
    assert upgraded.exit_code == 0, upgraded.output
    assert f"to {SCHEMA_HEAD}" in upgraded.stdout
    current = cli(home, "db", "current")
    assert current.exit_code == 0, current.output
    assert f"revision {SCHEMA_HEAD} (head)" in current.stdout
    assert f"url sqlite:///{(home / 'state.db').resolve()}" in current.stdout


def test_db_errors_hide_the_password(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["--database-url", "postgresql+psycopg://someone:s3cr3t@127.0.0.1:9/none", "db", "current"],
    )
    assert result.exit_code == 1, result.output
    assert "s3cr3t" not in result.output
    assert "Traceback" not in result.output
    assert len(error_lines(result)) == 1


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"framepipe {__version__}"
    result = runner.invoke(app, ["jobs", "--help"])
    assert result.exit_code == 0
    for command in ("list", "show", "retry", "cancel"):
        assert command in result.stdout
    # a docstring's lines make one paragraph: its line breaks are not kept in the listing
    listing = runner.invoke(app, ["--help"], env={"COLUMNS": "80"}).stdout
    assert "or run a live App / StreamPipeline" in listing


def test_console_script_module_entry_point(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "framepipe.cli", "--home", str(tmp_path), "jobs", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no executions" in proc.stdout


def test_demo_imports_everything_then_only_the_new_clip(tmp_path: Path) -> None:
    home = tmp_path / "demo"
    result = cli(tmp_path / "ignored", "demo", "--home", str(home), "--quiet")
    assert result.exit_code == 0, result.output
    listed = runner.invoke(app, ["--home", str(home), "jobs", "list", "--json"])
    rows = json.loads(listed.stdout)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    first, second = (show(home, r["id"]) for r in reversed(rows))
    assert first["data"]["imported"] == ["clip_1.mp4", "clip_2.mp4", "clip_3.mp4"]
    assert second["data"]["imported"] == ["clip_4.mp4"]  # the ledger skipped the rest
    assert second["data"]["probe:clip_4.mp4"]["frames"] > 0
    objects = home / "objects"
    assert sorted(p.name for p in (objects / "thumbnails").iterdir()) == [
        f"clip_{i}.mp4.jpg" for i in range(1, 5)
    ]
    assert all(
        (objects / "thumbnails" / f"clip_{i}.mp4.jpg").read_bytes()[:2] == b"\xff\xd8"
        for i in range(1, 5)
    )


# -- settings refused at start, secrets in database URLs -------------------------------------------


def test_a_misspelt_framepipe_variable_exits_2_naming_the_closest_setting(tmp_path: Path) -> None:
    result = cli(tmp_path / "home", "jobs", "list", env={"FRAMEPIPE_CONCURENCY": "3"})
    assert_one_line_error(
        result, 2, "FRAMEPIPE_CONCURENCY: no such setting", "did you mean FRAMEPIPE_CONCURRENCY?"
    )


SECRET = "S3cretPW"


@pytest.mark.parametrize(
    ("env", "args", "needle"),
    [
        ({"FRAMEPIPE_BROKER_URL": "redis:/127.0.0.1:6379/0"}, ["jobs", "list"], "BROKER_URL"),
        ({"FRAMEPIPE_BROKER_URL": f"bogus://:{SECRET}@x"}, ["run", "x.py:p"], "BROKER_URL"),
        ({"FRAMEPIPE_OBJECTS_URL": f"bogus://u:{SECRET}@x"}, ["serve"], "OBJECTS_URL"),
        ({"FRAMEPIPE_SHUTDOWN_GRACE": "inf"}, ["serve"], "SHUTDOWN_GRACE"),
        ({"FRAMEPIPE_HOME": "/etc/passwd"}, ["serve"], "FRAMEPIPE_HOME"),
        ({}, ["--database-url", f"alice:{SECRET}@127.0.0.1/test", "jobs", "list"], "DATABASE_URL"),
        (
            {},
            [
                "--database-url",
                f"postgresql+psycopg://a:{SECRET}@127.0.0.1:5432x/t",
                "jobs",
                "list",
            ],
            "port is not a number",
        ),
    ],
)
def test_bad_settings_exit_2_in_one_line_before_anything_starts(
    tmp_path: Path, env: dict[str, str], args: list[str], needle: str
) -> None:
    result = runner.invoke(app, args, env={"FRAMEPIPE_HOME": str(tmp_path / "home"), **env})
    assert_one_line_error(result, 2, needle)
    assert SECRET not in result.output


def test_a_worker_with_a_bad_broker_url_exits_2_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "framepipe", "--home", str(tmp_path), "worker"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "FRAMEPIPE_BROKER_URL": "redis:/127.0.0.1:6379/0"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "FRAMEPIPE_BROKER_URL" in proc.stderr and "it begins 'redis:/'" in proc.stderr


@pytest.mark.postgres
def test_a_database_password_in_the_query_is_never_shown(tmp_path: Path, pg_url: str) -> None:
    # libpq's documented form; the server trusts local connections, so this one connects.
    url = f"{pg_url}&password={SECRET}"
    result = runner.invoke(app, ["--database-url", url, "db", "current"])
    assert result.exit_code == 0, result.output
    assert "password=***" in result.stdout
    assert SECRET not in result.output
    down = "postgresql+psycopg://alice@127.0.0.1:1/test?password=" + SECRET
    result = runner.invoke(app, ["--database-url", down, "jobs", "list"])
    assert_one_line_error(result, 1, "cannot open database", "password=***")
    assert SECRET not in result.output


@pytest.mark.slow
def test_serve_on_port_0_prints_the_port_it_serves_and_exits_0_on_sigterm(
    tmp_path: Path,
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "framepipe", "--home", str(tmp_path), "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "FRAMEPIPE_API_TOKEN": "port-zero-token"},
    )
    try:
        assert proc.stdout is not None
        link = ""
        while "Dashboard:" not in link:
            link = proc.stdout.readline()
            assert link or proc.poll() is None, "framepipe serve exited"
        port = int(link.split("http://127.0.0.1:", 1)[1].split("/", 1)[0])
        assert port != 0, link
        # at once, no retry: the printed port already listens (the connection waits in its
        # backlog while the server starts), as a browser opening the link expects
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=60).status_code == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    # SIGTERM is a graceful shutdown, not a death by the signal: the stores are closed after
    # uvicorn's shutdown and the service exits 0, as `run` of a live app does
    assert proc.returncode == 0, out
    assert "Finished server process" in out and "Traceback" not in out


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_retry_on_workers_with_the_moved_pipeline_stores_its_reference_for_them(
    tmp_path: Path, pg_url: str
) -> None:
    """The workers load an execution's pipeline from the reference stored with it. The code
    moved: `jobs retry --pipeline NEW` checks the pipeline there (another pipeline's name is
    refused, exit 1, not resumed) and stores NEW with the execution, so workers started with
    no pipeline of their own load it and finish it, running only the failed step."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    file = write(old / "flaky.py", FLAKY)
    other = write(new / "long.py", LONG)
    with redis_namespace("fpcliretry") as namespace:
        env = {
            **os.environ,
            "FRAMEPIPE_HOME": str(tmp_path / "home"),
            "FRAMEPIPE_DATABASE_URL": pg_url,
            "FRAMEPIPE_BROKER_URL": REDIS_URL,
            "FRAMEPIPE_BROKER_NAMESPACE": namespace,
            "FRAMEPIPE_SWEEP_INTERVAL": "0.2",
        }

        def command(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "framepipe", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        def worker(*args: str) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", "framepipe", "worker", "-c", "2", *args],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        first = worker()
        try:
            ran = command("run", "-q", "--json", f"{file}:pipeline")
            assert ran.returncode == 1, ran.stderr
            execution_id = json.loads(ran.stdout)["id"]
            assert runs(old) == ["prepare", "process"]
        finally:
            first.terminate()
            first.wait(30)
        file.rename(new / "flaky.py")  # the code moved, and is fixed
        (new / "fixed").touch()

        refused = command("jobs", "retry", execution_id, "-q", "--pipeline", f"{other}:pipeline")
        assert refused.returncode == 1, refused.stderr
        assert "is of pipeline 'flaky', not 'long'" in refused.stderr
        assert "Traceback" not in refused.stderr
        shown = json.loads(command("jobs", "show", execution_id, "--json").stdout)
        assert (shown["status"], shown["runs"]) == ("failed", 1)  # not resumed
        assert shown["pipeline_ref"].startswith(str(old))

        second = worker()  # no pipeline of its own: only the stored reference
        try:
            retried = command(
                "jobs",
                "retry",
                execution_id[:8],
                "-q",
                "--json",
                "--pipeline",
                f"{new}/flaky.py:flaky",
            )
            assert retried.returncode == 0, retried.stderr
            assert json.loads(retried.stdout)["status"] == "completed"
        finally:
            second.terminate()
            second.wait(30)
        assert runs(new) == ["process"]
        shown = json.loads(command("jobs", "show", execution_id, "--json").stdout)
        assert (shown["status"], shown["runs"]) == ("completed", 2)
        assert shown["pipeline_ref"].startswith(str(new / "flaky.py"))


def test_an_input_read_as_json_but_wanted_as_text_is_refused_with_how_to_quote_it(
    tmp_path: Path,
) -> None:
    """``--input prompt=1984`` is the number 1984: refused as "not a valid string" with no
    word on why it was a number, nor on how to give the text."""
    wants_text = tmp_path / "wants_text.py"
    wants_text.write_text(
        textwrap.dedent(
            """
            from pydantic import BaseModel
            from framepipe import Pipeline

            class Inputs(BaseModel):
                prompt: str
                count: int = 0

            pipeline = Pipeline("wants_text", inputs=Inputs)

            @pipeline.step()
            def one(ctx):
                return {}
            """
        )
    )
    ref = f"{wants_text}:pipeline"
    for given, shown in (("1984", "1984"), ("true", "True"), ("[1, 2]", "[1, 2]")):
        result = cli(tmp_path / "home", "run", ref, "--input", f"prompt={given}")
        assert result.exit_code == 2, result.output
        output = " ".join(result.output.split())
        assert f"inputs.prompt: Input should be a valid string, not {shown}" in output, output
        assert f"--input prompt={given} is read as JSON" in output, output
        assert f"""--input 'prompt={json.dumps(given)}'""" in output, output
    # a refusal the quoting cannot mend gets no such hint
    result = cli(tmp_path / "home", "run", ref, "--input", "prompt=ok", "--input", "count=[1]")
    assert result.exit_code == 2 and "is read as JSON" not in result.output, result.output
    # quoted as the hint says, it is text
    result = cli(tmp_path / "home", "run", ref, "--input", 'prompt="1984"')
    assert result.exit_code == 0, result.output
