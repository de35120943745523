"""What the service sends, with the secrets of URLs masked: :func:`public_json`.

Text reaches the service's answers from places it does not write: a step's exception (a
program's error naming ``postgresql://app:secret@db/prod``), an event of a live app, a source
id chosen by a user, an input. The rule of :func:`framepipe.urls.safe_text` applies to every
string of every JSON answer (``/api``, errors) and live message (``/ws``), and to the text of
``/metrics``: the password of each URL (``scheme://user:***@host``) and the value of each of
its query parameters whose name says it holds a secret (``?token=***``, ``key``, ``sig``...)
are masked, whatever stored them. The same text without a URL is sent unchanged.
"""

from typing import Any

from framepipe.urls import safe_json, safe_text

__all__ = ["public_json", "public_text"]


def public_text(text: str) -> str:
    """``text`` with the secrets of the URLs in it masked."""
    return safe_text(text)


def public_json(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, tuples, scalars) with the secrets of the URLs in
    its strings, keys included, masked (:func:`framepipe.urls.safe_json`)."""
    return safe_json(value)
