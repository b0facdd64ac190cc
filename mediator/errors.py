"""Errors raised by the mediator.

Every error derives from one root, so callers can catch the family at once::

    MediatorError
    ├── DefinitionError          a workflow definition is invalid
    │   ├── UnknownDependency
    │   ├── DuplicateStep
    │   ├── CyclicDependency
    │   ├── BadExpression
    │   └── BadDuration
    ├── UnknownWorkflow          a request names a workflow that is not loaded
    ├── StateUnavailable         Redis could not be reached or answered wrongly
    ├── CorruptState             a stored workflow state no longer decodes
    ├── IdempotenceUnsupported   the broker refused the idempotent producer
    ├── RecoverError             `mediator recover` cannot run as asked
    │   └── BadTime              a time that is neither ISO-8601 nor a duration ago
    ├── InfrastructureError      an embedded server could not be started
    ├── ConfigurationError       settings are inconsistent
    │   └── DefinitionConflict   a loaded definition differs from the stored one of its version
    ├── SignatureError           a record is not signed by a key it must be (core.signing)
    ├── ExpressionError          an expression does not compile or evaluate (core.expressions)
    ├── NoInstance               no instance of a service can take a command (core.balancer)
    ├── DlqError                 the dead-letter topic cannot be read or replayed (ops.dlq)
    ├── UnknownSchedule          no replica recorded a schedule of that name (ops.schedules)
    ├── ActionError              a service's handler fails its step (sdk.worker)
    ├── SubmitTimeout            no result within a submit's timeout (sdk.client)
    ├── ResultsTopicMissing      the client's results topic does not exist (sdk.client)
    ├── ClientClosed             the client is not started, or its reader stopped (sdk.client)
    ├── ClaimMissing             a value stored by reference is not there (sdk.claims)
    └── ClaimUnavailable         the store of values by reference cannot answer (sdk.claims)
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BadDuration",
    "BadExpression",
    "BadTime",
    "ConfigurationError",
    "CorruptState",
    "CyclicDependency",
    "DefinitionConflict",
    "DefinitionError",
    "DuplicateStep",
    "IdempotenceUnsupported",
    "InfrastructureError",
    "MediatorError",
    "RecoverError",
    "StateUnavailable",
    "UnknownDependency",
    "UnknownWorkflow",
]


class MediatorError(Exception):
    """Root of every error the mediator raises."""


class DefinitionError(MediatorError):
    """A workflow definition is invalid; the message names the file, workflow and step."""

    def __init__(self, detail: str, *, source: str | None = None, workflow: str | None = None):
        self.detail = detail
        self.source = source
        self.workflow = workflow
        where = []
        if source:
            where.append(source)
        if workflow:
            where.append(f"workflow {workflow!r}")
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {detail}" if prefix else detail)

    def located(self, source: str) -> DefinitionError:
        """The same error, naming the file it came from."""
        err = type(self).__new__(type(self))
        DefinitionError.__init__(err, self.detail, source=source, workflow=self.workflow)
        err.__dict__.update({k: v for k, v in self.__dict__.items() if k not in err.__dict__})
        return err


class UnknownDependency(DefinitionError):
    """A step depends on a step that does not exist."""

    def __init__(self, workflow: str, step: str, dependency: str, known: Sequence[str]):
        self.step, self.dependency, self.known = step, dependency, list(known)
        super().__init__(
            f"step {step!r} depends on unknown step {dependency!r}; "
            f"known steps: {', '.join(known)}",
            workflow=workflow,
        )


class DuplicateStep(DefinitionError):
    """Two steps share one id."""

    def __init__(self, workflow: str, step: str):
        self.step = step
        super().__init__(
            f"step id {step!r} is used more than once; give every step a unique id",
            workflow=workflow,
        )


class CyclicDependency(DefinitionError):
    """The steps' dependencies form a cycle."""

    def __init__(self, workflow: str, cycle: Sequence[str]):
        self.cycle = list(cycle)
        super().__init__(
            f"dependency cycle {' -> '.join(cycle)}; remove one of these depends_on entries",
            workflow=workflow,
        )


