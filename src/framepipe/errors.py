"""One error tree for framepipe, grouped by what the caller can do about it.

::

    FramepipeError
    ├── ConfigError                  fix the settings (env var, config file, URL)
    ├── InvalidInputError            refused at the boundary: names the field and what is wrong
    │   ├── InputTooLargeError       over a size limit; names the limit and its setting
    │   └── PathNotAllowedError      a local path outside the configured roots
    ├── MissingDependencyError       install the named extra
    ├── PipelineDefinitionError      fix the pipeline code; raised before the step runs
    │   ├── PipelineCycleError
    │   ├── UnknownDependencyError
    │   ├── UnknownStepError
    │   └── StepParamsError
    ├── StepError                    one step of one execution failed
    │   ├── StepFailedError          the step raised; ``__cause__`` is its exception
    │   ├── StepOutputError          the step returned something that cannot be stored
    │   ├── StepCrashedError         the process died while the step ran
    │   └── StepCancelledError       the execution was cancelled or interrupted
    ├── ExecutionError               about a whole execution
    │   ├── ExecutionNotFoundError
    │   ├── ExecutionStateError      the execution is in a state that forbids the call
    │   └── ExecutionFailedError     ``run``/``wait`` of an execution that did not complete
    ├── StreamError                  a live stream; names the source (and stage, frame)
    │   ├── SourceError              a source cannot be opened or read
    │   │   ├── CaptureExitedError   the capture subprocess exited (``exit_code``)
    │   │   └── SourceStalledError   no frame within the stall timeout
    │   ├── FrameError               a frame cannot be decoded or encoded
    │   └── ProcessorError           a stage's processor raised for a frame
    │       └── WorkerDiedError      a stage's worker process died holding a frame
    ├── BrokerError                  the job broker (Redis Streams) cannot be reached; names the URL
    ├── StateStoreError              the state database
    │   └── SchemaVersionError
    ├── ObjectStoreError             the object store
    │   ├── InvalidKeyError
    │   ├── ObjectKeyConflictError   a key nests under an object, or names a folder of keys
    │   ├── ObjectNotFoundError
    │   └── ObjectReplacedError      a copy pinned to a version of an object it no longer is
    ├── ProcessorRegistryError       remote processors registered on Redis (the fleet)
    │   ├── RegistryConnectionError  Redis cannot be reached; names the URL
    │   ├── NoProcessorError         no live processor offers the capability; names those on offer
    │   ├── CircuitOpenError         every processor offering it has its circuit breaker open
    │   ├── NoCapacityError          all of them stayed busy for the whole routing wait
    │   ├── ResultTimeoutError       no result for the frame within the timeout
    │   └── RemoteProcessingError    the processor reported an error for the frame
    ├── ModelError                   a model adapter's call failed; names the model (script, URL)
    │   ├── ModelTimeoutError        no result within the adapter's timeout (its processes killed)
    │   ├── ModelOutputError         the model ran but its answer breaks the protocol
    │   ├── ModelSetupError          the model server refused its URL or credentials (also a
    │   │                            ConfigError: a step fails for good)
    │   └── ModelRefusedError        the model refused what it was sent (also an
    │                                InvalidInputError: a step fails for good)
    ├── MediaError                   a media file cannot be read or written; names the path
    └── DetectorError                a host-side detector (SD import) failed a request; names it
        └── DetectorUnavailableError the detector is not connected, or disconnected mid-request

Every error that concerns a step names the pipeline and the step key in its message and
carries them as attributes, so logs, events and the CLI can show them without parsing.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "BrokerError",
    "CaptureExitedError",
    "CircuitOpenError",
    "ConfigError",
    "DetectorError",
    "DetectorUnavailableError",
    "ExecutionError",
    "ExecutionFailedError",
    "ExecutionNotFoundError",
    "ExecutionStateError",
    "FrameError",
    "FramepipeError",
    "InputTooLargeError",
    "InvalidInputError",
    "InvalidKeyError",
    "InvalidSourceError",
    "MediaError",
    "MissingDependencyError",
    "ModelError",
    "ModelOutputError",
    "ModelRefusedError",
    "ModelSetupError",
    "ModelTimeoutError",
    "NoCapacityError",
    "NoProcessorError",
    "ObjectKeyConflictError",
    "ObjectNotFoundError",
    "ObjectReplacedError",
    "ObjectStoreError",
    "PathNotAllowedError",
    "PipelineCycleError",
    "PipelineDefinitionError",
    "ProcessorError",
    "ProcessorRegistryError",
    "RegistryConnectionError",
    "RemoteProcessingError",
    "ResultTimeoutError",
    "SchemaVersionError",
    "SourceError",
    "SourceStalledError",
    "StateStoreError",
    "StepCancelledError",
    "StepCrashedError",
    "StepError",
    "StepFailedError",
    "StepOutputError",
    "StepParamsError",
    "StreamError",
    "UnknownDependencyError",
    "UnknownStepError",
    "WorkerDiedError",
]


class FramepipeError(Exception):
    """Base of every error framepipe raises on purpose."""


class ConfigError(FramepipeError):
    """A setting is missing or invalid; the message names the setting and its source."""


class InvalidInputError(FramepipeError, ValueError):
    """Input from outside (an HTTP body, a detector message, an execution's inputs, a file
    list) was refused before anything was stored or started; ``where`` names the field
    (``inputs.files[2]``) and the message says what is wrong with it."""

    def __init__(self, message: str, *, where: str | None = None) -> None:
        self.where = where
        self.reason = message
        super().__init__(f"{where}: {message}" if where else message)


class InputTooLargeError(InvalidInputError):
    """The input is over a size limit; the message names the limit and the setting that
    raises it."""


class PathNotAllowedError(InvalidInputError):
    """A local path named by an input is outside the roots the settings allow
    (``input_roots``); the message never says whether the path exists."""


class MissingDependencyError(FramepipeError, ImportError):
    """An optional dependency is not installed; the message gives the pip command."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            f"{feature} needs the '{package}' package: pip install 'framepipe[{extra}]'"
        )


