"""Pipeline definitions: keys, validation, parameters."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from framepipe import Pipeline, StepContext, step_key
from framepipe.errors import (
    PipelineCycleError,
    StepOutputError,
    StepParamsError,
    UnknownDependencyError,
)
from framepipe.jobs.outcomes import check_output


def test_step_keys_are_content_addressed_and_stable() -> None:
    a = step_key("copy", {"path": "a.mp4", "n": 1})
    assert a == step_key("copy", {"n": 1, "path": "a.mp4"})
    assert a.startswith("copy:a.mp4-") and len(a.rpartition("-")[2]) == 12
    assert a != step_key("copy", {"path": "b.mp4", "n": 1})
    assert step_key("scan", {}) == "scan"
    # Fixed value: keys must not change between releases or processes.
    assert (
        step_key("copy", {"path": "a.mp4"})
        == "copy:a.mp4-"
        + __import__("hashlib").blake2b(b'{"path":"a.mp4"}', digest_size=6).hexdigest()
    )


def test_parameterless_steps_are_initial() -> None:
    p = Pipeline("p")

    @p.step()
    def scan(ctx: StepContext) -> None: ...

    @p.step(depends_on=["scan"])
    def copy(ctx: StepContext, path: str, tries: int = 1) -> None: ...

    p.validate()
    assert [s.name for s in p.initial_steps] == ["scan"]
    assert p.steps["copy"].params == ("path", "tries")
    assert p.steps["copy"].required == frozenset({"path"})


def test_unknown_dependency_names_pipeline_and_step() -> None:
    p = Pipeline("imp")

    @p.step(depends_on=["nope"])
    def scan(ctx: StepContext) -> None: ...

    with pytest.raises(UnknownDependencyError, match=r"pipeline 'imp', step 'scan'.*'nope'"):
        p.validate()


def test_cycle_is_reported_with_its_path() -> None:
    p = Pipeline("loop")

    @p.step(depends_on=["c"])
    def a(ctx: StepContext) -> None: ...

    @p.step(depends_on=["a"])
    def b(ctx: StepContext) -> None: ...

    @p.step(depends_on=["b"])
    def c(ctx: StepContext) -> None: ...

    with pytest.raises(PipelineCycleError, match=r"pipeline 'loop'.*a -> c -> b -> a"):
        p.validate()


def test_bad_definitions_are_refused_at_definition() -> None:
    p = Pipeline("p")
    with pytest.raises(UnknownDependencyError, match="must be a step name"):
        p.add_step(lambda ctx: None, name="x", depends_on=["copy:abc"])
    with pytest.raises(StepParamsError, match="first positional parameter"):
        p.add_step(lambda: None, name="y")
    with pytest.raises(StepParamsError, match="passable by keyword"):
        p.add_step(lambda ctx, *args: None, name="z")

    @p.step()
    def dup(ctx: StepContext) -> None: ...

    with pytest.raises(StepParamsError, match="defined twice"):
        p.add_step(lambda ctx: None, name="dup")
    with pytest.raises(ValueError, match="invalid name"):
        Pipeline("has space")


def test_pipeline_without_initial_step_is_refused() -> None:
    p = Pipeline("p")

    @p.step()
    def only(ctx: StepContext, x: int) -> None: ...

    with pytest.raises(UnknownDependencyError, match="no initial step"):
        p.validate()


def test_a_worker_loads_each_referenced_pipeline_once_and_falls_back_to_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What a worker runs a claimed step with: the pipeline its execution's reference names
    (loaded once), else the one the worker was given under that name, else nothing."""
    from framepipe.jobs.loading import KnownPipelines

    own = Pipeline("wk_known")

    @own.step()
    def start(ctx: StepContext) -> None:
        pass

    source = tmp_path / "defs.py"
    source.write_text(
        "from framepipe import Pipeline\np = Pipeline('wk_known')\n"
        "@p.step()\ndef start(ctx):\n    pass\n"
        "q = Pipeline('other')\n@q.step()\ndef first(ctx):\n    pass\n"
    )
    known = KnownPipelines([own], owner="Worker w1")
    loaded = known.get("wk_known", f"{source}:p", "e" * 32)
    assert loaded is not None and loaded is not own and loaded.name == "wk_known"
    source.write_text("raise SystemExit('must not be imported again')\n")
    assert known.get("wk_known", f"{source}:p", "e" * 32) is loaded  # cached per reference
    assert known.get("wk_known", f"{tmp_path / 'missing.py'}:p", "f" * 32) is own
    assert "Worker w1 cannot load pipeline" in caplog.text and "ffffffff" in caplog.text
    assert known.get("unknown", None, "e" * 32) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("weight", math.inf),
        ("weight", math.nan),
        ("weight", -1),
        ("weight", "2"),
        ("retry_delay", math.nan),
        ("retry_delay", math.inf),
        ("retry_delay", -0.5),
        ("retries", 1.5),
        ("retries", "3"),
        ("retries", -1),
        ("retries", True),
    ],
)
def test_a_step_s_numbers_must_be_finite_and_not_negative(field: str, value: object) -> None:
    """An infinite weight would read 100% at the start, a NaN one breaks the store, a
    fractional or textual retry count means nothing: each is refused when the step is
    defined, naming the step and the field."""
    p = Pipeline("p")
    with pytest.raises(StepParamsError, match=rf"pipeline 'p', step 's': {field} must be a "):
        p.add_step(lambda ctx: None, name="s", **{field: value})  # type: ignore[arg-type]
    assert "s" not in p.steps


def test_a_step_s_numbers_are_kept_as_their_types() -> None:
    step = Pipeline("p").add_step(lambda ctx: None, name="s", retries=3, weight=2, retry_delay=0)
    assert (step.retries, step.weight, step.retry_delay) == (3, 2.0, 0.0)
    assert isinstance(step.weight, float)
    assert isinstance(step.retry_delay, float)


@pytest.mark.parametrize("name", ["abc\n", "abc\r\n", "\nabc", "ab c", "", "a" * 201])
def test_a_name_is_refused_unless_all_of_it_is_valid(name: str) -> None:
    """A trailing newline is no exception (a ``$`` in the pattern would let it through)."""
    with pytest.raises(ValueError, match="invalid name"):
        Pipeline(name)
    with pytest.raises(ValueError, match="invalid name"):
        Pipeline("p").add_step(lambda ctx: None, name=name)
    assert Pipeline("a" * 200).name == "a" * 200


def test_the_output_limit_counts_utf8_bytes_and_the_output_is_a_json_copy() -> None:
    """``max_step_output_bytes`` is bytes of UTF-8, not characters; what is kept is parsed back
    from the JSON, as a worker reads it from the store."""
    accented = {"t": "é" * 600}  # 608 characters of JSON, 1208 bytes
    with pytest.raises(StepOutputError, match="returned 1208 bytes of JSON, more than the 1000"):
        check_output(accented, pipeline="p", step_key="s", execution_id="e", limit=1000)
    assert check_output(accented, pipeline="p", step_key="s", execution_id="e", limit=1208) == (
        accented
    )
    given = {"frames": {1: "a.jpg"}, "size": (640, 480), "files": ["a"]}
    kept = check_output(given, pipeline="p", step_key="s", execution_id="e", limit=1000)
    assert kept == {"files": ["a"], "frames": {"1": "a.jpg"}, "size": [640, 480]}
    assert kept["files"] is not given["files"]
