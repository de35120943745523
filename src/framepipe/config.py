"""Settings, from ``FRAMEPIPE_*`` environment variables or a TOML config file.

Precedence, highest first: keyword arguments, environment variables, the config file
(``FRAMEPIPE_CONFIG`` or ``./framepipe.toml`` when present), defaults. With no settings at all
framepipe runs embedded: SQLite and local files under ``./.framepipe/``, in-process queues.

The settings are grouped by concern into sections, and :class:`Settings` is all of them:

- :class:`StorageSettings`: where state lives (home, state database, object store, events kept);
- :class:`JobSettings`: how job steps run (concurrency, retries, outputs, inputs, shutdown);
- :class:`WorkerSettings`: workers and the broker (broker URL and namespace, leases, sweep,
  prefetch, republishing);
- :class:`ServerSettings`: the HTTP service (token, hosts, origins, uploads, input roots,
  thumbnails);
- :class:`MediaSettings`: the media job steps (picture size and length limits);
- :class:`LogSettings`: logging.

Why sections combined by inheritance rather than nested models (``settings.jobs.concurrency``):
every field stays a top-level field of :class:`Settings`, so each ``FRAMEPIPE_<FIELD>``
variable, each config-file key, each keyword argument (``Settings(concurrency=3)``,
``model_copy(update=...)``) and each ``settings.<field>`` reader keeps working as it was, with
no aliases or forwarding properties to keep in step. A :class:`Settings` object *is* an instance
of every section, so a component states what it reads by its parameter's type (a function taking
``settings: ServerSettings`` accepts a :class:`Settings`, and mypy refuses it a job field), and
a section can be built or loaded on its own (``MediaSettings(media_max_pixels=0)``,
``load_section(ServerSettings)``) where nothing else is needed. The price is one flat namespace:
a field name is unique across the sections (checked by the tests), which the ``FRAMEPIPE_*``
names required anyway. The sections are listed in :data:`SECTIONS`; the README's configuration
tables follow the same groups.

Settings of one component that not every user runs (a ready pipeline's model, say) live next to
that component, in their own class (see :mod:`framepipe.pipelines.ml_settings`), not here. The
config file is shared: a section reads only its own keys, and :class:`Settings` refuses keys of
no section except those listed in :data:`COMPONENT_FILE_KEYS`.

Refused at load (:func:`load_settings`, :func:`load_section`), as a :class:`ConfigError` naming
the variable and never repeating a secret: a ``FRAMEPIPE_*`` variable that is neither a setting
nor one of :data:`OTHER_VARIABLES` (a misspelt name, with the closest one suggested); a
database URL that does not parse or names neither SQLite nor PostgreSQL; a broker URL of no
known scheme (checked at load only: built in code, a :class:`WorkerSettings` may carry any
URL, read as in-process); an object store URL of a scheme other than ``file`` and ``s3`` (only
the scheme is checked: nothing is contacted); a home that exists and is not a folder; an
infinite or NaN number; an input root that is not an absolute path.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from framepipe.amqp import AMQP_SCHEMES, is_amqp_url
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
    comma_list,
    default_home_when_blank,
    finished_statuses,
    url_beginning,
)
from framepipe.errors import ConfigError
from framepipe.redis import REDIS_SCHEMES, is_redis_url

__all__ = [
    "BROKER_SCHEMES",
    "COMPONENT_FILE_KEYS",
    "OTHER_VARIABLES",
    "SECTIONS",
    "JobSettings",
    "LogSettings",
    "MediaSettings",
    "ServerSettings",
    "Settings",
    "SettingsSection",
    "StorageSettings",
    "WorkerSettings",
    "check_environment",
    "config_file",
    "config_file_values",
    "load_section",
    "load_settings",
]

COMPONENT_FILE_KEYS: frozenset[str] = frozenset(
    {"model_api_retries", "model_api_retry_initial", "model_api_retry_max"}
)
"""Config-file keys that belong to a component's own settings, not to :class:`Settings`, which
accepts and ignores them: the ML video pipeline's model retries
(:class:`framepipe.pipelines.ml_settings.MlVideoSettings`)."""


OTHER_VARIABLES: dict[str, str] = {
    "FRAMEPIPE_CONFIG": "the config file (framepipe.config.config_file)",
    "FRAMEPIPE_S3_ACCESS_KEY": "S3 credentials (framepipe.backends.objects.s3)",
    "FRAMEPIPE_S3_SECRET_KEY": "S3 credentials (framepipe.backends.objects.s3)",
    "FRAMEPIPE_S3_SESSION_TOKEN": "S3 credentials (framepipe.backends.objects.s3)",
    "FRAMEPIPE_NAMESPACE": "the processor fleet's key prefix (framepipe.processors.fleet)",
    "FRAMEPIPE_ML_KEEP_INTERMEDIATES": "the ML video pipeline (framepipe.pipelines.ml_settings)",
    "FRAMEPIPE_MODEL_API_RETRIES": "the ML video pipeline (framepipe.pipelines.ml_settings)",
    "FRAMEPIPE_MODEL_API_RETRY_INITIAL": "the ML video pipeline (framepipe.pipelines.ml_settings)",
    "FRAMEPIPE_MODEL_API_RETRY_MAX": "the ML video pipeline (framepipe.pipelines.ml_settings)",
    "FRAMEPIPE_MODEL_SCRIPT_TIMEOUT": "the ML video pipeline (framepipe.pipelines.ml_settings)",
    "FRAMEPIPE_MODEL_BATCH_SIZE": "the ML video pipeline (framepipe.pipelines.ml_settings)",
    "FRAMEPIPE_TEST_POSTGRES_URL": "the test suite",
    "FRAMEPIPE_TEST_REDIS_URL": "the test suite",
    "FRAMEPIPE_TEST_AMQP_URL": "the test suite",
    "FRAMEPIPE_TEST_MQTT_URL": "the test suite",
    "FRAMEPIPE_UPDATE_SCREENSHOT": "the test suite (the README's pictures)",
    "FRAMEPIPE_BENCH_REDIS_URL": "the benchmarks",
    "FRAMEPIPE_BENCH_HOT_PATH": "the benchmarks",
}
"""The ``FRAMEPIPE_*`` variables that are not settings of :class:`Settings` but are read
elsewhere (the value says where), so :func:`check_environment` accepts them. The one list of
them: a name read anywhere in the tree is either a setting or here (checked by the tests)."""

BROKER_SCHEMES = ("memory://", *REDIS_SCHEMES, *AMQP_SCHEMES)
"""The schemes a broker URL may have: ``memory://`` (in-process), Redis, AMQP."""


