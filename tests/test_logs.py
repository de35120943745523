"""Every log line names its component."""

from __future__ import annotations

import io
import logging

from framepipe.logs import configure_logging, get_logger


def test_component_is_in_every_line() -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    try:
        get_logger("station_1").info("Persistent pipeline started (PID: %d)", 1234)
        logging.getLogger("framepipe.jobs.engine").warning("plain logger")
        lines = stream.getvalue().splitlines()
        assert lines[0].endswith("INFO    [station_1] Persistent pipeline started (PID: 1234)")
        assert lines[1].endswith("WARNING [jobs.engine] plain logger")
    finally:
        configure_logging("WARNING")
