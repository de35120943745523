"""Where a processor's settings come from when its code leaves them out: the environment.

Processors deployed with a compose file of the processor-fleet kind get their place in the
fleet from environment variables, not from their code:

* ``PROCESSOR_ID``: the processor's id. It wins over the id in the code (which the processor
  fleet's guide hard-codes), because the deployment is what keeps replicas of one image apart;
  a difference is logged.
* ``REDIS_URL``, else ``REDIS_HOST`` and ``REDIS_PORT``: where Redis is, when the code gives no
  ``redis_url`` (an explicit ``redis_url`` wins). Without any of them: ``127.0.0.1:6379``, db 0.
* ``ORCHESTRATOR_URL``: the HTTP orchestrator the fleet's processors registered with, when the
  code gives no ``orchestrator_url``. framepipe has no such orchestrator (processors register
  on Redis); the value is reported (log, health endpoint) and never contacted, except that a
  ``redis://`` (``rediss://``, ``unix://``) URL there names the registry's Redis when nothing
  else does.
* ``FRAMEPIPE_NAMESPACE``: the registry's key prefix, when the code gives no ``namespace``.

Every function takes the environment as a mapping (``os.environ`` by default in the client), so
tests and processes with several clients can pass their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from framepipe.processors.fleet.keys import DEFAULT_NAMESPACE, DEFAULT_REDIS_URL

__all__ = [
    "REDIS_SCHEMES",
    "Setting",
    "namespace_from",
    "orchestrator_url_from",
    "processor_id_from",
    "redis_url_from",
]

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True)
class Setting:
    """A resolved value and where it came from (``argument``, an environment variable's name,
    or ``default``)."""

    value: str
    source: str


def _env(environ: Mapping[str, str], name: str) -> str:
    return (environ.get(name) or "").strip()


def processor_id_from(processor_id: str | None, environ: Mapping[str, str]) -> Setting:
    """``PROCESSOR_ID`` when set, else ``processor_id``; :class:`ValueError` when neither."""
    from_env = _env(environ, "PROCESSOR_ID")
    if from_env:
        return Setting(from_env, "PROCESSOR_ID")
    if processor_id:
        return Setting(processor_id, "argument")
    raise ValueError("no processor_id: pass one, or set PROCESSOR_ID in the environment")


def redis_url_from(
    redis_url: str | None, environ: Mapping[str, str], orchestrator_url: str | None = None
) -> Setting:
    """``redis_url`` when given, else ``REDIS_URL``, else ``REDIS_HOST``/``REDIS_PORT``, else a
    Redis URL given as ``orchestrator_url``, else the default. :class:`ValueError` for a
    ``REDIS_PORT`` that is not a port number."""
    if redis_url:
        return Setting(redis_url, "argument")
    url = _env(environ, "REDIS_URL")
    if url:
        return Setting(url, "REDIS_URL")
    host, port = _env(environ, "REDIS_HOST"), _env(environ, "REDIS_PORT")
    if host or port:
        if port and (not port.isdigit() or not 0 < int(port) < 65536):
            raise ValueError(f"REDIS_PORT must be a port number (1-65535), not {port!r}")
        host = host or "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address
        return Setting(f"redis://{host}:{port or '6379'}/0", "REDIS_HOST/REDIS_PORT")
    if orchestrator_url and orchestrator_url.startswith(REDIS_SCHEMES):
        return Setting(orchestrator_url, "orchestrator_url")
    return Setting(DEFAULT_REDIS_URL, "default")


def orchestrator_url_from(orchestrator_url: str | None, environ: Mapping[str, str]) -> str | None:
    """``orchestrator_url`` when given, else ``ORCHESTRATOR_URL``, else None."""
    return orchestrator_url or _env(environ, "ORCHESTRATOR_URL") or None


def namespace_from(namespace: str | None, environ: Mapping[str, str]) -> str:
    """``namespace`` when given, else ``FRAMEPIPE_NAMESPACE``, else ``framepipe:``."""
    return namespace or _env(environ, "FRAMEPIPE_NAMESPACE") or DEFAULT_NAMESPACE