class BadExpression(DefinitionError):
    """A JMESPath expression does not compile."""

    def __init__(self, workflow: str, step: str | None, field: str, expression: str, reason: str):
        self.step, self.field, self.expression = step, field, expression
        where = f"step {step!r} " if step else ""
        super().__init__(
            f"{where}{field}: invalid JMESPath expression {expression!r}: {reason}",
            workflow=workflow,
        )


class BadDuration(DefinitionError):
    """A duration is not a positive number of seconds or a string like '250ms', '5s', '2m'."""

    def __init__(self, workflow: str, step: str | None, field: str, value: object):
        self.step, self.field, self.value = step, field, value
        where = f"step {step!r} " if step else ""
        super().__init__(
            f"{where}{field}: invalid duration {value!r}; "
            "use seconds (e.g. 1.5) or a string such as '250ms', '5s', '2m', '1h'",
            workflow=workflow,
        )


class UnknownWorkflow(MediatorError):
    """A request names a workflow that is not loaded."""

    def __init__(self, name: str, version: int | None, known: Sequence[str]):
        self.name, self.version, self.known = name, version, list(known)
        which = f"{name!r} version {version}" if version is not None else repr(name)
        super().__init__(
            f"unknown workflow {which}; loaded workflows: {', '.join(known) or '(none)'}"
        )


class StateUnavailable(MediatorError):
    """Redis could not be reached, or a script answered something unexpected."""


class CorruptState(MediatorError):
    """A workflow's stored state no longer decodes: that run cannot advance (permanent)."""

    def __init__(self, workflow_id: str, cause: BaseException):
        self.workflow_id = workflow_id
        super().__init__(
            f"stored state of workflow {workflow_id} does not decode ({cause}); "
            "its events are dead-lettered: inspect or delete the key and replay them"
        )


class InfrastructureError(MediatorError):
    """An embedded server could not be found, started or reached."""


class ConfigurationError(MediatorError):
    """The settings are inconsistent with each other or with the stored state."""


class DefinitionConflict(ConfigurationError):
    """A loaded workflow differs from the definition Redis holds for the same version.

    Runs of that version may still be following the stored plan, so the edited file is
    refused rather than published over it.
    """

    def __init__(self, name: str, version: int, loaded_hash: str, stored_hash: str):
        self.name, self.version = name, version
        self.loaded_hash, self.stored_hash = loaded_hash, stored_hash
        super().__init__(
            f"workflow {name!r} version {version} differs from the definition already stored "
            f"under that version (loaded content hash {loaded_hash}, stored {stored_hash}); "
            "runs of that version may still follow the stored one, so the file is refused: "
            "bump `version` in the file to change a workflow"
        )


class IdempotenceUnsupported(MediatorError):
    """The broker refused the idempotent producer (its InitProducerId request failed).

    The embedded Tansu broker always does; Apache Kafka does when the client lacks the
    IdempotentWrite permission.
    """

    def __init__(self, bootstrap_servers: str | None, cause: BaseException) -> None:
        self.bootstrap_servers, self.cause = bootstrap_servers, cause
        where = f" at {bootstrap_servers}" if bootstrap_servers else ""
        super().__init__(
            f"the broker{where} refused the idempotent producer "
            f"(InitProducerId: {type(cause).__name__}); the embedded Tansu broker never "
            "supports it: set MEDIATOR_KAFKA__ENABLE_IDEMPOTENCE=false "
            "(or enable_idempotence=False in the SDK)"
        )


class RecoverError(MediatorError):
    """Recovery cannot run as asked (missing topic, empty window, a stalled broker)."""


class BadTime(RecoverError, ValueError):
    """A point in time that is neither ISO-8601 nor a duration ago."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(
            f"invalid time {text!r}; use ISO-8601 such as 2026-11-22T14:00:00Z (UTC unless "
            "it carries an offset) or a duration ago such as 90s, 15m, 2h, 1d"
        )
