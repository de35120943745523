"""The sections of framepipe's settings, one class per concern (:mod:`framepipe.config` combines
them into :class:`~framepipe.config.Settings` and says why by inheritance; the README's
configuration tables follow the same groups):

- :class:`StorageSettings`: where state lives (home, state database, object store, events kept);
- :class:`JobSettings`: how job steps run (concurrency, retries, outputs, inputs, shutdown);
- :class:`WorkerSettings`: workers and the broker (broker URL and namespace, leases, sweep,
  prefetch, republishing);
- :class:`ServerSettings`: the HTTP service (token, hosts, origins, uploads, input roots,
  thumbnails);
- :class:`MediaSettings`: the media job steps (picture size and length limits);
- :class:`LogSettings`: logging.

Guarantees: each field is read from a keyword argument, else ``FRAMEPIPE_<FIELD>``, else the
config file's ``<field>`` key (:mod:`framepipe.config_file`), else its default; an unknown
keyword is refused, and so is an infinite or NaN number. Each value is checked as it is read
(bounds here, the rest by :mod:`framepipe.config_checks`), and a refused value is never
repeated in the error (pydantic's input is hidden).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from framepipe.amqp import is_amqp_url
from framepipe.config_checks import (
    DEFAULT_HOME,
    FINISHED_STATUSES,
    check_allowed_origins,
    check_api_token,
    check_database_url,
    check_home,
    check_input_roots,
    check_log_level,
    check_mqtt_url,
    check_objects_url,
    check_prune_objects,
    check_utf8,
    comma_list,
    default_home_when_blank,
    finished_statuses,
)
from framepipe.config_file import config_file_values
from framepipe.redis import is_redis_url

__all__ = [
    "JobSettings",
    "LogSettings",
    "MediaSettings",
    "ServerSettings",
    "SettingsSection",
    "StorageSettings",
    "WorkerSettings",
]


class SettingsSection(BaseSettings):
    """Base of the sections: each field from a keyword argument, else ``FRAMEPIPE_<FIELD>``,
    else the config file's ``<field>`` key, else its default. An unknown keyword is refused; a
    section loaded alone reads only its own keys of the file (the rest belong to others)."""

    model_config = SettingsConfigDict(
        env_prefix="FRAMEPIPE_", extra="forbid", allow_inf_nan=False, hide_input_in_errors=True
    )

    @classmethod
    def _from_file(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The config file's values this class reads."""
        return {key: value for key, value in values.items() if key in cls.model_fields}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            InitSettingsSource(settings_cls, cls._from_file(config_file_values())),
        )


class StorageSettings(SettingsSection):
    """Where framepipe keeps its state: the home folder, the state database, the object store,
    how long live apps' events are kept and the MQTT broker they are also published on."""

    home: Path = Field(DEFAULT_HOME, description="Folder for embedded state and objects.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the state database; default SQLite under home."
    )
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = Field(
        "FULL", description="SQLite PRAGMA synchronous; FULL makes every commit durable."
    )
    objects_url: str | None = Field(
        None,
        description="Object store URL: file:///path, or s3://bucket/prefix?endpoint=URL"
        "&region=R (credentials from FRAMEPIPE_S3_ACCESS_KEY/_SECRET_KEY or "
        "the AWS chain); default home/objects.",
    )
    events_retention_days: float | None = Field(
        None,
        gt=0,
        description="Live apps' events older than this many days are deleted "
        "(hourly, by the apps' event sinks); unset keeps them.",
    )
    executions_retention_days: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Executions that finished more than this many days ago are deleted with "
        "their steps and events (hourly, by framepipe serve; framepipe jobs prune does it by "
        "hand); unset keeps them. The import ledger stays.",
    )
    executions_retention_statuses: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(FINISHED_STATUSES),
        description="Which finished executions the hourly prune deletes, comma-separated: "
        "completed, failed, cancelled, interrupted (default all four; e.g. 'failed,cancelled' "
        "keeps completed results).",
    )
    executions_retention_objects: str | None = Field(
        None,
        description="With executions_retention_days: the prefix of each pruned execution's "
        "objects, deleted after its records, e.g. 'ml/{execution_id}/' (may hold "
        "{pipeline}); unset leaves objects alone.",
    )
    mqtt_url: str | None = Field(
        None,
        description="mqtt://user:pass@host:1883/prefix (or mqtts://): every live app also "
        "publishes its events, segment counts, health and availability there "
        "(framepipe.mqtt; pip install 'framepipe[mqtt]'); unset: no MQTT.",
    )

    _blank_home = field_validator("home", mode="before")(default_home_when_blank)
    _home = field_validator("home")(check_home)
    _database_url = field_validator("database_url")(check_database_url)
    _objects_url = field_validator("objects_url")(check_objects_url)
    _prune_objects = field_validator("executions_retention_objects")(check_prune_objects)
    _prune_statuses = field_validator("executions_retention_statuses", mode="before")(
        finished_statuses
    )
    _mqtt_url = field_validator("mqtt_url")(check_mqtt_url)

    @property
    def resolved_database_url(self) -> str:
        """The state database URL, defaulting to ``sqlite:///<home>/state.db``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'state.db').resolve()}"

    @property
    def resolved_objects_url(self) -> str:
        """The object store URL, defaulting to ``file://<home>/objects``."""
        if self.objects_url:
            return self.objects_url
        return (self.home / "objects").resolve().as_uri()

    @property
    def run_dir(self) -> Path:
        """Folder for this machine's per-process run files (step journals)."""
        return self.home / "run"


