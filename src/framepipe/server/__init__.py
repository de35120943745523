"""The HTTP service: REST and WebSocket over the state store (``pip install
'framepipe[server]'``; ``framepipe serve``).

``create_app`` loads FastAPI on first use, so that code importing only
:mod:`framepipe.server.detector` or :mod:`framepipe.server.feed` (a job step on a worker) does
not need the ``server`` extra.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from framepipe.server.app import create_app
    from framepipe.server.feed import EventFeed

__all__ = ["EventFeed", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from framepipe.server.app import create_app

        return create_app
    if name == "EventFeed":
        from framepipe.server.feed import EventFeed

        return EventFeed
    raise AttributeError(f"module 'framepipe.server' has no attribute {name!r}")
