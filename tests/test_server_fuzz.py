"""A property-based fuzz of the service's OpenAPI schema (schemathesis) over real HTTP: no
generated request, valid or not, gets a 5xx, and none gets past the token check without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as fuzz_settings

from framepipe.config import Settings
from test_server import AUTH, Server


def test_no_generated_request_gets_a_server_error(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, max_upload_bytes=2000, concurrency=2)
    with Server(settings) as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 12
        for operation in operations:

            @given(case=operation.as_strategy())
            @fuzz_settings(max_examples=25, deadline=None, database=None,
                           suppress_health_check=list(HealthCheck))
            def fuzz(case: schemathesis.Case) -> None:
                response = case.call(headers=AUTH, timeout=30)
                assert response.status_code < 500, (
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:500]}")
                if case.path != "/health":
                    # 401, or 404 for a path no route matches (a newline in a key): never data
                    assert case.call(timeout=30).status_code in (401, 404)

            try:
                fuzz()
            except AssertionError as exc:
                pytest.fail(f"{operation.method.upper()} {operation.path}: {exc}")