class JobSettings(SettingsSection):
    """How job steps run, wherever they run: concurrency, retries, the size of inputs and
    outputs, crashes, heartbeats and the grace given on shutdown."""

    concurrency: int = Field(
        default_factory=lambda: max(4, os.cpu_count() or 1),
        ge=1,
        description="Steps run at once by one engine.",
    )
    retry_initial_delay: float = Field(1.0, ge=0, description="First retry delay in seconds.")
    retry_max_delay: float = Field(60.0, ge=0, description="Cap of the retry delay.")
    heartbeat_interval: float = Field(
        2.0, gt=0, description="How often a running engine marks its executions alive."
    )
    shutdown_grace: float = Field(
        10.0, ge=0, description="Seconds running steps get to finish on Ctrl-C / SIGTERM."
    )
    max_step_output_bytes: int = Field(
        1_048_576, gt=0, description="Largest JSON a step may return (store paths, not data)."
    )
    max_step_crashes: int = Field(
        3,
        ge=1,
        description="A step that lost this many attempts (its worker died, or its lease "
        "lapsed while the worker lived) is failed as crashed.",
    )
    max_inputs_bytes: int = Field(
        1_048_576,
        gt=0,
        description="Largest inputs of one execution, as JSON (store paths "
        "or object keys, not contents); also caps JSON request "
        "bodies of the HTTP service.",
    )


class WorkerSettings(SettingsSection):
    """Workers and the broker that delivers steps to them: where steps run, the broker's URL
    and namespace, leases, the sweep, prefetching and republishing."""

    broker_url: str = Field(
        "memory://",
        description="Broker URL: memory:// is in-process; redis://... (Redis "
        "Streams) or amqp://... (RabbitMQ) delivers steps to workers.",
    )
    jobs_mode: Literal["auto", "local", "workers"] = Field(
        "auto",
        description="Where job steps run: 'local' in the submitting process, 'workers' "
        "on 'framepipe worker' processes through the broker; 'auto' picks "
        "workers when broker_url is a Redis or an AMQP URL.",
    )
    broker_namespace: str = Field(
        "framepipe",
        description="Prefix of the broker's Redis keys and RabbitMQ queue "
        "(several deployments may share one broker).",
    )
    lease_seconds: float = Field(
        6.0,
        gt=0,
        description="A worker's hold on a running step, renewed while it runs; a "
        "killed worker's steps are taken over once it expires.",
    )
    sweep_interval: float = Field(
        1.0,
        gt=0,
        description="How often each worker looks for expired leases, due retries "
        "and ready steps the broker lost.",
    )
    worker_prefetch: int = Field(
        4,
        ge=1,
        description="While its recent steps are short (under 50 ms), a worker claims "
        "up to concurrency x this many, so tiny steps are claimed and "
        "committed in batches; long steps are never hoarded.",
    )
    republish_after: float = Field(
        10.0,
        gt=0,
        description="A ready step not taken this many seconds after it was "
        "published is published again.",
    )

    _namespace = field_validator("broker_namespace")(check_utf8)

    @property
    def distributed_jobs(self) -> bool:
        """True when job steps run on workers: ``jobs_mode='workers'``, or ``auto`` with a
        Redis (``redis://``, ``rediss://``, ``unix://``) or AMQP (``amqp://``, ``amqps://``)
        broker URL."""
        if self.jobs_mode == "auto":
            return is_redis_url(self.broker_url) or is_amqp_url(self.broker_url)
        return self.jobs_mode == "workers"


