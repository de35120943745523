"""The "say it once, and once when it is over" rule of :class:`framepipe.outage.Outage`, with
credentials refused told apart from the outage they come in."""

from __future__ import annotations

from framepipe.outage import Outage


def test_refused_credentials_are_told_once_per_outage_whenever_they_come() -> None:
    outage = Outage()
    down, denied = ConnectionError("gone"), PermissionError("WRONGPASS")
    assert outage.failed(down) is True  # the outage begins: said
    assert outage.failed(down) is False
    assert outage.failed(denied, refused=True) is True  # refused, later in it: said once
    assert outage.failed(denied, refused=True) is False
    assert outage.failed(down) is False
    assert outage.refused and outage.attempts == 5
    assert outage.answered() is not None  # over: said once
    assert outage.answered() is None
    assert not outage.refused
    assert outage.failed(denied, refused=True) is True  # the next outage: said again
    assert outage.failed(down) is False
    assert outage.last_error == "ConnectionError: gone"
