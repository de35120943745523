"""The ML video pipeline's settings: which model its inference step calls, and how.

These settings belong to :mod:`framepipe.pipelines.ml_video`, not to framepipe's
:class:`~framepipe.config.Settings`: a user who never runs that pipeline has none of them. They
keep the variable names the model adapters have always been configured by:

- ``MODEL_ADAPTER_TYPE`` (``adapter_type``): ``mock`` (default), ``python`` (a model script)
  or ``http`` (a model server);
- ``PYTHON_SCRIPT`` (``python_script``, required for python) and ``PYTHON_PATH``
  (``python_path``, default: this interpreter); ``FRAMEPIPE_MODEL_SCRIPT_TIMEOUT`` or
  ``MODEL_SCRIPT_TIMEOUT`` (``model_script_timeout``, seconds one run of the script may take,
  default 3600; 0: no limit), past which its process group is killed;
- ``MODEL_API_URL`` (``model_api_url``, default ``http://localhost:5000``) and
  ``MODEL_API_TIMEOUT`` (``model_api_timeout``, per call, in milliseconds, default 300000);
- the retries of a failed call (a crash, an HTTP 5xx, a timeout) by the python and http
  adapters: how many, ``FRAMEPIPE_MODEL_API_RETRIES`` or ``MODEL_API_RETRIES``
  (``model_api_retries``, default 0 for python, 3 for http); the first delay,
  ``FRAMEPIPE_MODEL_API_RETRY_INITIAL`` or ``MODEL_API_RETRY_INITIAL`` (seconds, default 1),
  doubling each retry up to ``FRAMEPIPE_MODEL_API_RETRY_MAX`` or ``MODEL_API_RETRY_MAX``
  (seconds, default 30);
- ``FRAMEPIPE_MODEL_BATCH_SIZE`` or ``MODEL_BATCH_SIZE`` (``model_batch_size``, unset by
  default): how many frames the model holds and transforms at once, passed to it as the
  ``batch_size`` option (``--batch-size N`` to a script, a ``batch_size`` form field to a
  server). It is read when the inference step runs, so a job that ran out of memory is retried
  with a smaller one by setting it lower and ``framepipe jobs retry``.

The original worker's storage and broker variables are read here too, and mapped onto
framepipe's settings by the ML worker's entry point (:mod:`framepipe.pipelines.ml_worker`):
``DATABASE_FILE`` (the SQLite state database), ``MINIO_ENDPOINT``, ``MINIO_PORT``,
``MINIO_USE_SSL``, ``MINIO_BUCKET`` (the object store, ``s3://BUCKET?endpoint=...``),
``MINIO_ACCESS_KEY``/``MINIO_SECRET_KEY`` (its credentials, never put in a URL) and
``RABBITMQ_URL`` (the broker). ``FRAMEPIPE_ML_KEEP_INTERMEDIATES`` or
``ML_KEEP_INTERMEDIATES`` (``keep_intermediates``, default false) keeps an execution's
intermediate objects after it completed.

Precedence, highest first: keyword arguments, the environment (the ``FRAMEPIPE_`` name before
the short one), the config file (``FRAMEPIPE_CONFIG`` or ``./framepipe.toml``; only the keys
``model_api_retries``, ``model_api_retry_initial`` and ``model_api_retry_max``, which
:class:`~framepipe.config.Settings` leaves to this class), defaults. A blank variable counts as
unset. A bad value is a :class:`~framepipe.errors.ConfigError` naming the variable (or key) and
the value; a missing or wrong model (no ``PYTHON_SCRIPT``, a URL that is not HTTP) is one when
:meth:`MlVideoSettings.adapter` builds it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from framepipe.config_file import config_file, config_file_values
from framepipe.errors import ConfigError
from framepipe.processors.adapters import HttpModel, MockModel, ModelAdapter, SubprocessModel

__all__ = ["ADAPTER_TYPES", "DEFAULT_BUCKET", "MINIO_VARIABLES", "MlVideoSettings"]

ADAPTER_TYPES = ("mock", "python", "http")

# Each field's environment variables, the first one set wins.
_VARIABLES: dict[str, tuple[str, ...]] = {
    "adapter_type": ("MODEL_ADAPTER_TYPE",),
    "python_script": ("PYTHON_SCRIPT",),
    "python_path": ("PYTHON_PATH",),
    "model_api_url": ("MODEL_API_URL",),
    "model_api_timeout": ("MODEL_API_TIMEOUT",),
    "model_script_timeout": ("FRAMEPIPE_MODEL_SCRIPT_TIMEOUT", "MODEL_SCRIPT_TIMEOUT"),
    "model_api_retries": ("FRAMEPIPE_MODEL_API_RETRIES", "MODEL_API_RETRIES"),
    "model_api_retry_initial": ("FRAMEPIPE_MODEL_API_RETRY_INITIAL", "MODEL_API_RETRY_INITIAL"),
    "model_api_retry_max": ("FRAMEPIPE_MODEL_API_RETRY_MAX", "MODEL_API_RETRY_MAX"),
    "model_batch_size": ("FRAMEPIPE_MODEL_BATCH_SIZE", "MODEL_BATCH_SIZE"),
    "keep_intermediates": ("FRAMEPIPE_ML_KEEP_INTERMEDIATES", "ML_KEEP_INTERMEDIATES"),
    "database_file": ("DATABASE_FILE",),
    "minio_endpoint": ("MINIO_ENDPOINT",),
    "minio_port": ("MINIO_PORT",),
    "minio_use_ssl": ("MINIO_USE_SSL",),
    "minio_access_key": ("MINIO_ACCESS_KEY",),
    "minio_secret_key": ("MINIO_SECRET_KEY",),
    "minio_bucket": ("MINIO_BUCKET",),
    "rabbitmq_url": ("RABBITMQ_URL",),
}

MINIO_VARIABLES = (
    "MINIO_ENDPOINT",
    "MINIO_PORT",
    "MINIO_USE_SSL",
    "MINIO_ACCESS_KEY",
    "MINIO_SECRET_KEY",
    "MINIO_BUCKET",
)
"""The original worker's MinIO variables; any of them set means "the files are in MinIO"."""