def _where(pipeline: str | None, step_key: str | None) -> str:
    parts = []
    if pipeline is not None:
        parts.append(f"pipeline '{pipeline}'")
    if step_key is not None:
        parts.append(f"step '{step_key}'")
    return ", ".join(parts)


class PipelineDefinitionError(FramepipeError):
    """The pipeline's code is wrong: fix it; retrying will not help."""

    def __init__(
        self, message: str, *, pipeline: str | None = None, step_key: str | None = None
    ) -> None:
        self.pipeline = pipeline
        self.step_key = step_key
        where = _where(pipeline, step_key)
        super().__init__(f"{where}: {message}" if where else message)


class PipelineCycleError(PipelineDefinitionError):
    """The declared ``depends_on`` edges form a cycle."""


class UnknownDependencyError(PipelineDefinitionError):
    """A ``depends_on`` names no step of the pipeline or execution."""


class UnknownStepError(PipelineDefinitionError):
    """``spawn_step`` (or a lookup) names a step the pipeline does not define."""


class StepParamsError(PipelineDefinitionError):
    """A step's parameters do not match its function, or cannot be serialised."""


class StepError(FramepipeError):
    """One step of one execution did not complete."""

    def __init__(
        self, message: str, *, pipeline: str, step_key: str, execution_id: str | None = None
    ) -> None:
        self.pipeline = pipeline
        self.step_key = step_key
        self.execution_id = execution_id
        super().__init__(f"{_where(pipeline, step_key)}: {message}")


class StepFailedError(StepError):
    """The step's function raised; the original exception is ``__cause__``."""


class StepOutputError(StepError):
    """The step returned a value that is not a JSON-serialisable dict (or is too large)."""


class StepCrashedError(StepError):
    """The process running the step died without the step raising."""


class StepCancelledError(StepError):
    """Raised inside a step (by ``ctx.progress``/``ctx.check_cancelled``) once its
    execution is cancelled or interrupted; the step stops at that point."""


class ExecutionError(FramepipeError):
    """About a whole execution."""

    def __init__(self, message: str, *, execution_id: str | None = None) -> None:
        self.execution_id = execution_id
        super().__init__(message)


class ExecutionNotFoundError(ExecutionError, LookupError):
    """No execution has that id (or the id prefix is ambiguous)."""


class ExecutionStateError(ExecutionError):
    """The execution's status forbids the call (e.g. retrying a completed execution)."""


class ExecutionFailedError(ExecutionError):
    """The awaited execution ended failed, cancelled or interrupted.

    ``status`` is its final status and ``errors`` maps each failed step key to its error text.
    """

    def __init__(
        self, message: str, *, execution_id: str, status: str, errors: dict[str, str]
    ) -> None:
        self.status = status
        self.errors = errors
        super().__init__(message, execution_id=execution_id)


