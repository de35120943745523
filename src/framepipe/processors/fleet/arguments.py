"""The command line every processor script shares.

:func:`add_client_arguments` adds a :class:`~framepipe.processors.fleet.client.ProcessorClient`'s
options to an :mod:`argparse` parser, with the defaults the client reads from the environment
named in their help (``PROCESSOR_ID``, ``HEALTH_PORT``, ``HEALTH_HOST``, ``LOG_LEVEL``; the
Redis URL and the namespace are left to the client's own rule,
:mod:`~framepipe.processors.fleet.environment`);
:func:`client_arguments` turns the parsed options into the client's keyword arguments, so a
script adds only its own options::

    parser = argparse.ArgumentParser(description="My processor.")
    add_client_arguments(parser, default_id="mine-1", result_stream="mine:results")
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()
    MyProcessor(args.id, **client_arguments(args), threshold=args.threshold)

An option given on the command line wins over the environment (``--id`` over
``PROCESSOR_ID`` too, which the client otherwise prefers).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from framepipe.processors.fleet.keys import DEFAULT_NAMESPACE
from framepipe.processors.fleet.options import (
    DEFAULT_CAPACITY,
    DEFAULT_HEALTH_HOST,
    DEFAULT_HEALTH_INTERVAL,
)

__all__ = ["add_client_arguments", "client_arguments"]


def add_client_arguments(
    parser: argparse.ArgumentParser,
    *,
    default_id: str,
    result_stream: str,
    default_capacity: int = DEFAULT_CAPACITY,
) -> None:
    """Add ``--id``, ``--redis-url``, ``--namespace``, ``--result-stream``, ``--capacity``,
    ``--health-interval``, ``--health-port``, ``--health-host`` and ``--log-level`` to
    ``parser``. A blank variable counts as unset; a malformed ``HEALTH_PORT`` is refused by
    argparse as ``--health-port``'s."""

    def env(name: str, default: str | None = None) -> str | None:
        """The variable, a blank one counting as unset (compose writes unset ones as "")."""
        return os.environ.get(name, "").strip() or default

    parser.add_argument(
        "--id",
        default=env("PROCESSOR_ID", default_id),
        help=f"processor id, unique in the namespace (env PROCESSOR_ID; default {default_id})",
    )
    parser.add_argument(
        "--redis-url",
        default=None,
        help="Redis URL (default: env REDIS_URL, else REDIS_HOST and REDIS_PORT, else "
        "redis://127.0.0.1:6379/0)",
    )
    parser.add_argument(
        "--namespace",
        default=None,  # the client's rule: FRAMEPIPE_NAMESPACE, else its default
        help=f"registry key prefix (default: env FRAMEPIPE_NAMESPACE, else {DEFAULT_NAMESPACE})",
    )
    parser.add_argument(
        "--result-stream",
        default=result_stream,
        help=f"stream receiving the results (default {result_stream})",
    )
    parser.add_argument(
        "--capacity",
        type=int,
        default=default_capacity,
        help=f"frames in flight ({default_capacity})",
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        default=DEFAULT_HEALTH_INTERVAL,
        help=f"heartbeat period in seconds ({DEFAULT_HEALTH_INTERVAL:g})",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=env("HEALTH_PORT"),  # argparse converts a string default with type
        help="serve GET /health on this port for a compose healthcheck: 200 while registered "
        "and taking frames, else 503 (env HEALTH_PORT; default: no endpoint)",
    )
    parser.add_argument(
        "--health-host",
        default=env("HEALTH_HOST", DEFAULT_HEALTH_HOST),
        help="where the health endpoint listens (env HEALTH_HOST; default "
        f"{DEFAULT_HEALTH_HOST}: inside the container only; 0.0.0.0 for probes from outside)",
    )
    parser.add_argument(
        "--log-level",
        default=env("LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (env LOG_LEVEL; default INFO)",
    )


def client_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The client's keyword arguments of options parsed with :func:`add_client_arguments`
    (all but ``--id``, the first positional argument, and ``--log-level``)."""
    return {
        "capacity": args.capacity,
        "result_stream": args.result_stream,
        "redis_url": args.redis_url,
        "namespace": args.namespace,
        "health_interval": args.health_interval,
        "health_port": args.health_port,
        "health_host": args.health_host,
        "environ": {**os.environ, "PROCESSOR_ID": args.id},  # --id wins over PROCESSOR_ID
    }
