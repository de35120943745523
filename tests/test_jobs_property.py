"""Property: for any spawned DAG, every step runs once, after everything it depends on."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framepipe import JobEngine, Pipeline, Settings, StepContext

# Each node i may depend on any of the nodes before it (by key), and on every "leaf" (by name).
graphs = st.integers(min_value=1, max_value=25).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.lists(st.lists(st.integers(min_value=0, max_value=max(0, n - 1)), max_size=3),
                 min_size=n, max_size=n),
        st.booleans(),
        st.integers(min_value=1, max_value=6),
    ))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(graph=graphs)
def test_random_spawned_dags_respect_dependencies(graph: tuple[int, list[list[int]], bool, int],
                                                  tmp_path: Path) -> None:
    n, raw_deps, with_join, concurrency = graph
    deps = {i: sorted({d for d in ds if d < i}) for i, ds in enumerate(raw_deps)}
    times: dict[str, tuple[float, float]] = {}
    runs: dict[str, int] = {}
    lock = threading.Lock()
    pipeline = Pipeline("prop")

    def record(key: str, start: float) -> None:
        with lock:
            times[key] = (start, time.monotonic())
            runs[key] = runs.get(key, 0) + 1

    @pipeline.step()
    def root(ctx: StepContext) -> None:
        start = time.monotonic()
        keys: dict[int, str] = {}
        for i in range(n):
            keys[i] = ctx.spawn_step("node", {"i": i},
                                     depends_on=[keys[d] for d in deps[i]])
        record("root", start)

    @pipeline.step()
    def node(ctx: StepContext, i: int) -> dict[str, Any]:
        start = time.monotonic()
        time.sleep(0.0005 * (i % 3))
        record(f"node{i}", start)
        return {f"n{i}": i}

    @pipeline.step(depends_on=["node"])
    def join(ctx: StepContext) -> dict[str, Any]:
        start = time.monotonic()
        assert sorted(ctx.data) == sorted(f"n{i}" for i in range(n))
        record("join", start)
        return {"joined": True}

    if not with_join:
        pipeline = Pipeline("prop_nojoin")
        pipeline.add_step(root, name="root")
        pipeline.add_step(node, name="node")

    home = tmp_path / f"h{len(list(tmp_path.iterdir()))}"

    async def main() -> Any:
        async with JobEngine(settings=Settings(home=home), concurrency=concurrency) as engine:
            return await engine.run(pipeline)

    info = asyncio.run(main())
    assert info.status.value == "completed"
    assert all(count == 1 for count in runs.values())
    assert len(runs) == n + 1 + (1 if with_join else 0)
    for i, ds in deps.items():
        for d in ds:
            assert times[f"node{d}"][1] <= times[f"node{i}"][0], (i, d)
    if with_join:
        assert all(times[f"node{i}"][1] <= times["join"][0] for i in range(n))
