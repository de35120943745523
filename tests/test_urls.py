"""How URLs are shown in messages and logs: secrets masked, everything else as written."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from framepipe.urls import safe_text, safe_url


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
        ("http://u:pw@[::1/x", "http://u:***@[::1/x"),  # does not parse: masked all the same
        # A password with '/', '@', '?' or '#' unescaped: hidden whole, up to the last '@'.
        ("rtsp://user:pa/ss@cam:554/stream", "rtsp://user:***@cam:554/stream"),
        ("redis://:se/cret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://:p@ss@host:6379/0", "redis://:***@host:6379/0"),
        ("rtsp://u:a?b#c/d@cam/live?token=t#f", "rtsp://u:***@cam/live?token=***#f"),
        ("amqp://u:x:y/z@h:5672/", "amqp://u:***@h:5672/"),
        ("mqtt://me@home.example:p/w@broker:1883/fp", "mqtt://me@home.example:***@broker:1883/fp"),
        # '@' after a port reads as the end of a password: too much hidden, never too little.
        ("http://h:8080/notify?to=a@b.example", "http://h:***@b.example"),
        ("http://h/users/@bob:x", None),  # no 'user:' right after '//': nothing to hide
        ("http://[::1]:8080/a@b", None),  # an IPv6 host: no user information
        # A URL inside a query value is masked by the same rule.
        (
            "s3://b/p?endpoint=http://k:s/e@127.0.0.1:9000&region=x",
            "s3://b/p?endpoint=http://k:***@127.0.0.1:9000&region=x",
        ),
        (
            "s3://b/p?endpoint=http://h/?token=t&region=x",
            "s3://b/p?endpoint=http://h/?token=***&region=x",
        ),
        # A name whose word is a secret's, run together or not; a word that merely holds one
        # (keyframe, design, author) is no secret, and is shown.
        (
            "http://nvr/export?keyframe=12&design=v2&author=ops&accessToken=a&x-api-key=b",
            "http://nvr/export?keyframe=12&design=v2&author=ops&accessToken=***&x-api-key=***",
        ),
        (
            "http://h/x?AWSAccessKeyId=A&clientsecret=c",
            "http://h/x?AWSAccessKeyId=***&clientsecret=***",
        ),
        # A path segment that looks random (mixed case and digits), or follows a secret's
        # name, is masked; the host, the other segments, file names and lower-case ids are not.
        (
            "https://hooks.example.com/services/T0A1B2C3D/B0E4F5G6H/hR7uT0n4Xq9LmZk2Wp3VyB8c",
            "https://hooks.example.com/services/T0A1B2C3D/B0E4F5G6H/***",
        ),
        (
            "https://api.telegram.org/bot123456:ABC-DEF1234ghIkl-zyx57W2v1u123ew11/getMe",
            "https://api.telegram.org/***/getMe",
        ),
        (
            "https://maker.example/trigger/ev/with/key/abcdef0123456789?x=1",
            "https://maker.example/trigger/ev/with/key/***?x=1",
        ),
        ("https://h.example/v1/token/a1b2c3d4e5/x", "https://h.example/v1/token/***/x"),
        ("http://h/auth/login", None),  # a word after a secret's name is no secret
        ("s3://b/ml/0123456789abcdef0123456789abcdef/Output-2024-01-01.mp4", None),
        ("http://h/x/123e4567-e89b-12d3-a456-426614174000", None),
        ("/tmp/x/Recording-20240101.mp4", None),
        # A local file's path is no secret: its folders and file name are shown whole.
        ("file:///home/u/videos/MyVacationVideo2023/Clip01FrontDoor", None),
        ("/srv/Camera_01_FrontDoor/Recording20240101Am", None),
        ("sqlite:////data/MyProject2024Data/state.db", None),
        ("sqlite+pysqlite:////data/MyProject2024Data/state.db", None),
        (
            "unix:///run/RedisSocket2024Main/redis.sock?password=p",
            "unix:///run/RedisSocket2024Main/redis.sock?password=***",
        ),
    ],
)
def test_safe_url_masks_secrets_and_keeps_the_rest(url: str, shown: str | None) -> None:
    assert safe_url(url) == (url if shown is None else shown)


def test_every_url_shown_by_the_redis_and_mqtt_helpers_is_the_same_rule() -> None:
    from framepipe.mqtt import safe_url as mqtt_safe_url
    from framepipe.redis import safe_url as redis_safe_url

    assert redis_safe_url is safe_url and mqtt_safe_url is safe_url


# -- properties: a password is never shown, whatever it holds --------------------------------------

SCHEMES = st.sampled_from(["rtsp", "redis", "rediss", "amqp", "mqtt", "http", "postgresql+psycopg"])
USERS = st.text(st.characters(codec="ascii", categories=["L", "N"]) | st.sampled_from("._-~%"))
# Anything but whitespace, which ends a URL in a text: '/', '@', '?', '#', ':', '%' included.
PASSWORDS = st.text(
    st.characters(codec="utf-8", exclude_categories=["Z", "C"]) | st.sampled_from("/@?#:%&="),
    max_size=30,
)
HOSTS = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}(:[0-9]{1,5})?", fullmatch=True)
PATHS = st.from_regex(r"(/[A-Za-z0-9._~:-]{0,10}){0,4}", fullmatch=True)
# What follows the password's '@': anything a URL holds but '?' (a query is masked too), an
# '@' included, so the password's '@' may not be the last one.
TAILS = st.text(st.sampled_from("abz09.-_~:/@#&=%"), max_size=30)


@given(scheme=SCHEMES, user=USERS, password=PASSWORDS, host=HOSTS, path=PATHS)
@example(scheme="rtsp", user="user", password="pa/ss", host="cam:554", path="/stream")
@example(scheme="redis", user="", password="se/cret", host="host:6379", path="/0")
@example(scheme="rtsp", user="u", password="a@b?c#d", host="cam", path="/live")
def test_a_password_is_masked_whole_whatever_it_holds(
    scheme: str, user: str, password: str, host: str, path: str
) -> None:
    url = f"{scheme}://{user}:{password}@{host}{path}"
    assert safe_url(url) == f"{scheme}://{user}:***@{host}{path}"
    text = f"start location={url} latency=0\nnext {url}"
    shown = f"{scheme}://{user}:***@{host}{path}"
    assert safe_text(text) == f"start location={shown} latency=0\nnext {shown}"


@given(scheme=SCHEMES, user=USERS, password=PASSWORDS, tail=TAILS)
@example(scheme="http", user="u", password="p/w", tail="h:8080/x@y")
def test_no_part_of_a_password_is_shown_when_an_at_sign_follows_it(
    scheme: str, user: str, password: str, tail: str
) -> None:
    """Where the password ends is ambiguous when an '@' follows it: the mask runs to the last
    '@', so what is shown after it is part of what followed the password, never of it."""
    head = f"{scheme}://{user}:"
    shown = safe_url(f"{head}{password}@{tail}")
    assert shown.startswith(f"{head}***@")
    assert tail.endswith(shown[len(head) + 4 :])


@given(scheme=SCHEMES, user=USERS, host=HOSTS, path=PATHS)
def test_a_url_without_a_password_is_shown_as_written(
    scheme: str, user: str, host: str, path: str
) -> None:
    for url in (f"{scheme}://{host}{path}", f"{scheme}://{user}@{host}{path}"):
        assert safe_url(url) == url
        assert safe_text(f"at {url}: refused") == f"at {url}: refused"
