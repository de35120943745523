"""The command line processor scripts share (:mod:`framepipe.processors.fleet.arguments`):
defaults from the environment, the command line over it, and the client's keyword arguments;
a processor built from them runs against the real Redis."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import pytest

from conftest import REDIS_URL, redis_namespace
from framepipe.processors import ProcessorClient
from framepipe.processors.fleet.arguments import add_client_arguments, client_arguments


def _parse(argv: list[str], **kwargs: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="proc")
    add_client_arguments(parser, default_id="proc-1", result_stream="proc:results", **kwargs)
    parser.add_argument("--own", default="x")
    return parser.parse_args(argv)


def _namespace(args: argparse.Namespace) -> str:
    """The namespace a processor built from ``args`` registers under (nothing is started)."""
    return Echo(args.id, ["echo"], **client_arguments(args)).namespace


def test_defaults_come_from_the_environment_and_the_command_line_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("PROCESSOR_ID", "FRAMEPIPE_NAMESPACE", "HEALTH_PORT", "HEALTH_HOST", "LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    args = _parse([], default_capacity=4)
    assert (args.id, _namespace(args), args.capacity, args.health_port) == (
        "proc-1",
        "framepipe:",
        4,
        None,
    )
    assert (args.result_stream, args.health_host, args.log_level) == (
        "proc:results",
        "127.0.0.1",
        "INFO",
    )

    monkeypatch.setenv("PROCESSOR_ID", "from-env")
    monkeypatch.setenv("FRAMEPIPE_NAMESPACE", "ns:")
    monkeypatch.setenv("HEALTH_PORT", "8081")
    args = _parse(["--own", "y"])
    assert (args.id, _namespace(args), args.health_port, args.own) == ("from-env", "ns:", 8081, "y")

    args = _parse(["--id", "from-cli", "--health-port", "9000", "--capacity", "7"])
    options = client_arguments(args)
    assert options["environ"]["PROCESSOR_ID"] == "from-cli"  # --id wins over PROCESSOR_ID
    assert (options["health_port"], options["capacity"], _namespace(args)) == (9000, 7, "ns:")
    assert _namespace(_parse(["--namespace", "cli:"])) == "cli:"  # the command line wins


def test_a_malformed_health_port_in_the_environment_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HEALTH_PORT", "eighty")
    with pytest.raises(SystemExit) as exited:
        _parse([])
    assert exited.value.code == 2
    assert "--health-port: invalid int value: 'eighty'" in capsys.readouterr().err


class Echo(ProcessorClient):
    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
        return {"ok": True}


def test_a_processor_built_from_them_registers_under_its_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROCESSOR_ID", "not-this-one")
    with redis_namespace("fptest:") as ns:
        args = _parse(["--id", "echo-7", "--redis-url", REDIS_URL, "--namespace", ns])

        async def main() -> str:
            echo = Echo(args.id, ["echo"], **client_arguments(args))
            task = asyncio.create_task(echo.start())
            try:
                await asyncio.wait_for(echo.wait_registered(), 10)
                return echo.processor_id
            finally:
                await echo.stop()
                await asyncio.wait_for(task, 15)

        assert asyncio.run(main()) == "echo-7"


def test_blank_variables_count_as_unset_and_an_empty_health_host_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Compose writes an unset variable as an empty one: ``HEALTH_HOST=`` must not make the
    health endpoint listen on every interface, nor ``HEALTH_PORT=`` stop the start."""
    for name in ("PROCESSOR_ID", "FRAMEPIPE_NAMESPACE", "HEALTH_PORT", "HEALTH_HOST", "LOG_LEVEL"):
        monkeypatch.setenv(name, " ")
    args = _parse([])
    assert (args.id, _namespace(args), args.health_port) == ("proc-1", "framepipe:", None)
    assert (args.health_host, args.log_level) == ("127.0.0.1", "INFO")
    with pytest.raises(ValueError, match="health_host must name an address"):
        Echo("echo-1", ["echo"], redis_url=REDIS_URL, health_host="", environ={})
