"""Settings, from ``FRAMEPIPE_*`` environment variables or a TOML config file.

Precedence, highest first: keyword arguments, environment variables, the config file
(``FRAMEPIPE_CONFIG`` or ``./framepipe.toml`` when present), defaults. With no settings at all
framepipe runs embedded: SQLite and local files under ``./.framepipe/``, in-process queues.

The settings are grouped by concern into sections (storage, jobs, workers, server, media,
logging: listed in :mod:`framepipe.config_sections`, their values checked by
:mod:`framepipe.config_checks`, the file read by :mod:`framepipe.config_file`), and
:class:`Settings` is all of them.

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
infinite or NaN number; an input root that is not an absolute path; bytes that are not UTF-8
where the value is sent as UTF-8 (the broker URL and namespace, the MQTT URL's host, user,
password and client id, the allowed hosts and origins).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from framepipe.amqp import AMQP_SCHEMES
from framepipe.config_checks import url_beginning
from framepipe.config_file import config_file, config_file_values
from framepipe.config_sections import (
    JobSettings,
    LogSettings,
    MediaSettings,
    ServerSettings,
    SettingsSection,
    StorageSettings,
    WorkerSettings,
)
from framepipe.errors import ConfigError
from framepipe.redis import REDIS_SCHEMES
from framepipe.urls import check_sent_url

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
    ``memory://``) or one that is not UTF-8 (but a ``unix:`` socket's path). Not a validator
    of the field: a :class:`WorkerSettings` built in code may carry any URL, which
    :attr:`~WorkerSettings.distributed_jobs` reads as in-process and a worker refuses itself."""
    if not isinstance(settings, WorkerSettings):
        return
    url = settings.broker_url
    if url.strip() and not url.startswith(BROKER_SCHEMES):
        raise ConfigError(
            f"invalid framepipe settings: FRAMEPIPE_BROKER_URL: not a broker URL "
            f"({url_beginning(url)}): give memory:// (in-process), redis://, rediss:// or "
            "unix:// (Redis) or amqp:// or amqps:// (RabbitMQ)"
        )
    if url.strip() and not url.startswith("memory:"):
        try:
            check_sent_url(url, "broker URL")
        except ConfigError as exc:
            raise ConfigError(f"invalid framepipe settings: FRAMEPIPE_BROKER_URL: {exc}") from None
