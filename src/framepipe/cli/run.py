"""``framepipe run``: one execution of a job pipeline followed to its end, or a live app run
until it is stopped; and the parsing of its inputs.

Guarantees: inputs come from ``--inputs-json`` then ``--input`` (which win); a malformed pair
or file, or JSON nested too deep for the parser, exits 2 before anything is submitted. An input
the pipeline refuses that ``--input`` gave as a value read as JSON (``prompt=1984``, a number)
is refused with the way to quote it as text (``--input 'prompt="1984"'``).
"""

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from framepipe.cli.common import (
    ConcurrencyOpt,
    JsonOpt,
    QuietOpt,
    UsageError,
    console,
    errors,
    settings_of,
)
from framepipe.cli.follow import follow_and_exit
from framepipe.errors import InvalidInputError
from framepipe.jobs.client import JobClient
from framepipe.jobs.loading import LoadedPipeline, resolve_target
from framepipe.jobs.pipeline import Pipeline
from framepipe.tracing import setup_tracing

__all__ = ["parse_inputs", "run"]


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _parse_value(key: str, text: str) -> Any:
    """JSON when ``text`` is valid JSON (numbers, lists, objects, true/false/null), else the
    string itself (NaN and Infinity stay strings: they cannot be stored); JSON nested too deep
    to parse is a :class:`UsageError` naming ``--input KEY``."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return text
    except RecursionError:
        raise UsageError(f"--input {key}: nested too deep") from None


def _with_json_hint(exc: InvalidInputError, pairs: list[str]) -> InvalidInputError:
    """``exc`` saying how to quote it when the field it names wants text, was given as
    ``--input KEY=VALUE`` and VALUE was read as JSON, but not as text (``prompt=1984`` is the
    number 1984); ``exc`` itself otherwise."""
    if not exc.reason.startswith("Input should be a valid string"):  # pydantic's words
        return exc
    key = (exc.where or "").removeprefix("inputs.")
    given = [value for k, _, value in (pair.partition("=") for pair in pairs) if k.strip() == key]
    if not given or all(isinstance(_parse_value(key, value), str) for value in given):
        return exc
    value = next(v for v in given if not isinstance(_parse_value(key, v), str))
    hint = (
        f"(--input {key}={value} is read as JSON; to pass it as text, quote it as a JSON "
        f"string: --input '{key}={json.dumps(value)}')"
    )
    return type(exc)(f"{exc.reason} {hint}", where=exc.where)


def parse_inputs(pairs: list[str], inputs_json: Path | None = None) -> dict[str, Any]:
    """The execution's inputs from ``--inputs-json FILE`` then ``--input KEY=VALUE`` pairs
    (which win); a key given several times becomes a list of its values."""
    inputs: dict[str, Any] = {}
    if inputs_json is not None:
        try:
            loaded = json.loads(inputs_json.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"--inputs-json {inputs_json}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise UsageError(f"--inputs-json {inputs_json}: not valid JSON: {exc}") from exc
        except RecursionError:
            raise UsageError(f"--inputs-json {inputs_json}: nested too deep") from None
        if not isinstance(loaded, dict):
            raise UsageError(
                f"--inputs-json {inputs_json}: must hold a JSON object, not {type(loaded).__name__}"
            )
        inputs.update(loaded)
    given: dict[str, list[Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--input {pair!r}: expected KEY=VALUE")
        given.setdefault(key, []).append(_parse_value(key, value))
    for key, values in given.items():
        inputs[key] = values[0] if len(values) == 1 else values
    return inputs


def run(
    ctx: typer.Context,
    *,
    ref: Annotated[
        str, typer.Argument(metavar="FILE.py:PIPELINE", help="FILE.py:NAME or package.module:NAME.")
    ],
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            "-i",
            metavar="KEY=VALUE",
            help="An input; VALUE is parsed as JSON when it is valid JSON. Repeat a key for a "
            "list.",
        ),
    ] = None,
    inputs_json: Annotated[
        Path | None, typer.Option("--inputs-json", metavar="FILE", help="A JSON object of inputs.")
    ] = None,
    concurrency: ConcurrencyOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run one execution of a job pipeline to its end, with a progress display; or run a live
    App / StreamPipeline until Ctrl-C or SIGTERM stops it gracefully."""
    with errors():
        setup_tracing("framepipe")
        settings = settings_of(ctx)
        values = parse_inputs(inputs or [], inputs_json)
        resolved = resolve_target(ref)
        if not isinstance(resolved.target, Pipeline):
            from framepipe.live import run_live

            raise typer.Exit(run_live(resolved.target, settings, console(stderr=True)))
        loaded = LoadedPipeline(resolved.target, resolved.ref)

        async def begin(client: JobClient) -> str:
            try:
                return await client.submit(loaded.pipeline, values, ref=loaded.ref)
            except InvalidInputError as exc:
                hinted = _with_json_hint(exc, inputs or [])
                if hinted is exc:
                    raise
                raise hinted from None

        follow_and_exit(
            settings,
            begin,
            label=loaded.pipeline.name,
            quiet=quiet,
            as_json=as_json,
            concurrency=concurrency,
        )
