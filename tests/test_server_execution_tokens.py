"""Execution tokens over the real service (uvicorn on a loopback port): a browser holding one
reads its execution (record, status, events, live feed) and downloads its outputs, and nothing
else: not another execution, not the listing, not another object, no write, no delete, not
after expiry nor with a signature the service did not make. The browser checks (Host, Origin,
Sec-Fetch-Site) and CORS apply to it as to the API token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from framepipe import Pipeline, StepContext
from framepipe.config import Settings
from framepipe.errors import InvalidInputError
from framepipe.server import execution_tokens
from framepipe.server.guard import TOKEN_SUBPROTOCOL
from test_server import Server, wait_status
from waiting import wait_until

TOKEN = "Wl7vS0d4bR2kQy9hXn3Jt6Pc1Fm8Ue5Ga-Zo_iLwKs"
"""The service's API token: random, as long as ``framepipe serve`` makes one."""
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FRONT = "https://front.example"
REFUSED = (1008, 403)
"""A ``/ws`` refused before it was accepted: close code 1008, which uvicorn sends as a 403."""

render = Pipeline("tok_render")


@render.step()
def produce(ctx: StepContext) -> dict[str, Any]:
    """Writes the execution's outputs under a key of its own, and records them in its data;
    ``note`` is an input copied into the data (text, not an output)."""
    video = f"results/{ctx.execution_id}/output.mp4"
    ctx.objects.put(video, b"video of " + ctx.execution_id.encode())
    thumbs = [f"results/{ctx.execution_id}/thumb{i}.jpg" for i in range(2)]
    for key in thumbs:
        ctx.objects.put(key, b"jpeg")
    ctx.progress(50, "half")
    return {"video": video, "thumbs": thumbs, "note": ctx.inputs.get("note", "")}


echo = Pipeline("tok_echo")


@echo.step()
def recorded(ctx: StepContext) -> dict[str, Any]:
    """Records in its data text its submitter chose without copying an input (as a step
    records a video's title or a model's label): each of ``names`` without its leading ``=``;
    and writes one output of its own, under its id."""
    own = f"results/{ctx.execution_id}/own.txt"
    ctx.objects.put(own, b"own")
    return {"own": own, "named": [n.removeprefix("=") for n in ctx.inputs["names"]]}


broken = Pipeline("tok_broken")


