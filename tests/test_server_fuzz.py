"""Property-based fuzz of the service over real HTTP: the OpenAPI schema (schemathesis: no
generated request, valid or not, gets a 5xx, and none gets past the token check without it),
and hostile JSON (hypothesis: lone surrogates, huge strings, deep nesting, odd Unicode)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as fuzz_settings
from hypothesis import strategies as st
from websockets.sync.client import connect as ws_connect

from framepipe import Pipeline, StepContext
from framepipe.config import Settings
from test_server import AUTH, Server

pytestmark = pytest.mark.slow  # fuzzing a live service over HTTP for seconds

echo = Pipeline("echo")


@echo.step()
def keys(ctx: StepContext) -> dict[str, Any]:
    return {"keys": len(ctx.inputs)}


def test_no_generated_request_gets_a_server_error(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, max_upload_bytes=2000, concurrency=2)
    with Server(settings) as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 12
        for operation in operations:

            @given(case=operation.as_strategy())
            @fuzz_settings(
                max_examples=25,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def fuzz(case: schemathesis.Case) -> None:
                response = case.call(headers=AUTH, timeout=30)
                assert response.status_code < 500, (
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:500]}"
                )
                if case.path != "/health":
                    # 401, or 404 for a path no route matches (a newline in a key), or 415 for
                    # a POST that is not JSON (refused before the token is looked at): never data
                    assert case.call(timeout=30).status_code in (401, 404, 415)

            try:
                fuzz()
            except AssertionError as exc:
                pytest.fail(f"{operation.method.upper()} {operation.path}: {exc}")


# Text of every kind: lone surrogates, NUL and other controls, bidi marks, astral planes.
_odd_text = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()),
    max_size=40,
)
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | _odd_text
    | st.just("x" * 300_000),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_odd_text, inner, max_size=4),
    max_leaves=20,
)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_hostile_json_never_gets_a_server_error_nor_breaks_a_listing(tmp_path: Path) -> None:
    """Bodies a careless or hostile client sends (built as JSON text, so lone surrogates
    travel as \\ud800 escapes): every answer is below 500, and afterwards every listing, the
    events page and the WebSocket snapshot still answer."""
    settings = Settings(home=tmp_path, max_inputs_bytes=100_000, concurrency=2)
    with (
        Server(settings, pipelines=(echo,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):

        def post(path: str, body: str) -> httpx.Response:
            response = client.post(
                path, content=body.encode("utf-8"), headers={"Content-Type": "application/json"}
            )
            assert response.status_code < 500, f"{path} {body[:200]!r}: {response.text[:300]}"
            return response

        @given(inputs=_json_values, name=st.sampled_from(["echo", "nope"]) | _odd_text)
        @fuzz_settings(
            max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def fuzz(inputs: object, name: str) -> None:
            post("/api/executions", json.dumps({"pipeline": name, "inputs": {"v": inputs}}))
            post("/api/executions", json.dumps({"pipeline": "echo", "inputs": inputs}))
            post(f"/api/executions/{json.dumps(name)[1:-1][:50] or 'x'}/cancel", "{}")

        fuzz()
        for depth in (100, 5_000, 100_000):
            post("/api/executions", '{"pipeline": "echo", "inputs": {"d": ' + _nested(depth) + "}}")
        post("/api/executions", '{"pipeline": "echo", "inputs": {"\\ud800": "\\udfff"}}')
        for path in (
            "/api/executions",
            "/api/executions?limit=500",
            "/api/events?limit=1000",
            "/api/pipelines",
            "/api/detectors",
            "/health",
        ):
            assert client.get(path).status_code == 200, path
        with ws_connect(
            f"ws://127.0.0.1:{server.port}/ws", additional_headers=AUTH, open_timeout=10
        ) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "snapshot"
