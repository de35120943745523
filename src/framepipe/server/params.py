"""The path and query parameters that name executions, pipelines and statuses, checked where
they enter the service.

Guarantees: an execution id (or prefix), a pipeline name and a status reach the job client,
and so a state database, only as valid Unicode text without NUL, at most a fixed length
(:data:`MAX_ID`, :data:`MAX_NAME`, :data:`MAX_STATUS` characters); anything else is refused
before any store is asked, the same way on every backend. Over HTTP the refusal is FastAPI's
422 whose ``loc`` names the parameter (``["path", "execution_id"]``); ``/ws`` uses the same
functions and closes with 1008. The text rule itself is
:func:`framepipe.untrusted.check_text`'s.
"""

from typing import Annotated

from pydantic import AfterValidator

from framepipe.untrusted import check_text

__all__ = [
    "MAX_ID",
    "MAX_NAME",
    "MAX_STATUS",
    "ExecutionId",
    "PipelineName",
    "StatusName",
    "check_execution_id",
    "check_pipeline_name",
    "check_status_name",
]

MAX_ID = 64
"""Characters of an execution id or prefix (ids are 32 hexadecimal digits)."""
MAX_NAME = 200
"""Characters of a pipeline name."""
MAX_STATUS = 32
"""Characters of a status filter (the statuses are single short words)."""


def check_execution_id(value: str) -> str:
    """``value`` if it can be an execution id or prefix, else
    :class:`~framepipe.errors.InvalidInputError` saying why."""
    return check_text(value, "execution id", max_length=MAX_ID)


def check_pipeline_name(value: str) -> str:
    """``value`` if it can be a pipeline name, else
    :class:`~framepipe.errors.InvalidInputError` saying why."""
    return check_text(value, "pipeline name", max_length=MAX_NAME)


def check_status_name(value: str) -> str:
    """``value`` if it can be a status, else :class:`~framepipe.errors.InvalidInputError`
    saying why (an unknown status is not refused: it matches nothing)."""
    return check_text(value, "status", max_length=MAX_STATUS)


# InvalidInputError is a ValueError: pydantic turns it into a validation error at the
# parameter, which the service answers with 422.
ExecutionId = Annotated[str, AfterValidator(check_execution_id)]
"""A path or query parameter naming an execution (id or unique prefix)."""
PipelineName = Annotated[str, AfterValidator(check_pipeline_name)]
"""A parameter or body field naming a pipeline."""
StatusName = Annotated[str, AfterValidator(check_status_name)]
"""A status filter."""