@broken.step()
def fails(ctx: StepContext) -> dict[str, Any]:
    """Fails reading a file of the service's object store (once the file ``release`` exists,
    when given): its error names the store's folder and its traceback the service's code."""
    if "release" in ctx.inputs:
        wait_until("the release file", Path(ctx.inputs["release"]).exists, 30, interval=0.02)
    root = Path(ctx.objects.root)  # type: ignore[attr-defined]
    return {"read": (root / "missing" / "file.bin").read_bytes().decode()}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Tokens do not depend on the state backend: SQLite, one allowed front-end origin."""
    return Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        retry_initial_delay=0.01,
        retry_max_delay=0.05,
        allowed_origins=[FRONT],
    )


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    with Server(settings, pipelines=(render, echo, broken), token=TOKEN) as running:
        yield running


def _run(client: httpx.Client, pipeline: str = "tok_render", **inputs: Any) -> str:
    answer = client.post("/api/executions", json={"pipeline": pipeline, "inputs": inputs})
    assert answer.status_code == 201, answer.text
    execution_id: str = answer.json()["id"]
    assert wait_status(client, execution_id)["status"] == "completed"
    return execution_id


def _run_to_end(client: httpx.Client, pipeline: str, **inputs: Any) -> str:
    answer = client.post("/api/executions", json={"pipeline": pipeline, "inputs": inputs})
    assert answer.status_code == 201, answer.text
    execution_id: str = answer.json()["id"]
    wait_status(client, execution_id)
    return execution_id


def _token_for(client: httpx.Client, execution_id: str, **body: Any) -> str:
    answer = client.post(f"/api/executions/{execution_id}/tokens", json=body or None)
    assert answer.status_code == 201, answer.text
    token: str = answer.json()["token"]
    return token


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_an_execution_token_reads_its_execution_and_its_outputs(server: Server) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as admin:
        mine = _run(admin)
        answer = admin.post(f"/api/executions/{mine[:8]}/tokens", json={"expires_in": 600})
        assert answer.status_code == 201, answer.text
        body = answer.json()
        assert body["execution_id"] == mine  # a prefix is resolved to the full id
        assert body["scope"] == "read"
        assert time.time() + 590 < body["expires_at"] <= time.time() + 600
        token = body["token"]
        assert TOKEN not in token
    with httpx.Client(base_url=server.url, headers=_bearer(token), timeout=30) as browser:
        shown = browser.get(f"/api/executions/{mine}")
        assert shown.status_code == 200 and shown.json()["id"] == mine
        status = browser.get(f"/api/status/{mine}").json()
        assert status["status"] == "completed" and status["jobId"] == mine
        events = browser.get("/api/events", params={"execution_id": mine}).json()
        assert {e["execution_id"] for e in events["events"]} == {mine}
        video = browser.get(f"/api/objects/results/{mine}/output.mp4")
        assert video.status_code == 200 and video.content == b"video of " + mine.encode()
        for i in range(2):  # a list of keys in the data: each is an output
            assert browser.get(f"/api/objects/results/{mine}/thumb{i}.jpg").content == b"jpeg"


def test_an_execution_token_reads_nothing_else_and_writes_nothing(server: Server) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as admin:
        admin.put("/api/objects/uploads/secret.txt", content=b"someone's upload")
        theirs = _run(admin)
        mine = _run(admin, note="uploads/secret.txt")  # an input copied into the data
        token = _token_for(admin, mine)
    with httpx.Client(base_url=server.url, headers=_bearer(token), timeout=30) as browser:
        refused = {
            "another execution": browser.get(f"/api/executions/{theirs}"),
            "its status": browser.get(f"/api/status/{theirs}"),
            "a prefix of its own id": browser.get(f"/api/status/{mine[:8]}"),
            "the listing": browser.get("/api/executions"),
            "every event": browser.get("/api/events"),
            "another's events": browser.get("/api/events", params={"execution_id": theirs}),
            "another's output": browser.get(f"/api/objects/results/{theirs}/output.mp4"),
            "an upload": browser.get("/api/objects/uploads/secret.txt"),
            "the pipelines": browser.get("/api/pipelines"),
            "the metrics": browser.get("/metrics"),
            "a write": browser.put(f"/api/objects/results/{mine}/output.mp4", content=b"x"),
            "a write elsewhere": browser.put(f"/api/objects/results/{theirs}/output.mp4"),
            "a delete": browser.delete(f"/api/objects/results/{mine}/output.mp4"),
            "a submit": browser.post("/api/executions", json={"pipeline": "tok_render"}),
            "a retry": browser.post(f"/api/executions/{mine}/retry"),
            "a cancel": browser.post(f"/api/executions/{mine}/cancel"),
            "another token": browser.post(f"/api/executions/{mine}/tokens"),
        }
        for what, answer in refused.items():
            assert answer.status_code in (403, 405), (what, answer.status_code, answer.text)
            assert token not in answer.text
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as admin:
        for execution_id in (mine, theirs):  # nothing was overwritten
            video = admin.get(f"/api/objects/results/{execution_id}/output.mp4")
            assert video.content == b"video of " + execution_id.encode()
        assert admin.get(f"/api/executions/{mine}").json()["status"] == "completed"


def test_data_naming_objects_outside_the_executions_folder_opens_none_of_them(
    server: Server,
) -> None:
    """Whoever chooses what a job records in its data (its submitter, through a step) cannot
    name another job's output, an upload or another of the store's objects and download it
    with the job's token: an output is an object under a folder named by the job's full id."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as admin:
        assert admin.put("/api/objects/uploads/secret.txt", content=b"upload").status_code == 201
        assert admin.put("/api/objects/report.txt", content=b"report").status_code == 201
        theirs = _run(admin)
        named = [
            f"results/{theirs}/output.mp4",
            f"results/{theirs}/thumb0.jpg",
            "uploads/secret.txt",
            "report.txt",
        ]
        mine = _run(admin, "tok_echo", names=[f"={n}" for n in named])
        data = admin.get(f"/api/executions/{mine}").json()["data"]
        assert data["named"] == named  # the job did record them
        token = _token_for(admin, mine)
    with httpx.Client(base_url=server.url, headers=_bearer(token), timeout=30) as browser:
        assert browser.get(f"/api/objects/results/{mine}/own.txt").content == b"own"
        for key in named:
            answer = browser.get(f"/api/objects/{key}")
            assert answer.status_code == 403, (key, answer.status_code, answer.text)
            assert answer.content not in (b"upload", b"report")
            assert b"video of" not in answer.content


