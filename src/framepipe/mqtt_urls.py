"""MQTT URLs: what ``mqtt://user:pass@host:1883/prefix?qos=1`` names (:class:`MqttTarget`),
checked at the boundary with errors that name the wrong part and never the password; and how a
name becomes one topic level (:func:`topic_level`).

It sits outside :mod:`framepipe.mqtt` and imports nothing of it, so that the settings can check
an MQTT URL (:func:`framepipe.config_checks.check_mqtt_url`) without loading the sink; the sink
and :mod:`framepipe.mqtt` take their names from here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote

from framepipe.errors import ConfigError
from framepipe.urls import check_sent_url, safe_url, split_url

__all__ = ["MqttTarget", "parse_mqtt_url", "topic_level", "unfit_in_topic"]


def unfit_in_topic(char: str) -> bool:
    """Whether ``char`` may not appear in an MQTT topic as the brokers check it (MQTT 3.1.1
    and 5, section 1.5.3; Mosquitto drops a client that sends one): NUL and the other C0
    and C1 controls (U+0000-U+001F, U+007F-U+009F), a lone surrogate (U+D800-U+DFFF: not
    encodable as UTF-8) and the Unicode non-characters (U+FDD0-U+FDEF and U+xFFFE, U+xFFFF
    in every plane)."""
    code = ord(char)
    return (
        code <= 0x1F
        or 0x7F <= code <= 0x9F
        or 0xD800 <= code <= 0xDFFF
        or 0xFDD0 <= code <= 0xFDEF
        or code & 0xFFFE == 0xFFFE
    )


_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class MqttTarget:
    """What an MQTT URL names (see :func:`parse_mqtt_url`)."""

    host: str
    port: int
    tls: bool
    prefix: str
    qos: int = 1
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str | None = None
    ca_file: str | None = None
    keepalive: int = 30
    labels: tuple[tuple[str, str], ...] = ()


def parse_mqtt_url(url: str) -> MqttTarget:
    """``mqtt://[user[:password]@]host[:port][/prefix][?qos=1&client_id=ID&keepalive=30]``,
    ``mqtts://`` for TLS (port 8883 by default; ``ca=/path/ca.pem`` trusts that CA instead of
    the system's); ``labels=segment:visitor,order:orders`` renames segmenter labels. The
    prefix may have several levels (``home/framepipe``); the default is ``framepipe``. Raises
    :class:`ConfigError` naming the URL (password masked) and the part that is wrong."""
    shown = safe_url(url)
    parts = split_url(url, "MQTT URL")
    check_sent_url(url, "MQTT URL")  # MQTT sends its host, user, password, client id as UTF-8
    port = parts.port
    if parts.scheme not in _DEFAULT_PORTS:
        raise ConfigError(f"MQTT URL {shown!r}: the scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigError(f"MQTT URL {shown!r}: no host")
    try:  # a %XX of a byte that begins no UTF-8 character would be read as U+FFFD
        prefix = unquote(parts.path, errors="strict").strip("/") or "framepipe"
    except UnicodeDecodeError:
        raise ConfigError(
            f"MQTT URL {shown!r}: its topic prefix, percent-decoded, is not UTF-8 (a %XX "
            "escape of a byte that is no UTF-8 text)"
        ) from None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if any(c in "+#" or unfit_in_topic(c) for c in prefix) or "//" in prefix:
        raise ConfigError(
            f"MQTT URL {shown!r}: the topic prefix {prefix!r} may not hold '+', '#', "
            "an empty level, a control character, a lone surrogate or a Unicode non-character"
        )
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    unknown = set(query) - {"qos", "client_id", "keepalive", "ca", "labels"}
    if unknown:
        raise ConfigError(
            f"MQTT URL {shown!r}: unknown parameter(s) {', '.join(sorted(unknown))} "
            "(known: qos, client_id, keepalive, ca, labels)"
        )
    labels = []
    for pair in filter(None, query.get("labels", "").split(",")):
        label, _, name = pair.partition(":")
        if not label or not name or any(c in "/+#" or unfit_in_topic(c) for c in name):
            raise ConfigError(
                f"MQTT URL {shown!r}: labels must be label:name pairs separated by commas "
                f"(names without '/', '+', '#'), not {pair!r}"
            )
        labels.append((label, name))
    try:
        qos = int(query.get("qos", "1"))
        keepalive = int(query.get("keepalive", "30"))
    except ValueError:
        raise ConfigError(f"MQTT URL {shown!r}: qos and keepalive must be integers") from None
    if qos not in (0, 1, 2):
        raise ConfigError(f"MQTT URL {shown!r}: qos must be 0, 1 or 2, not {qos}")
    if not 1 <= keepalive <= 65535:  # MQTT's keep alive is a 16-bit number of seconds
        raise ConfigError(f"MQTT URL {shown!r}: keepalive must be 1 to 65535 seconds")
    ca = query.get("ca") or None
    if ca is not None and not (os.path.isfile(ca) and os.access(ca, os.R_OK)):
        raise ConfigError(f"MQTT URL {shown!r}: ca={ca!r} is not a file this process can read")
    return MqttTarget(
        host=parts.hostname,
        port=port or _DEFAULT_PORTS[parts.scheme],
        tls=parts.scheme == "mqtts",
        prefix=prefix,
        qos=qos,
        username=username,
        password=password,
        client_id=query.get("client_id") or None,
        ca_file=ca,
        keepalive=keepalive,
        labels=tuple(labels),
    )


def topic_level(name: object) -> str:
    """``name`` as one valid topic level: '/', '+', '#', whitespace and what no topic may hold
    (:func:`unfit_in_topic`: controls, lone surrogates, non-characters)
    become '_'; an empty name is '_'."""
    text = str(name) or "_"
    return "".join("_" if c in "/+#" or c.isspace() or unfit_in_topic(c) else c for c in text)
