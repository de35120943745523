"""``framepipe demo``: the SD-card import on embedded defaults, in two rounds; ``--live``: the
service and its dashboard with a live order station and a batch import, until Ctrl-C.

Guarantees: without ``--live`` it ends by itself; the second round runs only when the first
completed, and a failed or interrupted round ends the command with that round's exit code.
With ``--live`` (needs the ``server`` extra, named with its pip command when missing) it binds
loopback unless a token is configured (as ``framepipe serve``), takes a free port when the
default one is busy and says which, and exits 0 once SIGINT, SIGTERM or ``--duration`` stopped
it; the live-only options without ``--live`` are a usage error.
"""

import asyncio
import os
import secrets
from typing import Annotated

import typer
from rich.console import Console

from framepipe.cli.common import (
    QuietOpt,
    UsageError,
    console,
    errors,
    flush_std,
    home_option,
    say,
    settings_of,
)
from framepipe.cli.follow import follow
from framepipe.cli.serve import check_exposure
from framepipe.config import Settings
from framepipe.jobs.client import JobClient

__all__ = ["demo"]

DEFAULT_PORT = 8000


def demo(
    ctx: typer.Context,
    *,
    home: Annotated[
        str | None,
        typer.Option(
            "--home", metavar="PATH", help="Folder for the demo's state, objects and card."
        ),
    ] = None,
    live: Annotated[
        bool,
        typer.Option(
            "--live",
            help="Serve the dashboard with a live order station and a batch import, "
            "until Ctrl-C (needs the server extra: pip install 'framepipe\\[server]').",
        ),
    ] = False,
    host: Annotated[
        str | None, typer.Option("--host", help="With --live: address to bind [127.0.0.1].")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            "--port",
            min=0,
            max=65535,
            help=f"With --live: port [{DEFAULT_PORT}, or a free one when it is busy].",
        ),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option("--duration", min=0.0, help="With --live: stop after SECONDS."),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the demo on embedded defaults: import clips from a generated SD card, twice.

    The second round adds a clip to the card: the ledger makes it import only that one.
    With --live: the dashboard, a live order station and the import, until Ctrl-C."""
    with errors():
        if not live:
            options = {"--host": host, "--port": port, "--duration": duration}
            given = [name for name, value in options.items() if value is not None]
            if given:
                verb = "needs" if len(given) == 1 else "need"
                raise UsageError(f"{', '.join(given)} {verb} --live")
        folder = home_option(home)
        settings = settings_of(ctx, **({"home": folder} if folder is not None else {}))
        if live:
            _live(settings, host or "127.0.0.1", port, duration)
        else:
            _batch(settings, quiet)
    raise typer.Exit(0)


def _live(settings: Settings, host: str, port: int | None, duration: float | None) -> None:
    from framepipe.demo_live import sigterm_interrupts

    out = console()
    try:
        with sigterm_interrupts():
            _serve_live(settings, host, port, duration, out)
    except KeyboardInterrupt:  # before the service ran: nothing of it to stop
        say(out, "Demo stopped before the service started.")


def _serve_live(
    settings: Settings, host: str, port: int | None, duration: float | None, out: Console
) -> None:
    from framepipe.demo_live import LiveDemo, listen, require_server_extra

    require_server_extra()
    check_exposure(host, settings)
    token = settings.api_token or secrets.token_urlsafe(24)
    sock = listen(host, DEFAULT_PORT if port is None else port, exact=port is not None)
    bound = sock.getsockname()[1]
    if port is None and bound != DEFAULT_PORT:
        say(out, f"Port {DEFAULT_PORT} is busy: serving on port {bound} instead.")
    shown = f"[{host}]" if ":" in host else host
    link = f"http://{shown}:{bound}/"
    if settings.api_token is None:
        link += f"#token={token}"  # in the fragment: the browser never sends it
    say(out, f"Making the demo's media under {settings.home} ...")
    LiveDemo(settings, token=token, say=lambda line: say(out, line), duration=duration).run(
        sock, link
    )


def _batch(settings: Settings, quiet: bool) -> None:
    from framepipe.demo import REF, prepare_card
    from framepipe.demo import pipeline as demo_pipeline

    card = (settings.home / "demo-card").resolve()
    err, out = console(stderr=True), console()

    async def begin(client: JobClient) -> str:
        return await client.submit(demo_pipeline, {"card": str(card)}, ref=REF)

    for round_, clips in ((1, 3), (2, 4)):
        prepare_card(card, clips)
        say(err, f"round {round_}: the card {card} holds {clips} clips", "bold")
        code, interrupted = asyncio.run(
            follow(
                settings,
                begin,
                label=f"demo_import (round {round_})",
                quiet=quiet,
                as_json=False,
                concurrency=None,
            )
        )
        if code or interrupted:
            flush_std()
            os._exit(code)
    say(out, f"objects: {settings.resolved_objects_url} (imports/, thumbnails/, reports/)")
    say(out, "next: framepipe jobs list · framepipe jobs show <id>")
    say(out, "live: framepipe demo --live (the dashboard, a live order station)")