def test_an_execution_token_sees_no_traceback_nor_the_services_paths(
    server: Server, settings: Settings, tmp_path: Path
) -> None:
    """A browser reads its job's errors as their first line, without the traceback (the
    service's code), the service's home or object store folder, the file its pipeline was
    loaded from nor the process running it; the API token still reads them whole."""
    home = str(settings.home.resolve())
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as admin:
        mine = _run_to_end(admin, "tok_broken")
        whole = admin.get(f"/api/executions/{mine}").json()
        assert "Traceback" in whole["steps"][0]["error"] and home in whole["steps"][0]["error"]
        assert whole["pipeline_ref"] and whole["owner"]
        failed_events = admin.get("/api/events", params={"execution_id": mine}).json()["events"]
        assert any("traceback" in e["data"] for e in failed_events)
        token = _token_for(admin, mine)
    with httpx.Client(base_url=server.url, headers=_bearer(token), timeout=30) as browser:
        shown = browser.get(f"/api/executions/{mine}").json()
        assert shown["status"] == "failed" and shown["steps"][0]["status"] == "failed"
        assert shown["steps"][0]["error"].startswith("FileNotFoundError: ")
        assert "pipeline_ref" not in shown and "owner" not in shown
        status = browser.get(f"/api/status/{mine}").json()
        assert status["status"] == "failed" and "FileNotFoundError" in status["error"]
        events = browser.get("/api/events", params={"execution_id": mine}).json()["events"]
        assert any(e["type"] == "step.failed" for e in events)
        live = _socket(server, token, mine)
        assert isinstance(live, list) and live[0]["execution"]["id"] == mine
    release = tmp_path / "release"  # a job failing while its browser watches it live
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as admin:
        later = admin.post(
            "/api/executions", json={"pipeline": "tok_broken", "inputs": {"release": str(release)}}
        ).json()["id"]
        later_token = _token_for(admin, later)
    protocol = TOKEN_SUBPROTOCOL + base64.urlsafe_b64encode(later_token.encode()).decode()
    with ws_connect(
        f"ws://127.0.0.1:{server.port}/ws?execution_id={later}",
        subprotocols=[protocol.rstrip("=")],
        open_timeout=10,
    ) as ws:
        streamed = [json.loads(ws.recv(timeout=10))]  # the snapshot, then the live events
        release.touch()
        while not any(m.get("event", {}).get("type") == "step.failed" for m in streamed):
            streamed.append(json.loads(ws.recv(timeout=10)))
    for what, answer in {
        "record": shown,
        "status": status,
        "events": events,
        "snapshot": live,
        "live events": streamed,
    }.items():
        text = json.dumps(answer)
        assert "Traceback" not in text, what
        assert home not in text and str(settings.home) not in text, what
        assert whole["pipeline_ref"] not in text, what
        assert whole["owner"] not in text, what


OPEN_TO_EXECUTION_TOKENS = {
    ("GET", "/api/executions/{execution_id}"),
    ("GET", "/api/status/{job_id}"),
    ("GET", "/api/events"),
    ("GET", "/api/objects/{key}"),
}
"""Every route of the API's schema an execution token opens (besides ``/health``)."""


