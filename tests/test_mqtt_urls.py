"""MQTT URLs as the settings and the sink read them: a wrong one is refused naming what is
wrong, and never with any part of its password (no broker needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from framepipe.config import load_settings
from framepipe.errors import ConfigError
from framepipe.mqtt import parse_mqtt_url

SECRET = "hunter2"


@pytest.mark.parametrize(
    "url",
    [
        f"mqtt://user:{SECRET}/xyz@broker:1883/fp",  # '/' unescaped: read as 'user:<port>'
        f"mqtt://user:{SECRET}?xyz@broker/fp",
        f"mqtt://user:{SECRET}#xyz@broker/fp",
        f"mqtt://user:{SECRET}\uff0fxyz@broker/fp",  # a full-width '/' (NFKC makes it '/')
        f"mqtt://user:{SECRET}\uff20xyz@broker/fp",  # a full-width '@'
        f"mqtt://user:{SECRET}\uff20broker:1883/fp",  # a full-width '@' and no other
        f"mqtt://us[er:{SECRET}@broker:1883/fp",  # a '[' in the user name
        f"mqtt://ops team:{SECRET}/xyz@broker:1883/fp",  # a space in the user name
    ],
)
def test_a_password_the_url_parser_misreads_is_never_in_the_error(
    url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="percent-encode") as caught:
        parse_mqtt_url(url)
    assert SECRET not in str(caught.value) and "xyz" not in str(caught.value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FRAMEPIPE_MQTT_URL", url)
    with pytest.raises(ConfigError, match="FRAMEPIPE_MQTT_URL") as caught:
        load_settings()
    assert SECRET not in str(caught.value) and "xyz" not in str(caught.value)
    assert SECRET not in str(caught.value.__cause__)


def test_a_percent_encoded_password_with_those_characters_is_read_whole() -> None:
    target = parse_mqtt_url("mqtt://user:a%2Fb%3Fc%23d%40e@broker/fp")
    assert (target.host, target.username, target.password) == ("broker", "user", "a/b?c#d@e")


@pytest.mark.parametrize(
    "url",
    [
        f"mqtt://user:{SECRET}%FF@broker/fp",  # %FF begins no UTF-8 character
        "mqtt://us%C3er@broker/fp",  # a UTF-8 sequence cut short
        "mqtt://broker/fp%FE",
    ],
)
def test_a_percent_escape_that_is_no_utf8_is_refused_not_read_as_another_character(
    url: str,
) -> None:
    """Read leniently, ``%FF`` would become U+FFFD: another password sent, refused by the
    broker for a reason nobody can see. It is refused here, saying which parts to look at."""
    with pytest.raises(ConfigError, match="not UTF-8") as caught:
        parse_mqtt_url(url)
    assert SECRET not in str(caught.value)


def test_a_sinks_settings_are_read_from_their_one_owner_and_cannot_be_changed() -> None:
    """The topic prefix, labels and queue bound are each held once (the counts, health and
    events topics cannot drift apart): read them, but a change is refused, not half-made."""
    pytest.importorskip("aiomqtt")
    from framepipe.mqtt import MqttEventSink

    sink = MqttEventSink("mqtt://broker/home/fp?labels=segment:visitor", max_pending=5)
    assert (sink.prefix, sink.available_topic, sink.max_pending) == (
        "home/fp",
        "home/fp/available",
        5,
    )
    assert dict(sink.labels) == {"segment": "visitor"}
    with pytest.raises(AttributeError):
        sink.prefix = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        sink.labels["order"] = "orders"  # type: ignore[index]


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("mqtt://broker/fp?keepalive=70000", "keepalive must be 1 to 65535"),
        ("mqtt://broker/fp?keepalive=0", "keepalive must be 1 to 65535"),
        ("mqtts://broker/fp?ca=/no/such/ca.pem", "is not a file this process can read"),
        ("mqtt://broker/fp?client_id=cam%FF", "not UTF-8"),
        ("mqtt://broker/fp?labels=segment:%FF", "not UTF-8"),
    ],
)
def test_a_setting_the_client_could_never_use_is_refused_at_once(url: str, said: str) -> None:
    """A keep-alive past MQTT's 16 bits or a CA file that is not there failed at every
    reconnect (a stack trace each time, or a broker taken for down); a client id or label that
    percent-decodes to no UTF-8 was read as U+FFFD."""
    with pytest.raises(ConfigError, match=said):
        parse_mqtt_url(url)


def test_a_url_without_a_plain_scheme_shows_nothing_of_it() -> None:
    from framepipe.urls import check_sent_url, scheme_only

    assert scheme_only("redis://u:pw@h/0") == "redis://***"
    assert scheme_only("unix:/tmp/r.sock?password=x") == "unix:***"
    assert scheme_only("pa$$word@host") == "***"
    with pytest.raises(ConfigError) as refused:
        check_sent_url("unix:/tmp/r.sock?password=s3cr%FFet", "Redis URL")
    assert "s3cr" not in str(refused.value)
