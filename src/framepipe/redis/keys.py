"""The one namespace rule for framepipe's Redis keys.

Every key framepipe writes is ``<namespace>:<part>:<part>...``. A namespace may be given with
or without its trailing colon (``framepipe`` and ``framepipe:`` name the same keys), so the
settings' ``broker_namespace`` (``framepipe``) and the processor fleet's default
(``framepipe:``) meet on one spelling. An empty namespace adds no prefix.
"""

from __future__ import annotations

__all__ = ["namespaced"]


def namespaced(namespace: str, *parts: str) -> str:
    """The key ``parts`` (joined by ``:``) in ``namespace``: ``namespaced("framepipe",
    "jobs", "steps") == namespaced("framepipe:", "jobs", "steps") == "framepipe:jobs:steps"``.
    Trailing colons of ``namespace`` are not doubled; the parts are used as given."""
    prefix = namespace.rstrip(":")
    return ":".join((prefix, *parts)) if prefix else ":".join(parts)