def test_every_other_route_refuses_an_execution_token(server: Server) -> None:
    """Each route and method of the API's schema, with every parameter naming the token's
    own execution: the four routes above answer the token, every other refuses it (403) and
    refuses a client without the API token (401), as before execution tokens existed."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as admin:
        mine = _run(admin)
        token = _token_for(admin, mine)
        paths = admin.get("/openapi.json").json()["paths"]
    assert len(paths) > 15
    seen = set()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for template, operations in paths.items():
            path = template.replace("{key}", f"results/{mine}/output.mp4")
            path = re.sub(r"\{[a-z_]+\}", mine, path)
            for method in (m.upper() for m in operations):
                query = {"execution_id": mine} if template == "/api/events" else None
                answers = {
                    who: client.request(
                        method,
                        path,
                        params=query,
                        headers={**headers, "Content-Type": "application/json"},
                    ).status_code
                    for who, headers in (
                        ("nobody", {}),
                        ("a forged token", _bearer(f"fpx1.{token.split('.')[1]}.AAAA")),
                        ("the execution token", _bearer(token)),
                    )
                }
                if template == "/health":
                    continue
                if (method, template) in OPEN_TO_EXECUTION_TOKENS:
                    seen.add((method, template))
                    assert answers["the execution token"] == 200, (method, template, answers)
                else:
                    assert answers["the execution token"] == 403, (method, template, answers)
                assert answers["nobody"] == answers["a forged token"] == 401, (template, answers)
    assert seen == OPEN_TO_EXECUTION_TOKENS


def test_an_expired_or_forged_execution_token_is_refused(server: Server) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as admin:
        mine = _run(admin)
        valid = _token_for(admin, mine)
        unknown = admin.post(f"/api/executions/{'f' * 32}/tokens", json={})
        assert unknown.status_code == 404
        too_long = admin.post(f"/api/executions/{mine}/tokens", json={"expires_in": 8 * 86_400})
        assert too_long.status_code == 422
    expired = execution_tokens.mint(TOKEN, mine, lifetime=60, now=time.time() - 61)
    other_key = execution_tokens.mint(TOKEN[::-1], mine)
    head, payload, signature = valid.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    longer = base64.urlsafe_b64encode(
        json.dumps({**claims, "x": claims["x"] + 86_400}).encode()
    ).decode()
    forged = {
        "expired": expired,
        "signed with another key": other_key,
        "a payload changed": f"{head}.{longer.rstrip('=')}.{signature}",
        "a signature changed": f"{head}.{payload}.{signature[:-2]}AA",
        "no signature": f"{head}.{payload}",
        "the prefix only": "fpx1.",
    }
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        for what, token in forged.items():
            answer = browser.get(f"/api/status/{mine}", headers=_bearer(token))
            assert answer.status_code == 401, (what, answer.text)
            assert token not in answer.text
        late = browser.get(f"/api/status/{mine}", headers=_bearer(expired))
        assert "expired" in late.json()["detail"]
        made = execution_tokens.mint(TOKEN, mine)  # what a backend mints itself is the same
        assert browser.get(f"/api/status/{mine}", headers=_bearer(made)).status_code == 200


def test_a_new_api_token_revokes_every_execution_token(settings: Settings) -> None:
    with (
        Server(settings, pipelines=(render,), token=TOKEN) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as admin,
    ):
        mine = _run(admin)
        token = _token_for(admin, mine)
        assert admin.get(f"/api/status/{mine}", headers=_bearer(token)).status_code == 200
    with (
        Server(settings, pipelines=(render,), token=TOKEN[::-1]) as server,
        httpx.Client(base_url=server.url, timeout=30) as browser,
    ):
        assert browser.get(f"/api/status/{mine}", headers=_bearer(token)).status_code == 401


def test_the_python_helper_refuses_what_the_service_would() -> None:
    execution_id = "0" * 32
    token = execution_tokens.mint(TOKEN, execution_id, lifetime=10, now=1000.0)
    grant = execution_tokens.read(TOKEN, token, now=1009.0)
    assert (grant.execution_id, grant.scope, grant.expires_at) == (execution_id, "read", 1010)
    with pytest.raises(InvalidInputError, match="expired"):
        execution_tokens.read(TOKEN, token, now=1010.0)
    with pytest.raises(InvalidInputError, match="signature"):
        execution_tokens.read(TOKEN[::-1], token, now=1000.0)
    for bad_id in ("abc", "0" * 31 + "G", "0" * 33):
        with pytest.raises(InvalidInputError, match="execution_id"):
            execution_tokens.mint(TOKEN, bad_id)
    with pytest.raises(InvalidInputError, match="lifetime"):
        execution_tokens.mint(TOKEN, execution_id, lifetime=0)
    with pytest.raises(InvalidInputError, match="api_token"):
        execution_tokens.mint("", execution_id)


def _socket(
    server: Server, token: str, execution_id: str | None, path: str = "/ws"
) -> list[dict[str, Any]] | int:
    """The first message ``path`` sends a client presenting ``token`` as its subprotocol, or
    the close code (or HTTP status) it was refused with."""
    query = f"?execution_id={execution_id}" if execution_id else ""
    protocol = TOKEN_SUBPROTOCOL + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
    try:
        with ws_connect(
            f"ws://127.0.0.1:{server.port}{path}{query}",
            subprotocols=[protocol],
            open_timeout=10,
        ) as ws:
            messages = [json.loads(ws.recv(timeout=10))]
            return messages
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else -1
    except InvalidStatus as exc:
        return exc.response.status_code


def test_the_live_feed_takes_an_execution_token_for_its_execution_only(server: Server) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as admin:
        mine, theirs = _run(admin), _run(admin)
        token = _token_for(admin, mine)
    got = _socket(server, token, mine)
    assert isinstance(got, list), got
    assert got[0]["type"] == "snapshot" and got[0]["execution"]["id"] == mine
    assert _socket(server, token, theirs) in REFUSED
    assert _socket(server, token, None) in REFUSED  # the snapshot of every execution
    assert _socket(server, token, mine[:8]) in REFUSED
    expired = execution_tokens.mint(TOKEN, mine, lifetime=1, now=time.time() - 2)
    assert _socket(server, expired, mine) in REFUSED
    assert _socket(server, token, mine, path="/ws/detector") in REFUSED  # not a detector


def _close_within(ws: ClientConnection, seconds: float) -> Close | None:
    """The close frame ``ws`` receives within ``seconds`` (reading what comes before it), or
    None when it is still open then."""
    deadline = time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            ws.recv(timeout=left)
    except ConnectionClosed as exc:
        return exc.rcvd
    except TimeoutError:
        pass
    return None


def test_the_live_feed_of_an_execution_token_ends_when_it_expires(server: Server) -> None:
    """A socket admitted with an execution token is closed (1008) at the token's expiry, so
    a token that expires does not keep feeding a browser for as long as it stays connected;
    one admitted with the API token stays open."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as admin:
        mine = _run(admin)
    token = execution_tokens.mint(TOKEN, mine, lifetime=2)
    protocol = TOKEN_SUBPROTOCOL + base64.urlsafe_b64encode(token.encode()).decode()
    admin_protocol = TOKEN_SUBPROTOCOL + base64.urlsafe_b64encode(TOKEN.encode()).decode()
    with (
        ws_connect(
            f"ws://127.0.0.1:{server.port}/ws?execution_id={mine}",
            subprotocols=[protocol.rstrip("=")],
            open_timeout=10,
        ) as browser,
        ws_connect(
            f"ws://127.0.0.1:{server.port}/ws?execution_id={mine}",
            subprotocols=[admin_protocol.rstrip("=")],
            open_timeout=10,
        ) as operator,
    ):
        assert json.loads(browser.recv(timeout=10))["type"] == "snapshot"
        assert json.loads(operator.recv(timeout=10))["type"] == "snapshot"
        closed = _close_within(browser, 10)
        assert closed is not None and closed.code == 1008 and "expired" in closed.reason
        assert _close_within(operator, 1) is None  # still open, waiting for events


