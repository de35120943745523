"""``framepipe.processors.registry``: the old home of :class:`ProcessorRegistry`, kept for the
service (:mod:`framepipe.server`), which imports it from here. The fleet now lives in
:mod:`framepipe.processors.fleet`; import its names from :mod:`framepipe.processors`.
"""

from __future__ import annotations

from framepipe.processors.fleet import ProcessorInfo, ProcessorRegistry, ProcessorResult

__all__ = ["ProcessorInfo", "ProcessorRegistry", "ProcessorResult"]