class StreamError(FramepipeError):
    """About a live stream; ``source_id`` names the source when known."""

    def __init__(self, message: str, *, source_id: str | None = None) -> None:
        self.source_id = source_id
        super().__init__(f"[{source_id}] {message}" if source_id else message)


class SourceError(StreamError):
    """A source cannot be opened or read (unreachable URL, not a video, truncated file ...)."""


class InvalidSourceError(SourceError):
    """The input can never be read as it is: a local file that is missing, empty, not a
    video, or without a video stream. Its message names the file and why.

    :attr:`permanent` is True: a :class:`~framepipe.supervise.Supervisor` does not restart
    the source (state ``failed`` at once), since every session would fail alike; a camera or
    a stream that is down is a plain :class:`SourceError`, restarted until it is back."""

    permanent = True


class CaptureExitedError(SourceError):
    """The capture subprocess exited; ``exit_code`` is its code (negative: killed by a signal)
    and ``stderr_tail`` the last lines it printed."""

    def __init__(
        self,
        message: str,
        *,
        source_id: str | None = None,
        exit_code: int | None = None,
        stderr_tail: str = "",
    ) -> None:
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail
        super().__init__(message, source_id=source_id)


class SourceStalledError(SourceError):
    """No frame arrived within the stall timeout."""


class FrameError(StreamError):
    """A frame cannot be decoded or encoded (bad JPEG, wrong raw size ...)."""


class ProcessorError(StreamError):
    """A stage's processor raised; ``stage`` and ``seq`` name where; ``__cause__`` is why."""

    def __init__(
        self,
        message: str,
        *,
        source_id: str | None = None,
        stage: str | None = None,
        seq: int | None = None,
    ) -> None:
        self.stage = stage
        self.seq = seq
        where = f"stage '{stage}'" + (f", frame {seq}" if seq is not None else "")
        super().__init__(f"{where}: {message}" if stage else message, source_id=source_id)


class WorkerDiedError(ProcessorError):
    """A stage's worker process died while it held a frame (it is restarted)."""


class StateStoreError(FramepipeError):
    """The state database cannot be opened, migrated or written."""


class SchemaVersionError(StateStoreError):
    """The database schema is newer than this framepipe, or unknown to it."""


class ObjectStoreError(FramepipeError):
    """The object store cannot be reached or refused an operation."""


class InvalidKeyError(ObjectStoreError, ValueError):
    """An object key is empty, absolute, or would escape the store (``..``)."""


class ObjectKeyConflictError(ObjectStoreError):
    """A store kept in folders (the local one) cannot hold an object at ``a/b`` while ``a`` is
    an object, nor one at ``a`` while keys ``a/...`` exist: the key is refused (``key``).
    S3 keys are flat and hold both."""

    def __init__(self, message: str, *, key: str) -> None:
        self.key = key
        super().__init__(message)


