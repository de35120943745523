"""The ML worker's entry point: framepipe's command line with the original worker's settings.

The team's worker was started with ``DATABASE_FILE``, ``MINIO_*`` and ``RABBITMQ_URL`` in its
environment. framepipe reads ``FRAMEPIPE_DATABASE_URL``, ``FRAMEPIPE_OBJECTS_URL`` (with
``FRAMEPIPE_S3_ACCESS_KEY``/``FRAMEPIPE_S3_SECRET_KEY``) and ``FRAMEPIPE_BROKER_URL``
instead; this module maps the first onto the second, then runs ``framepipe``::

    python -m framepipe.pipelines.ml_worker                    # a worker, ML pipeline loaded
    python -m framepipe.pipelines.ml_worker worker -c 2        # the same, 2 steps at once
    python -m framepipe.pipelines.ml_worker serve --port 8000  # the HTTP service for it
    python -m framepipe.pipelines.ml_worker jobs list          # any other framepipe command

Mapping (:class:`~framepipe.pipelines.ml_settings.MlVideoSettings` reads the variables):

- ``DATABASE_FILE=/path/db.sqlite3`` -> ``FRAMEPIPE_DATABASE_URL=sqlite:////path/db.sqlite3``
  (framepipe's tables are added beside the old ``jobs`` table, which is not touched);
- ``MINIO_ENDPOINT``, ``MINIO_PORT`` (9000), ``MINIO_USE_SSL``, ``MINIO_BUCKET``
  (``mangamotion``) -> ``FRAMEPIPE_OBJECTS_URL=s3://BUCKET?endpoint=http://HOST:PORT``;
  ``MINIO_ACCESS_KEY``/``MINIO_SECRET_KEY`` -> ``FRAMEPIPE_S3_ACCESS_KEY``/``_SECRET_KEY``;
- ``RABBITMQ_URL`` -> ``FRAMEPIPE_BROKER_URL`` (workers take their steps from RabbitMQ).

A framepipe setting given by its own name (environment or config file) wins over the team's
variable, which is then reported as not used. What is mapped is printed on stderr, with the
broker's password masked; the MinIO keys are never printed. ``worker`` and ``serve`` get
``--pipeline framepipe.pipelines.ml_video:ml_video`` unless a ``--pipeline`` is given.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from framepipe.config import load_settings
from framepipe.errors import ConfigError
from framepipe.pipelines.ml_settings import MlVideoSettings
from framepipe.redis import safe_url

__all__ = ["PIPELINE_REF", "Mapped", "cli_arguments", "main", "map_settings"]

PIPELINE_REF = "framepipe.pipelines.ml_video:ml_video"


@dataclass
class Mapped:
    """What :func:`map_settings` found: the variables to set and one line per decision."""

    environment: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def map_settings(env: Mapping[str, str] | None = None) -> Mapped:
    """The ``FRAMEPIPE_*`` variables the team's variables in ``env`` (default ``os.environ``)
    stand for, leaving out every framepipe setting already given by its own name. Raises
    :class:`ConfigError` naming a bad variable."""
    env = os.environ if env is None else env
    ml = MlVideoSettings.load(env)
    given = load_settings().model_fields_set if env is os.environ else _given(env)
    mapped = Mapped()
    choices = (
        ("database_url", "FRAMEPIPE_DATABASE_URL", "DATABASE_FILE", ml.database_url()),
        ("objects_url", "FRAMEPIPE_OBJECTS_URL", "MINIO_*", ml.objects_url()),
        ("broker_url", "FRAMEPIPE_BROKER_URL", "RABBITMQ_URL", ml.broker_url()),
    )
    for name, variable, theirs, value in choices:
        if value is None:
            continue
        if name in given:
            mapped.notes.append(f"{theirs} is not used: framepipe's {name} is set ({variable})")
            continue
        mapped.environment[variable] = value
        mapped.notes.append(f"{theirs} -> {variable}={safe_url(value)}")
    if "FRAMEPIPE_OBJECTS_URL" in mapped.environment:
        keys = (
            ("FRAMEPIPE_S3_ACCESS_KEY", "MINIO_ACCESS_KEY", ml.minio_access_key),
            (
                "FRAMEPIPE_S3_SECRET_KEY",
                "MINIO_SECRET_KEY",
                ml.minio_secret_key.get_secret_value() if ml.minio_secret_key else None,
            ),
        )
        for variable, theirs, value in keys:
            if value and not env.get(variable):
                mapped.environment[variable] = value
                mapped.notes.append(f"{theirs} -> {variable} (not shown)")
    return mapped


def _given(env: Mapping[str, str]) -> set[str]:
    """The storage and broker settings ``env`` gives by framepipe's own names."""
    names = {"database_url", "objects_url", "broker_url"}
    return {name for name in names if env.get(f"FRAMEPIPE_{name.upper()}", "").strip()}


def cli_arguments(argv: Sequence[str]) -> list[str]:
    """``framepipe``'s arguments for ours: ``worker`` when none (or only options) are given,
    and the ML pipeline loaded up front by ``worker`` and ``serve``."""
    args = list(argv)
    if not args or (args[0].startswith("-") and args[0] not in ("--help", "-h")):
        args = ["worker", *args]
    if args and args[0] in ("worker", "serve") and not {"--pipeline", "-p"} & set(args):
        args[1:1] = ["--pipeline", PIPELINE_REF]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Map the settings into this process's environment, then run ``framepipe``."""
    try:
        mapped = map_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    os.environ.update(mapped.environment)
    for note in mapped.notes:
        print(f"[ml_worker] {note}", file=sys.stderr)
    from framepipe.cli import app

    app(args=cli_arguments(sys.argv[1:] if argv is None else argv), prog_name="framepipe")


if __name__ == "__main__":
    main()
