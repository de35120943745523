"""Settings, from ``FRAMEPIPE_*`` environment variables or a TOML config file.

Precedence, highest first: keyword arguments, environment variables, the config file
(``FRAMEPIPE_CONFIG`` or ``./framepipe.toml`` when present), defaults. With no settings at all
framepipe runs embedded: SQLite and local files under ``./.framepipe/``, in-process queues.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from framepipe.amqp import is_amqp_url
from framepipe.errors import ConfigError
from framepipe.redis import is_redis_url

__all__ = ["Settings", "load_settings"]


def _config_file() -> Path | None:
    explicit = os.environ.get("FRAMEPIPE_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"FRAMEPIPE_CONFIG={explicit}: no such file")
        return path
    default = Path("framepipe.toml")
    return default if default.is_file() else None


class Settings(BaseSettings):
    """framepipe's settings. Every field is read from ``FRAMEPIPE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="FRAMEPIPE_", extra="forbid")

    home: Path = Field(Path(".framepipe"), description="Folder for embedded state and objects.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the state database; default SQLite under home.")
    objects_url: str | None = Field(
        None, description="Object store URL: file:///path, or s3://bucket/prefix?endpoint=URL"
                          "&region=R (credentials from FRAMEPIPE_S3_ACCESS_KEY/_SECRET_KEY or "
                          "the AWS chain); default home/objects.")
    broker_url: str = Field(
        "memory://", description="Broker URL: memory:// is in-process; redis://... (Redis "
                                 "Streams) or amqp://... (RabbitMQ) delivers steps to workers.")
    concurrency: int = Field(
        default_factory=lambda: max(4, os.cpu_count() or 1), ge=1,
        description="Steps run at once by one engine.")
    log_level: str = "INFO"
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = Field(
        "FULL", description="SQLite PRAGMA synchronous; FULL makes every commit durable.")
    retry_initial_delay: float = Field(1.0, ge=0, description="First retry delay in seconds.")
    retry_max_delay: float = Field(60.0, ge=0, description="Cap of the retry delay.")
    model_api_retries: int | None = Field(
        None, ge=0, description="Retries of a failed model call by an adapter built from the "
                                "settings (HttpModel default 3, SubprocessModel default 0); "
                                "also MODEL_API_RETRIES.")
    model_api_retry_initial: float | None = Field(
        None, ge=0, description="First delay before a model call is retried, in seconds "
                                "(default 1), doubling each retry; also MODEL_API_RETRY_INITIAL.")
    model_api_retry_max: float | None = Field(
        None, ge=0, description="Cap of that delay, in seconds (default 30); also "
                                "MODEL_API_RETRY_MAX.")
    heartbeat_interval: float = Field(
        2.0, gt=0, description="How often a running engine marks its executions alive.")
    shutdown_grace: float = Field(
        10.0, ge=0, description="Seconds running steps get to finish on Ctrl-C / SIGTERM.")
    max_step_output_bytes: int = Field(
        1_048_576, gt=0, description="Largest JSON a step may return (store paths, not data).")
    max_step_crashes: int = Field(
        3, ge=1, description="A step whose process died this many times is failed as crashed.")
    jobs_mode: Literal["auto", "local", "workers"] = Field(
        "auto", description="Where job steps run: 'local' in the submitting process, 'workers' "
                            "on 'framepipe worker' processes through the broker; 'auto' picks "
                            "workers when broker_url is a Redis or an AMQP URL.")
    broker_namespace: str = Field(
        "framepipe", description="Prefix of the broker's Redis keys and RabbitMQ queue "
                                 "(several deployments may share one broker).")
    lease_seconds: float = Field(
        6.0, gt=0, description="A worker's hold on a running step, renewed while it runs; a "
                               "killed worker's steps are taken over once it expires.")
    sweep_interval: float = Field(
        1.0, gt=0, description="How often each worker looks for expired leases, due retries "
                               "and ready steps the broker lost.")
    worker_prefetch: int = Field(
        4, ge=1, description="While its recent steps are short (under 50 ms), a worker claims "
                             "up to concurrency x this many, so tiny steps are claimed and "
                             "committed in batches; long steps are never hoarded.")
    media_max_pixels: int = Field(
        8192 * 8192, ge=0, description="Largest picture (width x height) framepipe.media will "
                                       "decode or write, checked from the file's headers "
                                       "before any frame is decoded; 0 means no limit.")
    api_token: str | None = Field(
        None, description="Bearer token the HTTP service requires on every call but /health; "
                          "without one it only binds to a loopback address.")
    max_upload_bytes: int = Field(
        512 * 1024 * 1024, gt=0, description="Largest upload the HTTP service accepts.")
    max_inputs_bytes: int = Field(
        1_048_576, gt=0, description="Largest inputs of one execution, as JSON (store paths "
                                     "or object keys, not contents); also caps JSON request "
                                     "bodies of the HTTP service.")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names (with an optional :port) the HTTP service answers besides "
                    "its bound address and localhost; comma-separated. '*' answers any "
                    "(only sensible behind a proxy that checks Host).")
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Web origins (scheme://host[:port]) whose pages may use the service "
                    "besides its own; comma-separated.")
    input_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders whose files executions submitted over HTTP may name as local "
                    "paths; comma-separated. Empty (the default): none, only object keys.")
    events_retention_days: float | None = Field(
        None, gt=0, description="Live apps' events older than this many days are deleted "
                                "(hourly, by the apps' event sinks); unset keeps them.")
    republish_after: float = Field(
        10.0, gt=0, description="A ready step not taken this many seconds after it was "
                                "published is published again.")

    @field_validator("allowed_hosts", "allowed_origins", "input_roots", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("api_token")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.strip() or value != value.strip():
            raise ValueError("the token is blank or has spaces around it")
        if not value.isascii() or not value.isprintable():
            raise ValueError("the token must be printable ASCII (it travels in an HTTP header)")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {value!r}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @property
    def resolved_database_url(self) -> str:
        """The state database URL, defaulting to ``sqlite:///<home>/state.db``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'state.db').resolve()}"

    @property
    def distributed_jobs(self) -> bool:
        """True when job steps run on workers: ``jobs_mode='workers'``, or ``auto`` with a
        Redis (``redis://``, ``rediss://``, ``unix://``) or AMQP (``amqp://``, ``amqps://``)
        broker URL."""
        if self.jobs_mode == "auto":
            return is_redis_url(self.broker_url) or is_amqp_url(self.broker_url)
        return self.jobs_mode == "workers"

    @property
    def run_dir(self) -> Path:
        """Folder for this machine's per-process run files (step journals)."""
        return self.home / "run"

    @property
    def resolved_objects_url(self) -> str:
        """The object store URL, defaulting to ``file://<home>/objects``."""
        if self.objects_url:
            return self.objects_url
        return (self.home / "objects").resolve().as_uri()


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; a bad value raises :class:`ConfigError` naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"FRAMEPIPE_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid framepipe settings: {problems}") from exc