def check_environment(env: Mapping[str, str] | None = None) -> None:
    """Refuse (:class:`ConfigError`) every ``FRAMEPIPE_*`` variable of ``env`` (default
    ``os.environ``) that is neither a setting of :class:`Settings` nor one of
    :data:`OTHER_VARIABLES`, naming it and the closest known name; values are not shown."""
    known = {f"FRAMEPIPE_{name.upper()}" for name in Settings.model_fields} | set(OTHER_VARIABLES)
    unknown = sorted(
        name
        for name in (os.environ if env is None else env)
        if name.upper().startswith("FRAMEPIPE_") and name.upper() not in known
    )
    if not unknown:
        return
    problems = []
    for name in unknown:
        close = difflib.get_close_matches(name.upper(), sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"{name}: no such setting{hint}")
    raise ConfigError(f"invalid framepipe settings: {'; '.join(problems)}")


def config_file(env: Mapping[str, str] | None = None) -> Path | None:
    """The config file: ``FRAMEPIPE_CONFIG`` in ``env`` (default ``os.environ``; it must
    exist), else ``./framepipe.toml`` when present, else None. Raises :class:`ConfigError` for
    a ``FRAMEPIPE_CONFIG`` that is not a file."""
    explicit = (os.environ if env is None else env).get("FRAMEPIPE_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"FRAMEPIPE_CONFIG={explicit}: no such file")
        return path
    default = Path("framepipe.toml")
    return default if default.is_file() else None


def config_file_values(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The top-level keys and values of :func:`config_file` (empty without a file). Raises
    :class:`ConfigError` naming the file when it is not valid TOML."""
    path = config_file(env)
    if path is None:
        return {}
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc


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


class Settings(
    StorageSettings, JobSettings, WorkerSettings, ServerSettings, MediaSettings, LogSettings
):
    """framepipe's settings: every section at once. Every field is read from
    ``FRAMEPIPE_<FIELD>`` and the config file's ``<field>`` key; an unknown keyword argument or
    config-file key (other than :data:`COMPONENT_FILE_KEYS`) is refused."""

    model_config = SettingsConfigDict(
        env_prefix="FRAMEPIPE_", extra="forbid", allow_inf_nan=False, hide_input_in_errors=True
    )

    @classmethod
    def _from_file(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Every key of the file but :data:`COMPONENT_FILE_KEYS`, so that a misspelt key is
        refused rather than ignored."""
        return {key: value for key, value in values.items() if key not in COMPONENT_FILE_KEYS}


SectionT = TypeVar("SectionT", bound=SettingsSection)

SECTIONS: dict[str, type[SettingsSection]] = {
    "storage": StorageSettings,
    "jobs": JobSettings,
    "workers": WorkerSettings,
    "server": ServerSettings,
    "media": MediaSettings,
    "logging": LogSettings,
}
"""The sections of :class:`Settings` by group name, in the order the docs list them. Every
field of :class:`Settings` is in exactly one."""


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; a bad value or an unknown ``FRAMEPIPE_*`` variable raises
    :class:`ConfigError` naming the variable."""
    return load_section(Settings, **overrides)


def load_section(section: type[SectionT], **overrides: Any) -> SectionT:
    """Read one section (or :class:`Settings`) alone; a bad value raises :class:`ConfigError`
    naming the variable, an unknown keyword, config-file key or ``FRAMEPIPE_*`` variable
    (:func:`check_environment`) naming it."""
    check_environment()
    try:
        loaded = section(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "_".join(str(part) for part in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"{name}: no such setting (a keyword argument or config-file key)")
            else:
                # a check's own message, without pydantic's "Value error, " before it
                cause = err.get("ctx", {}).get("error") if err["type"] == "value_error" else None
                problems.append(f"FRAMEPIPE_{name.upper()}: {cause or err['msg']}")
        raise ConfigError(f"invalid framepipe settings: {'; '.join(problems)}") from exc
    _check_broker_url(loaded)
    return loaded


def _check_broker_url(settings: SettingsSection) -> None:
    """Refuse, at load, a broker URL of none of :data:`BROKER_SCHEMES` (blank counts as
    ``memory://``). Not a validator of the field: a :class:`WorkerSettings` built in code may
    carry any URL, which :attr:`~WorkerSettings.distributed_jobs` reads as in-process and a
    worker refuses itself."""
    if not isinstance(settings, WorkerSettings):
        return
    url = settings.broker_url
    if url.strip() and not url.startswith(BROKER_SCHEMES):
        raise ConfigError(
            f"invalid framepipe settings: FRAMEPIPE_BROKER_URL: not a broker URL "
            f"({url_beginning(url)}): give memory:// (in-process), redis://, rediss:// or "
            "unix:// (Redis) or amqp:// or amqps:// (RabbitMQ)"
        )
