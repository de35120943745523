"""The face-recognition doorbell on framepipe.

Camera -> [motion gate] -> face detection -> face recognition -> visits -> events, with the
original system's management API (:class:`OrchestratorManager`), its legacy
``DoorbellSecuritySystem`` API (:class:`LegacyAdapter`, from ``manager.get_legacy_interface()``)
and :class:`MigrationUtils`. The original system's modules map as follows::

    src.integration.orchestrator_manager -> doorbell.manager
    src.integration.legacy_adapter       -> doorbell.legacy
    src.integration.migration_utils      -> doorbell.migration
    src.main                             -> doorbell.main (``main(config=...)``, the exit code)
"""

from doorbell.config import DoorbellConfig, load_config
from doorbell.legacy import LegacyAdapter
from doorbell.manager import HealthStatus, OrchestratorManager, SystemState
from doorbell.migration import MigrationUtils
from doorbell.orchestrator import PipelineOrchestrator

__all__ = [
    "DoorbellConfig",
    "HealthStatus",
    "LegacyAdapter",
    "MigrationUtils",
    "OrchestratorManager",
    "PipelineOrchestrator",
    "SystemState",
    "load_config",
]