DEFAULT_BUCKET = "mangamotion"
"""The bucket the original worker used when ``MINIO_BUCKET`` was not set."""

_EXPECTED = {
    "model_api_timeout": "a positive number of milliseconds",
    "model_script_timeout": "a number of seconds >= 0 (0: no limit)",
    "model_api_retries": "a whole number >= 0",
    "model_api_retry_initial": "a number of seconds >= 0",
    "model_api_retry_max": "a number of seconds >= 0",
    "minio_port": "a port number (1-65535)",
    "minio_use_ssl": "true or false",
    "keep_intermediates": "true or false",
    "model_batch_size": "a whole number >= 1",
}

Origins = dict[str, tuple[str, Any]]
"""Where each field's value came from: field -> (the variable or key, the value as given)."""


def _from_environment(env: Mapping[str, str]) -> tuple[dict[str, str], Origins]:
    values: dict[str, str] = {}
    origins: Origins = {}
    for field, variables in _VARIABLES.items():
        for variable in variables:
            raw = env.get(variable, "").strip()
            if raw:
                values[field] = raw
                origins[field] = (variable, raw)
                break
    return values, origins


def _from_config_file(env: Mapping[str, str]) -> tuple[dict[str, Any], Origins]:
    values = {
        key: value
        for key, value in config_file_values(env).items()
        if key in MlVideoSettings.file_keys
    }
    path = config_file(env)
    return values, {key: (f"{key} in {path}", value) for key, value in values.items()}


