"""``framepipe demo``: the SD-card import on embedded defaults, in two rounds.

Guarantees: the second round runs only when the first completed; a failed or interrupted
round ends the command with that round's exit code.
"""

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer

from framepipe.cli.common import QuietOpt, console, errors, flush_std, say, settings_of
from framepipe.cli.follow import follow
from framepipe.jobs.client import JobClient

__all__ = ["demo"]


def demo(
    ctx: typer.Context,
    *,
    home: Annotated[
        Path | None, typer.Option("--home", help="Folder for the demo's state, objects and card.")
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the demo on embedded defaults: import clips from a generated SD card, twice.

    The second round adds a clip to the card: the ledger makes it import only that one."""
    with errors():
        from framepipe.demo import pipeline as demo_pipeline
        from framepipe.demo import prepare_card

        settings = settings_of(ctx, **({"home": home} if home is not None else {}))
        card = (settings.home / "demo-card").resolve()
        err, out = console(stderr=True), console()

        async def begin(client: JobClient) -> str:
            return await client.submit(
                demo_pipeline, {"card": str(card)}, ref="framepipe.demo:demo_import"
            )

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
    raise typer.Exit(0)
