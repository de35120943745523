"""Step keys: ``name`` for a step without parameters, ``name:<label>-<hash>`` for an instance
whose parameters name a file, ``name:<hash>`` for any other instance.

The hash is content-addressed from the canonical JSON of the parameters, so the same step with
the same parameters always has the same key, in every process and run; it is the instance's
identity (two files with the same name in different folders differ by it). The label only
makes the key readable (``extract_metadata:GX000002.MP4-1bbef0a2ed31``): it is the last
segment of the parameter that names a file (:func:`key_label`), cut down to plain ASCII
letters, digits and ``_ . -`` and at most :data:`LABEL_MAX` characters, so a key never holds
a path separator, a control character, a ``:`` or text that is not valid Unicode, whatever
the file was called.

Keys made before labels existed (``name:<hash>`` for every instance) stay valid:
:func:`former_step_key` gives an instance's old key, and a spawn that finds it in its
execution uses it (:meth:`~framepipe.jobs.context.StepContext.spawn_step`), so an execution
stored by an older release resumes without running its completed steps again.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "LABEL_MAX",
    "canonical_json",
    "former_step_key",
    "is_step_key",
    "key_label",
    "step_key",
    "validate_step_name",
]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,199}")  # the whole name: fullmatch
LABEL_MAX = 48
"""The longest label in a key; with a 200-character name and the hash, a key stays under the
database's 300 characters."""
_FILE_PARAMS = frozenset({"path", "file", "filename"})
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def validate_step_name(name: str) -> str:
    """Return ``name`` if it can name a step or pipeline: 1 to 200 ASCII letters, digits,
    ``_ . -``, starting with a letter or ``_``, and nothing else (not even a trailing
    newline); else :class:`ValueError`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid name {name!r}: use letters, digits, '_', '.', '-' and start with a letter"
        )
    return name


def canonical_json(value: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces, no NaN); raises TypeError/ValueError."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def key_label(params: Mapping[str, Any]) -> str | None:
    """The readable part of the key of an instance with ``params``, or None.

    The file parameter is the first (in name order) of ``path``, ``file``, ``filename`` or a
    name ending in ``_path`` or ``_file`` whose value is text; the label is the last non-empty
    segment of that value (split at ``/`` and ``\\``), every run of other characters than
    ASCII letters, digits, ``_``, ``.`` and ``-`` replaced by one ``_``, leading dots
    removed (never ``.`` or ``..``); a longer label keeps its first and last characters
    around a ``~``. None when no parameter names a file or nothing readable is left. The rule
    depends on nothing but ``params`` (no Unicode tables), so a key never changes between
    releases or Python versions."""
    for name in sorted(params):
        value = params[name]
        if not isinstance(value, str) or not (
            name in _FILE_PARAMS or name.endswith(("_path", "_file"))
        ):
            continue
        segments = [s for s in re.split(r"[/\\]", value) if s.strip()]
        if not segments:
            return None
        label = _UNSAFE.sub("_", segments[-1]).lstrip(".")
        if not label.strip("_.-"):
            return None
        if len(label) > LABEL_MAX:
            tail = LABEL_MAX // 3
            label = f"{label[: LABEL_MAX - tail - 1]}~{label[-tail:]}"
        return label
    return None


def _digest(params: Mapping[str, Any]) -> str:
    return hashlib.blake2b(canonical_json(params).encode(), digest_size=6).hexdigest()


def step_key(name: str, params: Mapping[str, Any] | None = None) -> str:
    """The key of step ``name`` with ``params``; raises TypeError for unserialisable params."""
    if not params:
        return name
    digest = _digest(params)
    label = key_label(params)
    return f"{name}:{label}-{digest}" if label else f"{name}:{digest}"


def former_step_key(name: str, params: Mapping[str, Any] | None = None) -> str | None:
    """The key the same instance had before keys carried a label (``name:<hash>``), or None
    when it is the key :func:`step_key` gives."""
    if not params or key_label(params) is None:
        return None
    return f"{name}:{_digest(params)}"


def is_step_key(ref: str) -> bool:
    """True for an instance key (``name:...``), False for a bare step name."""
    return ":" in ref
