"""The doorbell hosted by ``framepipe serve``: its events, snapshots, known faces and health on
the service's dashboard, and the original web interface's JSON routes under
``/api/apps/doorbell/``.

::

    DOORBELL_CAMERA=rtsp://cam.local/stream1 framepipe serve --app examples/doorbell/service.py:app
    DOORBELL_CONFIG=doorbell.json framepipe serve --app examples/doorbell/service.py:app

Configuration, read when the service loads this file: the doorbell's environment variables
(``DOORBELL_CAMERA``, ``DOORBELL_DATA_DIR``, ``WORKER_COUNT``, ...; see the README) and, with
``DOORBELL_CONFIG``, a JSON file holding the configuration dict that ``main(config=...)`` and
``OrchestratorManager(config)`` take (merged over them). A bad value stops the service before
it serves anything, naming the key or the variable.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from doorbell.web import hosted_app

from framepipe.errors import ConfigError

__all__ = ["app"]


def _config() -> dict[str, Any]:
    path = os.environ.get("DOORBELL_CONFIG")
    if not path:
        return {}
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"DOORBELL_CONFIG={path}: not a readable JSON file ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"DOORBELL_CONFIG={path}: the file must hold a JSON object")
    return config


app = hosted_app(_config())
