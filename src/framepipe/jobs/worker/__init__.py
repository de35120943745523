"""``framepipe worker``: the process that runs the steps of distributed executions.

:class:`Worker` (``worker.py``) owns the lifecycle and states the guarantees; its parts, each
holding its own state, are the claim window (``window.py``), the runs (``runs.py``), the
intake of deliveries (``intake.py``), the commit rounds (``commits.py``), the upkeep of
leases and heartbeats (``upkeep.py``), the watch on its event loop (``loopwatch.py``) and
the store and broker connections (``connections.py``).
"""

from framepipe.jobs.worker.worker import Worker

__all__ = ["Worker"]
