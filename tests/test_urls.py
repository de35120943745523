"""How URLs are shown in messages and logs: secrets masked, everything else as written."""

from __future__ import annotations

import pytest

from framepipe.urls import safe_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("rtsp://cam:p%40ss@10.0.0.5/live?channel=1", "rtsp://cam:***@10.0.0.5/live?channel=1"),
        ("redis://127.0.0.1/0?password=S3CRET", "redis://127.0.0.1/0?password=***"),
        (
            "https://m.example/v1?api_key=K&mode=fast&X-Amz-Signature=abc&%74oken=t",
            "https://m.example/v1?api_key=***&mode=fast&X-Amz-Signature=***&%74oken=***",
        ),
        ("http://user@host/x", "http://user@host/x"),  # a user name alone is no secret
        ("s3://bucket/prefix?endpoint=http://127.0.0.1:9000", None),
        ("/plain/path", "/plain/path"),
        ("sqlite:////tmp/x.db", None),  # as written: nothing to mask, nothing rewritten
        ("sqlite:///rel.db", None),
        (
            "postgresql+psycopg://u:pw@/test?host=/run/pg",
            "postgresql+psycopg://u:***@/test?host=/run/pg",
        ),
        ("http://h/p?a=1&token=x#frag?token=y", "http://h/p?a=1&token=***#frag?token=y"),
        ("http://u:pw@[::1/x", "http://***@[::1/x"),  # does not parse: userinfo masked whole
    ],
)
def test_safe_url_masks_secrets_and_keeps_the_rest(url: str, shown: str | None) -> None:
    assert safe_url(url) == (url if shown is None else shown)


def test_every_url_shown_by_the_redis_and_mqtt_helpers_is_the_same_rule() -> None:
    from framepipe.mqtt import safe_url as mqtt_safe_url
    from framepipe.redis import safe_url as redis_safe_url

    assert redis_safe_url is safe_url and mqtt_safe_url is safe_url