def test_the_browser_checks_and_cors_apply_to_an_execution_token(server: Server) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as admin:
        mine = _run(admin)
        token = _token_for(admin, mine)
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        preflight = browser.options(
            f"/api/status/{mine}",
            headers={
                "Origin": FRONT,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == FRONT
        allowed = browser.get(f"/api/status/{mine}", headers={**_bearer(token), "Origin": FRONT})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == FRONT
        output = browser.get(
            f"/api/objects/results/{mine}/output.mp4",
            headers={**_bearer(token), "Origin": FRONT, "Sec-Fetch-Site": "cross-site"},
        )
        assert output.status_code == 200
        for headers in (
            {"Origin": "https://evil.example"},
            {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "image"},
            {"Host": "evil.example"},
        ):
            refused = browser.get(f"/api/status/{mine}", headers={**_bearer(token), **headers})
            assert refused.status_code in (400, 403), headers
            assert "access-control-allow-origin" not in refused.headers


def test_execution_tokens_are_never_logged(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.DEBUG),
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as admin,
    ):
        mine = _run(admin)
        token = _token_for(admin, mine)
        browser = httpx.Client(base_url=server.url, headers=_bearer(token), timeout=30)
        with browser:
            browser.get(f"/api/status/{mine}")
            browser.get("/api/executions")
            browser.get(f"/api/status/{mine}", headers={"Origin": "https://evil.example"})
            browser.get(f"/api/status/{mine}", headers=_bearer(token[:-3] + "AAA"))
        assert _socket(server, token, None) in REFUSED
    assert caplog.records
    assert not [r for r in caplog.records if token in r.getMessage() or TOKEN in r.getMessage()]


def _signed_with(api_token: str, claims: dict[str, Any]) -> str:
    """A token of ``claims`` signed as the format says, with the key of ``api_token``: what
    anyone who found that API token could make."""
    key = hmac.new(api_token.encode(), b"framepipe execution token key v1", hashlib.sha256)
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    signed = f"fpx1.{payload}"
    signature = hmac.new(key.digest(), signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{base64.urlsafe_b64encode(signature).decode().rstrip('=')}"


def test_a_short_api_token_signs_no_execution_token(settings: Settings) -> None:
    """An execution token is given to browsers, and with one anyone can try API tokens
    offline, as fast as HMAC-SHA256 runs, until one signs it: a short API token would be
    found. A service whose API token is shorter than ``framepipe serve``'s makes none and
    takes none, and so does the Python helper."""
    short = "s3cret-token"
    with (
        Server(settings, pipelines=(render,), token=short) as server,
        httpx.Client(base_url=server.url, headers=_bearer(short), timeout=30) as admin,
    ):
        mine = _run(admin)
        answer = admin.post(f"/api/executions/{mine}/tokens", json={})
        assert answer.status_code == 409, answer.text
        assert "at least 32 characters" in answer.json()["detail"]
        offline = _signed_with(short, {"e": mine, "s": "read", "x": int(time.time()) + 600})
        refused = admin.get(f"/api/status/{mine}", headers=_bearer(offline))
        assert refused.status_code == 401, refused.text
        assert "makes no execution tokens" in refused.json()["detail"]
        assert "short" not in refused.text  # a client is not told about the API token
    with pytest.raises(InvalidInputError, match="at least 32 characters"):
        execution_tokens.mint(short, mine)
    with pytest.raises(InvalidInputError, match="makes no execution tokens"):
        execution_tokens.read(short, offline)


def test_a_service_without_a_token_makes_no_execution_tokens(settings: Settings) -> None:
    with (
        Server(settings, pipelines=(render,), token="") as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        mine = _run(client)
        answer = client.post(f"/api/executions/{mine}/tokens", json={})
        assert answer.status_code == 409
        assert "no API token" in answer.json()["detail"]
        unknown = client.post(f"/api/executions/{'f' * 32}/tokens", json={})
        assert unknown.status_code == 409


def test_one_execution_token_is_revoked_alone(server: Server) -> None:
    """A leaked share link is killed without changing the API token: revoking one token
    (by the token or its id) refuses it on every route and ends the live socket it opened
    (1008); another token of the same execution, minted the same second for the same
    lifetime, and the API token read on."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as admin:
        mine = _run(admin)
        leaked = admin.post(f"/api/executions/{mine}/tokens", json={"expires_in": 600}).json()
        kept = admin.post(f"/api/executions/{mine}/tokens", json={"expires_in": 600}).json()
        other = _token_for(admin, mine)
        assert leaked["token"] != kept["token"] and leaked["token_id"] != kept["token_id"]
        protocol = TOKEN_SUBPROTOCOL + base64.urlsafe_b64encode(
            leaked["token"].encode()
        ).decode().rstrip("=")
        with ws_connect(
            f"ws://127.0.0.1:{server.port}/ws?execution_id={mine}",
            subprotocols=[protocol],
            open_timeout=10,
        ) as live:
            assert json.loads(live.recv(timeout=10))["type"] == "snapshot"
            with httpx.Client(base_url=server.url, timeout=30) as browser:
                # An execution token cannot revoke, not even itself.
                refused = browser.post(
                    f"/api/executions/{mine}/tokens/revoke",
                    json={"token": leaked["token"]},
                    headers=_bearer(leaked["token"]),
                )
                assert refused.status_code == 403, refused.text
                answer = admin.post(
                    f"/api/executions/{mine[:8]}/tokens/revoke", json={"token": leaked["token"]}
                )
                assert answer.status_code == 200, answer.text
                assert answer.json() == {
                    "execution_id": mine,
                    "token_id": leaked["token_id"],
                    "revoked": True,
                }
                for path in (f"/api/executions/{mine}", f"/api/status/{mine}"):
                    gone = browser.get(path, headers=_bearer(leaked["token"]))
                    assert gone.status_code == 401 and "revoked" in gone.json()["detail"]
                    assert browser.get(path, headers=_bearer(kept["token"])).status_code == 200
                video = f"/api/objects/results/{mine}/output.mp4"
                assert browser.get(video, headers=_bearer(leaked["token"])).status_code == 401
                assert browser.get(video, headers=_bearer(kept["token"])).status_code == 200
                assert admin.get(f"/api/executions/{mine}").status_code == 200
            closed = _close_within(live, 10)
            assert closed is not None and closed.code == 1008 and "revoked" in closed.reason
        assert _socket(server, leaked["token"], mine) in REFUSED
        assert isinstance(_socket(server, kept["token"], mine), list)
        # Again: nothing to do. By id: the token itself need not be kept.
        again = admin.post(
            f"/api/executions/{mine}/tokens/revoke", json={"token_id": leaked["token_id"]}
        )
        assert again.status_code == 200 and again.json()["revoked"] is False
        by_id = admin.post(
            f"/api/executions/{mine}/tokens/revoke", json={"token_id": kept["token_id"]}
        )
        assert by_id.status_code == 200 and by_id.json()["revoked"] is True
        assert admin.get(f"/api/status/{mine}", headers=_bearer(kept["token"])).status_code == 401
        assert admin.get(f"/api/status/{mine}", headers=_bearer(other)).status_code == 200
        # A token of another execution, one the service did not sign, neither or both: 422.
        theirs = _run(admin)
        wrong = [
            {"token": _token_for(admin, theirs)},
            {"token": other[:-2] + "AA"},
            {},
            {"token": other, "token_id": kept["token_id"]},
            {"token_id": "not-an-id"},
        ]
        for body in wrong:
            answer = admin.post(f"/api/executions/{mine}/tokens/revoke", json=body)
            assert answer.status_code == 422, (body, answer.text)
        assert admin.get(f"/api/status/{mine}", headers=_bearer(other)).status_code == 200