class ObjectNotFoundError(ObjectStoreError, KeyError):
    """No object is stored under the key (``key``, when known)."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        self.key = key
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class ObjectReplacedError(ObjectStoreError):
    """An object was replaced since a caller took its version (``version``): a copy pinned
    to that version is refused, naming the key (``key``), and nothing is written."""

    def __init__(self, message: str, *, key: str, version: str) -> None:
        self.key = key
        self.version = version
        super().__init__(message)


class BrokerError(FramepipeError):
    """The job broker (Redis Streams delivering ready steps to workers) cannot be reached or
    refused a command; ``url`` is its URL, password masked."""

    def __init__(self, message: str, *, url: str) -> None:
        self.url = url
        super().__init__(message)


class ProcessorRegistryError(FramepipeError):
    """About remote processors: the registry on Redis, its router, a :class:`ProcessorClient`."""


class RegistryConnectionError(ProcessorRegistryError):
    """Redis cannot be reached (or was lost); ``url`` is the Redis URL, password masked."""

    def __init__(self, message: str, *, url: str) -> None:
        self.url = url
        super().__init__(message)


class NoProcessorError(ProcessorRegistryError, LookupError):
    """No live processor offers ``capability``; ``offered`` lists the capabilities on offer."""

    def __init__(self, capability: str, offered: list[str]) -> None:
        self.capability = capability
        self.offered = offered
        on_offer = ", ".join(repr(c) for c in offered) if offered else "none (no live processor)"
        super().__init__(
            f"no live processor offers capability {capability!r}; capabilities on offer: {on_offer}"
        )


class CircuitOpenError(ProcessorRegistryError):
    """Every processor offering ``capability`` has its circuit breaker open after repeated
    failures; ``retry_in`` is the time (s) until the first one lets a trial frame through."""

    def __init__(self, capability: str, processors: list[str], retry_in: float) -> None:
        self.capability = capability
        self.processors = processors
        self.retry_in = retry_in
        super().__init__(
            f"capability {capability!r}: the circuit breaker of every processor "
            f"offering it is open ({', '.join(processors)}); next trial in "
            f"{retry_in:.1f}s"
        )


class NoCapacityError(ProcessorRegistryError):
    """Every processor offering ``capability`` stayed at capacity for ``waited`` seconds."""

    def __init__(self, capability: str, processors: list[str], waited: float) -> None:
        self.capability = capability
        self.processors = processors
        self.waited = waited
        super().__init__(
            f"capability {capability!r}: every processor offering it "
            f"({', '.join(processors)}) stayed at capacity for {waited:.1f}s"
        )


class ResultTimeoutError(ProcessorRegistryError):
    """No result arrived for frame ``frame_id`` (sent to ``processor_id``) within ``timeout``."""

    def __init__(
        self, *, frame_id: str, capability: str, processor_id: str, timeout: float
    ) -> None:
        self.frame_id = frame_id
        self.capability = capability
        self.processor_id = processor_id
        self.timeout = timeout
        super().__init__(
            f"frame {frame_id} ({capability!r}, routed to processor "
            f"{processor_id!r}): no result within {timeout:g}s"
        )


class RemoteProcessingError(ProcessorRegistryError):
    """The processor reported an error for the frame. ``kind`` says whose fault:
    ``processor`` (``process_frame`` raised or timed out), ``output`` (its result is not a
    JSON-serialisable dict), ``input`` (the stream entry is malformed), ``lost`` (the frame
    outlived too many processors)."""

    def __init__(self, message: str, *, frame_id: str, processor_id: str, kind: str) -> None:
        self.frame_id = frame_id
        self.processor_id = processor_id
        self.kind = kind
        super().__init__(
            f"frame {frame_id or '?'} on processor {processor_id!r} ({kind} error): {message}"
        )


class ModelError(FramepipeError):
    """A model adapter's call failed. The message names the model (its script or URL).

    ``retryable`` says whether the adapter's retry policy may try again (a crash, an HTTP 5xx, a
    lost connection, a timeout) or not (an HTTP 4xx, a model that answered ``success: false``,
    an answer that breaks the protocol). ``exit_code`` and ``stderr_tail`` are set for a
    subprocess model, ``status_code`` for an HTTP model."""

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        retryable: bool = False,
        exit_code: int | None = None,
        stderr_tail: str = "",
        status_code: int | None = None,
    ) -> None:
        self.model = model
        self.retryable = retryable
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail
        self.status_code = status_code
        super().__init__(message)


class ModelTimeoutError(ModelError, TimeoutError):
    """No result within the adapter's timeout; a subprocess model's process group was killed."""


class ModelOutputError(ModelError):
    """The model ran but its answer breaks the protocol: no ``frames_path`` line, a body that
    is not JSON, a ``frames_path`` that does not exist."""


class ModelSetupError(ModelError, ConfigError):
    """A model refused the request for its setup, not its content (HTTP 401, 403, 404, 405: a
    wrong URL or credentials; a script's exit code 64 or 78): neither the adapter nor a step's
    retry runs it again (a :class:`ConfigError`); a resume after the fix does."""


class ModelRefusedError(ModelError, InvalidInputError):
    """A model refused what it was sent (an HTTP 4xx other than those of
    :class:`ModelSetupError` and those that mean "not now": 408, 409, 425, 429; a script's
    exit code 65 or 66): neither the adapter nor a step's retry sends it again (an
    :class:`InvalidInputError`)."""


class MediaError(FramepipeError):
    """A media file cannot be read or written; ``path`` names it and the message says why."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}")


class DetectorError(FramepipeError):
    """A host-side detector (the SD-card import's card reader process) refused or failed a
    request; ``detector_id`` names the detector and ``session_id`` the card session, when
    known, and the message says which file and why."""

    def __init__(
        self, message: str, *, detector_id: str | None = None, session_id: str | None = None
    ) -> None:
        self.detector_id = detector_id
        self.session_id = session_id
        self.reason = message
        where = f"detector {detector_id!r}" if detector_id else "detector"
        super().__init__(f"{where}: {message}")


class DetectorUnavailableError(DetectorError):
    """No detector owning the session is connected (within the wait), or it disconnected
    while a request was waiting for its answer: retrying once it is back may succeed."""
