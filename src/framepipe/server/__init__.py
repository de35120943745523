"""The HTTP service: REST and WebSocket over the state store (``pip install
'framepipe[server]'``; ``framepipe serve``)."""

from framepipe.server.app import create_app
from framepipe.server.feed import EventFeed

__all__ = ["EventFeed", "create_app"]
