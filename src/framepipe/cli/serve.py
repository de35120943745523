"""``framepipe serve``: the HTTP API, the dashboard and the live events, on uvicorn.

Guarantees: it refuses (exit 2) to bind anything but a loopback address without a configured
token; without one on loopback it makes a token for the run and prints it only in the
dashboard link's fragment (unless ``--no-token``); a state database that cannot be written
exits 1 before anything is served. An object store that cannot be opened (an endpoint that does
not answer, credentials refused, a bucket missing) is one warning line naming the setting and
the cause, and the service starts without it (``/health`` says so; it is opened again in the
background); one whose setting is wrong (credentials in the endpoint, none at all) exits 2. No
message shows a password or secret of a URL. The address is bound before the link is printed,
so the link names the port served (the one the system picked for ``--port 0``); an address
that cannot be bound exits 2. Ctrl-C or SIGTERM shuts the service down gracefully, closes its
stores, and exits 0.
"""

import ipaddress
import secrets
import signal
import socket
from typing import Annotated

import typer

from framepipe.cli.common import UsageError, console, errors, open_store, say, settings_of
from framepipe.config import Settings
from framepipe.errors import MissingDependencyError, StateStoreError
from framepipe.jobs.loading import resolve_pipeline, resolve_target
from framepipe.listening import listen
from framepipe.tracing import setup_tracing

__all__ = ["bind", "check_exposure", "serve"]


def check_exposure(host: str, settings: Settings) -> None:
    """Refuse (:class:`UsageError`) to serve anything but a loopback address without a
    configured token."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not settings.api_token:
        raise UsageError(
            f"refusing to serve on {host} without a token: set "
            "FRAMEPIPE_API_TOKEN (or bind 127.0.0.1)"
        )


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening (``port`` 0: one the system picks,
    which ``sock.getsockname()`` says); :class:`ConfigError` naming the address when it
    cannot be bound."""
    return listen(host, port, busy_hint="--port 0 takes a free one")


def serve(
    ctx: typer.Context,
    *,
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    pipelines: Annotated[
        list[str] | None,
        typer.Option(
            "--pipeline",
            "-p",
            metavar="FILE.py:NAME",
            help="A pipeline the service may start. Repeatable.",
        ),
    ] = None,
    live: Annotated[
        list[str] | None,
        typer.Option(
            "--app",
            metavar="FILE.py:NAME",
            help="A live App (or StreamPipeline) to run inside the service, its sources "
            "controllable over the API. Repeatable.",
        ),
    ] = None,
    no_token: Annotated[
        bool,
        typer.Option(
            "--no-token",
            help="Serve a loopback address without a token (any local user and "
            "program may then use it; web pages still may not).",
        ),
    ] = False,
) -> None:
    """Serve the HTTP API, the dashboard and the WebSocket of live events.

    Open without the token: /health, the dashboard's page (/) and files
    (/static/), and the API's schema (/openapi.json).
    Everything else (/api/..., /metrics, /ws, /ws/detector) needs the bearer
    token: FRAMEPIPE_API_TOKEN, or else one made for this run and printed with
    the dashboard's URL (as Jupyter does). A token is required to bind anything
    but a loopback address."""
    with errors():
        setup_tracing("framepipe-serve")
        settings = settings_of(ctx)
        check_exposure(host, settings)
        token = settings.api_token
        if token is None and not no_token:
            token = secrets.token_urlsafe(24)
        store = open_store(settings)
        problem = store.check_writable()
        if problem is not None:
            store.close()
            raise StateStoreError(f"the state database {store.safe_url} is {problem}")
        from framepipe.server import create_app
        from framepipe.server.object_access import ObjectAccess

        loaded = [resolve_pipeline(ref).pipeline for ref in pipelines or []]
        from framepipe.app import App
        from framepipe.stream.pipeline import StreamPipeline

        hosted: list[App] = []
        for ref in live or []:
            target = resolve_target(ref).target
            if isinstance(target, StreamPipeline):
                single = App(target.name, settings=settings)
                single.add_pipeline(target)
                target = single
            if not isinstance(target, App):
                raise UsageError(f"--app {ref}: a job pipeline is not a live app (use --pipeline)")
            hosted.append(target)
        objects = ObjectAccess(settings.resolved_objects_url)
        problem = objects.open()
        if problem is not None:
            say(
                console(stderr=True),
                f"warning: {objects.describe()} cannot be opened: {problem}; serving without "
                "it (/health says so) and opening it again in the background",
                "yellow",
            )
        application = create_app(
            settings, pipelines=loaded, apps=hosted, store=store, objects=objects, token=token or ""
        )
        try:
            import uvicorn
        except ModuleNotFoundError as exc:
            raise MissingDependencyError("uvicorn", "server", "framepipe serve") from exc

        sock = bind(host, port)
        shown = f"[{host}]" if ":" in host else host
        link = f"http://{shown}:{sock.getsockname()[1]}/"
        if token and settings.api_token is None:
            link += f"#token={token}"
            say(
                console(),
                "A token was made for this run (set FRAMEPIPE_API_TOKEN to choose "
                "one; --no-token for none on loopback).",
            )
        say(console(), f"Dashboard: {link}")
        config = uvicorn.Config(
            application,
            host=host,
            port=port,
            log_level=settings.log_level.lower(),
            timeout_graceful_shutdown=max(1, int(settings.shutdown_grace)),
        )
        server = uvicorn.Server(config)
        # uvicorn shuts down gracefully on SIGTERM, then raises it again for the handler it
        # found: the default one would end the process before the stores below are closed.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:  # as uvicorn.run does, on the socket bound above
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            sock.close()
            objects.close()
            store.close()
        if not server.started:
            raise typer.Exit(3)  # uvicorn's STARTUP_FAILURE, as uvicorn.run exits
