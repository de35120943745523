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


def test_a_line_holding_a_lone_surrogate_is_written_by_a_utf8_handler() -> None:
    """A file name's undecodable byte (``name\\udcff``, as os.fsdecode gives it) in a log line:
    a handler writing UTF-8 writes it escaped, instead of failing the line ("--- Logging
    error ---"); the record still names the caller's line."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True)
    failed: list[logging.LogRecord] = []

    class Strict(logging.StreamHandler):  # type: ignore[type-arg]
        def handleError(self, record: logging.LogRecord) -> None:
            failed.append(record)

    handler = Strict(stream)
    handler.setFormatter(logging.Formatter("%(message)s %(filename)s"))
    log = get_logger("surrogates")
    log.logger.addHandler(handler)
    log.logger.setLevel(logging.INFO)
    try:
        log.info("capture started: %s", "sh -c 'exit 3' 'name\udcff'")
        log.warning("bad\ud800 message")
    finally:
        log.logger.removeHandler(handler)
    assert failed == []
    assert raw.getvalue().decode("utf-8").splitlines() == [
        "capture started: sh -c 'exit 3' 'name\\udcff' test_logs.py",
        "bad\\ud800 message test_logs.py",
    ]


def test_no_line_shows_the_password_of_a_url() -> None:
    """A password in a URL, in a message, an argument, an exception argument, a traceback
    (``exc_info``) or another library's record: every line shows it masked, the rest as it
    was written."""
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    log = get_logger("cam")
    try:
        log.info("opening rtsp://admin:pw-one@cam/1")
        log.warning("capture failed: %s", "rtsp://admin:pw-two@cam/2 refused")
        error = ConnectionError("cannot reach postgresql://app:pw-three@db/prod")
        log.error("database away (%s)", error)
        try:
            raise error
        except ConnectionError:
            log.exception("step failed")
        logging.getLogger("framepipe.vendor").warning("redis://:pw-four@cache:6379/0 down")
    finally:
        configure_logging("WARNING")
    text = stream.getvalue()
    assert "pw-" not in text, text
    assert "rtsp://admin:***@cam/1" in text and "rtsp://admin:***@cam/2 refused" in text
    assert text.count("postgresql://app:***@db/prod") == 2  # the line, the traceback
    assert "Traceback" in text and "redis://:***@cache:6379/0 down" in text


def test_a_format_holding_a_url_keeps_its_placeholders_and_the_line_is_masked() -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    try:
        get_logger("cam").info("fetching http://%s/x?token=%s", "cam", "tok-secret")
        get_logger("cam").info("as %(user)s:%(pw)s", {"user": "rtsp://a", "pw": "b@cam"})
    finally:
        configure_logging("WARNING")
    text = stream.getvalue()
    assert "Logging error" not in text and "tok-secret" not in text
    assert "fetching http://cam/x?token=***" in text