class MlVideoSettings(BaseSettings):
    """The ML video pipeline's model settings (the variables are listed above). Build them with
    :meth:`load`, which names a bad variable in a :class:`ConfigError`; ``MlVideoSettings()``
    reads the same sources but raises pydantic's ``ValidationError``."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    file_keys: ClassVar[frozenset[str]] = frozenset(
        {"model_api_retries", "model_api_retry_initial", "model_api_retry_max"}
    )
    """The fields also read from the config file."""

    adapter_type: Literal["mock", "python", "http"] = Field(
        "mock", description="Which adapter: mock, python (a model script) or http."
    )
    python_script: str | None = Field(None, description="The model script (python).")
    python_path: str | None = Field(
        None, description="The script's interpreter (python); default: this interpreter."
    )
    model_api_url: str = Field("http://localhost:5000", description="The model server (http).")
    model_api_timeout: float = Field(
        300_000.0,
        gt=0,
        description="Time a call to the model server may take, in milliseconds (http).",
    )
    model_script_timeout: float = Field(
        3600.0,
        ge=0,
        allow_inf_nan=False,
        description="Time one run of the model script may take, in seconds (python); past it "
        "the script's process group is killed and the run fails as a timeout (retried like a "
        "crash). 0: no limit.",
    )
    model_api_retries: int | None = Field(
        None, ge=0, description="Retries of a failed model call; default 3 for http, 0 for python."
    )
    model_api_retry_initial: float | None = Field(
        None,
        ge=0,
        description="First delay before a model call is retried, in seconds "
        "(default 1), doubling each retry.",
    )
    model_api_retry_max: float | None = Field(
        None, ge=0, description="Cap of that delay, in seconds (default 30)."
    )
    model_batch_size: int | None = Field(
        None,
        ge=1,
        description="Frames the model holds and transforms at once (its batch_size option); "
        "unset: the model's own default.",
    )

    keep_intermediates: bool = Field(
        False,
        description="Keep an execution's intermediate objects (input copy, preprocessed "
        "video, frames) once it completed; by default finalize deletes them.",
    )
    database_file: str | None = Field(
        None, description="DATABASE_FILE: the SQLite file the state goes to (the worker's entry)."
    )
    minio_endpoint: str | None = Field(
        None, description="MINIO_ENDPOINT: the MinIO host (or http(s)://host:port)."
    )
    minio_port: int | None = Field(None, ge=1, le=65535, description="MINIO_PORT (default 9000).")
    minio_use_ssl: bool = Field(False, description="MINIO_USE_SSL: https to MinIO.")
    minio_access_key: str | None = Field(None, description="MINIO_ACCESS_KEY.")
    minio_secret_key: SecretStr | None = Field(None, description="MINIO_SECRET_KEY.")
    minio_bucket: str | None = Field(None, description="MINIO_BUCKET (default mangamotion).")
    rabbitmq_url: SecretStr | None = Field(
        None, description="RABBITMQ_URL: the broker of the ML worker's entry point."
    )

    @field_validator("adapter_type", mode="before")
    @classmethod
    def _kind(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

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
            InitSettingsSource(settings_cls, _from_environment(os.environ)[0]),
            InitSettingsSource(settings_cls, _from_config_file(os.environ)[0]),
        )

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> MlVideoSettings:
        """The settings from ``overrides``, then ``env`` (default ``os.environ``; a mapping
        given stands for the whole environment), then the config file it names. Raises
        :class:`ConfigError` naming the variable (or config-file key, or keyword) and the value
        for a bad one."""
        env = os.environ if env is None else env
        file_values, file_origins = _from_config_file(env)
        env_values, env_origins = _from_environment(env)
        origins: Origins = {
            **file_origins,
            **env_origins,
            **{key: (key, value) for key, value in overrides.items()},
        }
        try:
            return cls.model_validate({**file_values, **env_values, **overrides})
        except ValidationError as exc:
            problems = "; ".join(_problem(err, origins) for err in exc.errors())
            raise ConfigError(f"invalid ML video settings: {problems}") from exc

    @property
    def uses_minio(self) -> bool:
        """True when any of the original worker's MinIO variables is set."""
        return any(
            value is not None
            for value in (
                self.minio_endpoint,
                self.minio_port,
                self.minio_access_key,
                self.minio_secret_key,
                self.minio_bucket,
            )
        )

    def minio_endpoint_url(self) -> str:
        """The MinIO endpoint as a URL: ``MINIO_ENDPOINT`` as given when it is one, else
        ``http(s)://MINIO_ENDPOINT:MINIO_PORT`` (defaults ``127.0.0.1`` and 9000, as the
        original worker's)."""
        endpoint = (self.minio_endpoint or "127.0.0.1").rstrip("/")
        if "://" in endpoint:
            if self.minio_port is not None:
                raise ConfigError(
                    f"MINIO_ENDPOINT={endpoint} is a URL and MINIO_PORT={self.minio_port} is "
                    "set too: give the port in one of them"
                )
            return endpoint
        scheme = "https" if self.minio_use_ssl else "http"
        return f"{scheme}://{endpoint}:{self.minio_port or 9000}"

    def objects_url(self) -> str | None:
        """framepipe's ``FRAMEPIPE_OBJECTS_URL`` for the MinIO variables (no credentials in it:
        they go to ``FRAMEPIPE_S3_ACCESS_KEY``/``FRAMEPIPE_S3_SECRET_KEY``), or None when no
        MinIO variable is set."""
        if not self.uses_minio:
            return None
        bucket = self.minio_bucket or DEFAULT_BUCKET
        return f"s3://{bucket}?endpoint={self.minio_endpoint_url()}"

    def database_url(self) -> str | None:
        """framepipe's ``FRAMEPIPE_DATABASE_URL`` for ``DATABASE_FILE`` (a SQLite file, made
        absolute), or None."""
        if not self.database_file:
            return None
        return f"sqlite:///{Path(self.database_file).expanduser().resolve()}"

    def broker_url(self) -> str | None:
        """framepipe's ``FRAMEPIPE_BROKER_URL`` for ``RABBITMQ_URL``, or None."""
        return self.rabbitmq_url.get_secret_value() if self.rabbitmq_url else None

    def _retries(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.model_api_retries is not None:
            options["max_retries"] = self.model_api_retries
        if self.model_api_retry_initial is not None:
            options["retry_initial"] = self.model_api_retry_initial
        if self.model_api_retry_max is not None:
            options["retry_max"] = self.model_api_retry_max
        return options

    def infer_options(self) -> dict[str, Any]:
        """The options every inference call passes to the model: ``batch_size`` when
        :attr:`model_batch_size` is set, nothing else."""
        if self.model_batch_size is None:
            return {}
        return {"batch_size": self.model_batch_size}

    def adapter(self) -> ModelAdapter:
        """A new adapter of :attr:`adapter_type`: :class:`MockModel`, :class:`SubprocessModel`
        (``python_script`` run by ``python_path``, within ``model_script_timeout``) or
        :class:`HttpModel` (``model_api_url``, ``model_api_timeout``), with the retries set
        here (unset ones keep the adapter's defaults). Raises :class:`ConfigError` naming the
        variable for a missing script, a script that is not a file, or a URL that is not
        HTTP."""
        if self.adapter_type == "mock":
            return MockModel()
        if self.adapter_type == "python":
            if not self.python_script:
                raise ConfigError(
                    "MODEL_ADAPTER_TYPE=python needs PYTHON_SCRIPT (the model script's path)"
                )
            if not Path(self.python_script).is_file():
                raise ConfigError(f"PYTHON_SCRIPT={self.python_script}: no such file")
            return SubprocessModel(
                self.python_script,
                python=self.python_path or sys.executable,
                timeout=self.model_script_timeout or None,
                **self._retries(),
            )
        try:
            return HttpModel(
                self.model_api_url, timeout=self.model_api_timeout / 1000.0, **self._retries()
            )
        except ConfigError as exc:
            raise ConfigError(f"MODEL_API_URL: {exc}") from exc


def _problem(err: ErrorDetails, origins: Origins) -> str:
    field = str(err["loc"][0]) if err["loc"] else ""
    where, value = origins.get(field, (field, err.get("input")))
    if field in ("minio_secret_key", "rabbitmq_url"):
        return f"{where}: {err['msg']}"  # never the secret itself
    if field == "adapter_type":
        return f"{where}={value!r} is not one of: {', '.join(ADAPTER_TYPES)}"
    if field in _EXPECTED:
        return f"{where}={value!r}: expected {_EXPECTED[field]}"
    return f"{where}: {err['msg']}"
