"""The Redis delivery's backlog (``framepipe.jobs.delivery.redis_streams``) on a redis-server
of the test's own: a stream not made yet is an empty backlog, but Redis refusing to tell (an
ACL user without XINFO) is an error naming what was refused and where, not a backlog of 0;
and a stream whose group is gone still counts what waits in it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis

from framepipe.errors import BrokerError, ConfigError
from framepipe.jobs.delivery import Backlog, Delivery, open_delivery
from redis_servers import PrivateRedis, running

pytestmark = [pytest.mark.redis]


def steps(n: int) -> list[Delivery]:
    run = uuid.uuid4().hex[:8]
    return [Delivery(run, f"work:{i}") for i in range(n)]


def test_a_stream_not_made_yet_is_an_empty_backlog(private_redis: PrivateRedis) -> None:
    d = open_delivery(private_redis.url, "fp-backlog", timeout=5.0)
    try:
        assert d.backlog() == Backlog(0, 0)
        d.prepare()
        d.publish(steps(3))
        taken = d.take("a", 1, wait=0.5, window=1)
        assert d.backlog() == Backlog(2, 1)
        d.ack(taken)
        assert d.backlog() == Backlog(2, 0)
    finally:
        d.close()


def test_an_acl_user_without_xinfo_gets_an_error_not_an_empty_backlog(tmp_path: Path) -> None:
    with running(PrivateRedis(tmp_path, password="right-secret", user="fp")) as server:
        d = open_delivery(server.url, "fp-backlog", timeout=5.0)
        try:
            d.prepare()
            d.publish(steps(3))
            assert d.backlog().waiting == 3
            with redis.Redis.from_url(server.url) as admin:
                admin.acl_setuser("fp", enabled=True, commands=["-xinfo"])
            with pytest.raises(BrokerError) as caught:
                d.backlog()
            said = str(caught.value)
            assert "fp-backlog:jobs:steps" in said, said
            assert "xinfo" in said.lower(), said
            assert "'fp'" in said, said  # the user refused
            assert "right-secret" not in said
            assert d.take("a", 3, wait=0.5, window=3)  # delivering goes on
        finally:
            d.close()


def test_a_stream_whose_group_is_gone_counts_what_waits_in_it(
    private_redis: PrivateRedis,
) -> None:
    # The group is made again (from the stream's start) by the next read: what is in the
    # stream then is what waits, not 0.
    d = open_delivery(private_redis.url, "fp-backlog", timeout=5.0)
    try:
        d.prepare()
        d.publish(steps(4))
        with redis.Redis.from_url(private_redis.url) as admin:
            admin.xgroup_destroy("fp-backlog:jobs:steps", "workers")
        assert d.backlog() == Backlog(4, 0)
    finally:
        d.close()


def test_an_acl_user_refused_the_stream_commands_fails_a_start_as_a_setting(
    tmp_path: Path,
) -> None:
    # A worker's start (prepare) under an ACL without XGROUP: a ConfigError (the worker exits
    # 2, naming the user and the stream), not a broker that is away, retried for ever.
    with running(PrivateRedis(tmp_path, password="right-secret", user="fp")) as server:
        with redis.Redis.from_url(server.url) as admin:
            admin.acl_setuser("fp", enabled=True, commands=["-xgroup"])
        d = open_delivery(server.url, "fp-acl", timeout=5.0)
        try:
            with pytest.raises(ConfigError) as caught:
                d.prepare()
            said = str(caught.value)
            assert "'fp'" in said and "fp-acl:jobs:steps" in said and "xgroup" in said.lower()
            assert "right-secret" not in said
        finally:
            d.close()