class ServerSettings(SettingsSection):
    """The HTTP service: its bearer token, the hosts and web origins it answers, the largest
    upload, the folders executions submitted over HTTP may name, and the bounds on the
    thumbnails it makes of stored frames."""

    api_token: str | None = Field(
        None,
        description="Bearer token the HTTP service requires on every call but /health; "
        "without one it only binds to a loopback address.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names (with an optional :port) the HTTP service answers besides "
        "its bound address and localhost; comma-separated. '*' answers any "
        "(only sensible behind a proxy that checks Host).",
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Web origins (scheme://host[:port]) whose pages may use the service "
        "besides its own; comma-separated.",
    )
    max_upload_bytes: int = Field(
        512 * 1024 * 1024, gt=0, description="Largest upload the HTTP service accepts."
    )
    input_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders whose files executions submitted over HTTP may name as local "
        "paths; absolute, comma-separated (a relative one is refused). Empty (the "
        "default): none, only object keys.",
    )
    thumbnail_concurrency: int = Field(
        2,
        ge=1,
        description="Thumbnails of stored frames the HTTP service decodes at once (each "
        "may hold up to thumbnail_max_pixels x 3 bytes); a request past them "
        "waits up to 5 s for its turn, then is answered 503 with Retry-After.",
    )
    thumbnail_max_pixels: int = Field(
        40_000_000,
        gt=0,
        description="Largest decode (width x height, read from the image's header; a "
        "baseline JPEG counts at the reduced size it is decoded at) the HTTP "
        "service makes a thumbnail of; a larger image is refused (422) "
        "undecoded. 40 million pixels decode to 120 MB.",
    )

    _comma_list = field_validator("allowed_hosts", "allowed_origins", "input_roots", mode="before")(
        comma_list
    )
    _utf8 = field_validator("allowed_hosts", "allowed_origins")(check_utf8)
    _input_roots = field_validator("input_roots")(check_input_roots)
    _origins = field_validator("allowed_origins")(check_allowed_origins)
    _token = field_validator("api_token")(check_api_token)


class MediaSettings(SettingsSection):
    """The media job steps (:mod:`framepipe.media.steps` and the ready pipelines that decode
    video). The toolkit's functions themselves read no settings: they take ``max_pixels``,
    ``max_duration`` and ``max_frame_count``."""

    media_max_pixels: int = Field(
        8192 * 8192,
        ge=0,
        description="Largest picture (width x height) the media job steps "
        "decode or write, checked from the file's headers "
        "before any frame is decoded; 0 means no limit. The "
        "media toolkit's functions take max_pixels instead "
        "(default DEFAULT_MAX_PIXELS).",
    )
    media_max_duration: float = Field(
        6 * 3600,
        ge=0,
        description="Longest media (seconds of video or sound) the media job steps decode "
        "or write: a file whose header announces more is refused before any frame is "
        "decoded, and one whose header tells less (a raw .h264 stream tells nothing) is "
        "stopped at the frame that passes it, leaving no output; 0 means no limit. The "
        "media toolkit's functions take max_duration instead (default "
        "DEFAULT_MAX_DURATION, 6 hours).",
    )
    media_max_frame_count: int = Field(
        60 * 6 * 3600,
        ge=0,
        description="Most video frames the media job steps decode or write (extract_frames "
        "writes an image per frame), held to as media_max_duration is: a file's "
        "timestamps can pack hours of frames into a second; 0 means no limit. The "
        "media toolkit's functions take max_frame_count instead (default "
        "DEFAULT_MAX_FRAME_COUNT, six hours at 60 fps).",
    )


class LogSettings(SettingsSection):
    """Logging."""

    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL.")

    _level = field_validator("log_level")(check_log_level)
