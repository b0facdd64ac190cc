"""Workflow definitions: the YAML schema, its validation and the compiled execution plan.

A definition is written as YAML (or built as `WorkflowSpec` objects in Python) and compiled
into a `Workflow`: steps in topological order with their dependants, compiled expressions
and durations in milliseconds. Every error names the file, the workflow and the step.

A compiled workflow keeps the canonical JSON of its definition and a hash of it, so that a
replica which never loaded the file can rebuild the same plan (`workflow_from_json`). The
canonical JSON is the definition as written, fields left out stay out, keys sorted: editing
a file changes the hash; reordering keys, comments or whitespace do not, and neither does a
later release that adds a field with a default.
"""

from __future__ import annotations

import graphlib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mediator.core.durations import parse_duration_ms
from mediator.core.expressions import Condition, ExpressionError, Template
from mediator.errors import (
    BadDuration,
    BadExpression,
    CyclicDependency,
    DefinitionError,
    DuplicateStep,
    UnknownDependency,
)

__all__ = [
    "CHILD_PREFIX",
    "Child",
    "CompensateSpec",
    "Compensation",
    "Concurrency",
    "ConcurrencySpec",
    "Fallback",
    "FallbackSpec",
    "RetryPolicy",
    "RetrySpec",
    "Step",
    "StepSpec",
    "Workflow",
    "WorkflowSpec",
    "compile_workflow",
    "describe_error",
    "parse_workflows",
    "workflow_from_json",
]

_IDENT = r"^[A-Za-z_][A-Za-z0-9_]*$"
_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
# `bool` is listed so that `timeout: yes` reaches `parse_duration_ms`, which rejects it,
# instead of being coerced to 1.0 seconds.
Duration = bool | float | str


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RetrySpec(_Spec):
    """How a failing step is retried: exponential backoff with jitter."""

    max_attempts: int = Field(default=1, ge=1, le=1000)
    backoff: Duration = "200ms"
    max_backoff: Duration = "30s"
    multiplier: float = Field(default=2.0, ge=1.0)
    jitter: float = Field(default=0.2, ge=0.0, le=1.0)


#: Shared by every step that sets no `retry` (pydantic keeps the default as is), so its
#: compiled policy is looked up by identity rather than rebuilt per step.
_DEFAULT_RETRY_SPEC = RetrySpec()


#: A compensation is retried unless told otherwise: an undo that gives up leaves the run
#: in `compensation_failed` for an operator, so it should try harder than a forward step.
_DEFAULT_COMPENSATE_RETRY = RetrySpec(max_attempts=3, backoff="1s")


class CompensateSpec(_Spec):
    """The action that undoes a completed step when the run fails or is cancelled."""

    action: str = Field(min_length=1)
    after: Literal["completed", "attempted"] = Field(
        default="completed",
        description="Which steps are undone: only those that completed, or (``attempted``) "
        "also those that may have done their work without saying so: an attempt of the "
        "step went out in this round and it did not complete (it timed out, its instance "
        "died, the run gave it up in flight, or it failed). The undo must then do nothing "
        "when there is nothing to undo.",
    )
    service: str | None = Field(default=None, pattern=_NAME)
    input: Any = None
    timeout: Duration | None = Field(
        default=None, description="No reply within this fails the attempt; default: the step's."
    )
    retry: RetrySpec = _DEFAULT_COMPENSATE_RETRY


class FallbackSpec(_Spec):
    """Where a step's command goes while its service's circuit breaker is open."""

    service: str = Field(pattern=_NAME)
    action: str | None = Field(default=None, min_length=1, description="Default: the step's.")
    input: Any = Field(default=None, description="Default: the step's input.")
    compensate: CompensateSpec | None = Field(
        default=None,
        description="How work the fallback did is undone. Default: the step's compensation, "
        "sent to the fallback's service.",
    )


class WaitSpec(_Spec):
    """A step that sends nothing: it waits for a signal (`mediator signal`, the SDK's
    `MediatorClient.signal`, the dashboard) and completes with the signal's payload."""

    event: str = Field(pattern=_IDENT, description="The signal's name, e.g. ``approval``.")
    match: str | None = Field(
        default=None,
        description="A condition on the signal (`event`: its payload) and the run (`payload`, "
        "`steps`): only a signal for which it holds completes the step; others are kept.",
    )
    key: str | None = Field(
        default=None,
        description="An expression on the run (`payload`, `steps`) giving the correlation key: "
        "a signal sent for this key (and event) instead of a run id reaches the step.",
    )


#: The service name a child step's commands and replies go by (``workflow.<name>``): no
#: service of the user's may take a name with this prefix.
CHILD_PREFIX = "workflow."


class ConcurrencySpec(_Spec):
    """On a workflow: at most `limit` runs of it in progress per value of `key` (a
    customer, a tenant, an account), across every replica; runs over it wait in the key's
    queue and start, highest ``priority`` first and then oldest first, as runs of their
    key end. On a step: the same for the step's attempts in flight, across runs."""

    key: str = Field(
        min_length=1,
        description="An expression on the request (`payload`, `workflow`), e.g. "
        "``payload.customer``: runs with the same value share the limit.",
    )
    limit: int = Field(default=1, ge=1, le=100_000, description="Runs in progress per key.")


class StepSpec(_Spec):
    """One step as written in a definition."""

    id: str = Field(pattern=_IDENT)
    service: str | None = Field(default=None, pattern=_NAME)
    action: str | None = Field(default=None, min_length=1)
    wait: WaitSpec | None = Field(
        default=None, description="Wait for a signal instead of calling a service."
    )
    workflow: str | None = Field(
        default=None,
        pattern=_NAME,
        description="Run this workflow as a child run; the step completes with its output.",
    )
    version: int | None = Field(
        default=None, ge=1, description="With `workflow`: the version to run (default: latest)."
    )
    on_cancel: Literal["cancel", "abandon"] = Field(
        default="cancel",
        description="With `workflow`: whether a child run the parent stops waiting for (the "
        "parent cancelled, failed or timed the step out) is cancelled or left to finish.",
    )
    depends_on: list[str] = Field(default_factory=list)
    input: Any = None
    when: str | None = None
    timeout: Duration | None = None
    retry: RetrySpec = _DEFAULT_RETRY_SPEC
    compensate: CompensateSpec | None = None
    fallback: FallbackSpec | None = None
    concurrency: ConcurrencySpec | None = Field(
        default=None,
        description="At most `limit` attempts of this step in flight at once per value of "
        "`key` (an expression on the run: `payload`, `steps`), across all runs; the others "
        "wait (`queued`) in the key's queue.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> StepSpec:
        if self.concurrency is not None and (self.wait is not None or self.workflow is not None):
            msg = (
                "`concurrency` on a step limits its commands to a service; a `wait` sends "
                "none, and a child run is limited by its own workflow's `concurrency`"
            )
            raise ValueError(msg)
        if self.service is not None and self.service.startswith(CHILD_PREFIX):
            msg = f"service names starting {CHILD_PREFIX!r} are the mediator's (child runs)"
            raise ValueError(msg)
        if self.workflow is not None:
            extra = [
                name
                for name in ("service", "action", "wait", "compensate", "fallback")
                if getattr(self, name) is not None
            ]
            if extra:
                msg = (
                    f"a `workflow` step runs a child run, and is compensated by compensating "
                    f"it: drop {', '.join(extra)}"
                )
                raise ValueError(msg)
            return self
        if self.version is not None or "on_cancel" in self.model_fields_set:
            msg = "`version` and `on_cancel` go with `workflow` (a child run)"
            raise ValueError(msg)
        if self.wait is None:
            missing = [n for n in ("service", "action") if getattr(self, n) is None]
            if missing:
                msg = (
                    f"`{'` and `'.join(missing)}` required: a step calls a service (`service` "
                    "and `action`), runs a workflow (`workflow`) or waits for a signal (`wait`)"
                )
                raise ValueError(msg)
            return self
        extra = [
            name
            for name in ("service", "action", "input", "compensate", "fallback")
            if getattr(self, name) is not None
        ]
        if extra:
            msg = f"a `wait` step calls no service: drop {', '.join(extra)}"
            raise ValueError(msg)
        return self


class WorkflowSpec(_Spec):
    """A workflow as written in a definition."""

    name: str = Field(pattern=_NAME)
    version: int = Field(default=1, ge=1)
    description: str = ""
    timeout: Duration | None = None
    max_parallel: int = Field(default=0, ge=0, description="0 means no limit.")
    concurrency: ConcurrencySpec | None = Field(
        default=None, description="Runs in progress at once per key (flow control)."
    )
    steps: list[StepSpec] = Field(min_length=1)
    output: Any = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Compiled `RetrySpec`."""

    max_attempts: int = 1
    backoff_ms: int = 200
    max_backoff_ms: int = 30_000
    multiplier: float = 2.0
    jitter: float = 0.2


@dataclass(frozen=True, slots=True)
class Compensation:
    """Compiled `CompensateSpec`."""

    service: str
    action: str
    input: Template
    timeout_ms: int | None = None
    retry: RetryPolicy = RetryPolicy()
    #: ``after: attempted``: also undo a step that did not complete once an attempt went out.
    attempted: bool = False


@dataclass(frozen=True, slots=True)
class Fallback:
    """Compiled `FallbackSpec`: the service, action and input used instead, and how the
    fallback's work is undone (None: as the step's, by the fallback's service)."""

    service: str
    action: str
    input: Template
    compensate: Compensation | None = None


@dataclass(frozen=True, slots=True)
class Concurrency:
    """Compiled `ConcurrencySpec`."""

    key: Template
    limit: int


@dataclass(frozen=True, slots=True)
class Child:
    """What a `workflow` step runs: the workflow (its latest version unless `version`),
    and what becomes of the child run when the parent stops waiting for it."""

    workflow: str
    version: int | None = None
    on_cancel: str = "cancel"


@dataclass(slots=True)
class Step:
    """One compiled step (part of a plan: never changed once built)."""

    id: str
    service: str
    action: str
    depends_on: tuple[str, ...]
    input: Template
    when: Condition | None
    timeout_ms: int | None
    retry: RetryPolicy
    compensate: Compensation | None
    fallback: Fallback | None = None
    #: The signal a `wait` step waits for (its `service` and `action` are empty).
    wait: str | None = None
    #: The workflow a `workflow` step runs as a child run (its `service` is
    #: ``workflow.<name>``, its action ``run``, its compensation that of the child).
    child: Child | None = None
    #: A `wait` step's condition on the signal (`event`) and the run: what it takes.
    wait_match: Condition | None = None
    #: A `wait` step's correlation key, rendered from the run when it starts waiting.
    wait_key: Template | None = None
    #: At most so many attempts in flight at once per key value, across runs.
    concurrency: Concurrency | None = None


@dataclass(frozen=True, slots=True)
class Workflow:
    """A compiled workflow: the execution plan the engine follows."""

    name: str
    version: int
    steps: Mapping[str, Step]
    order: tuple[str, ...]
    dependants: Mapping[str, tuple[str, ...]]
    max_parallel: int
    timeout_ms: int | None
    output: Template | None
    description: str = ""
    roots: tuple[str, ...] = field(default=())
    #: Each step's place in `order`: steps are always examined in this order.
    position: Mapping[str, int] = field(default_factory=dict)
    #: The canonical JSON of the definition (see the module docstring): enough to rebuild
    #: this plan with `workflow_from_json`. Empty for a plan built by hand.
    spec_json: bytes = field(default=b"", repr=False, compare=False)
    #: BLAKE2b-128 of `spec_json`, in hex: equal hashes, equal definitions.
    content_hash: str = ""
    #: Runs in progress at once per key (None: no limit).
    concurrency: Concurrency | None = None
    #: The steps with a concurrency key of their own, in plan order.
    keyed_steps: tuple[str, ...] = ()
    #: The steps undone once attempted (a compensation, or the fallback's, ``after:
    #: attempted``): the service each of their attempts went to is kept in their state.
    undo_attempts: frozenset[str] = frozenset()

    @property
    def key(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"


_DEFAULT_INPUT = Template.compile("payload")


def compile_workflow(spec: WorkflowSpec) -> Workflow:
    """Validate a spec's graph, expressions and durations; return its plan, which carries
    the spec's canonical JSON and content hash."""
    document = spec.model_dump(mode="json", exclude_unset=True)
    return _compile(spec, _canonical_json(spec.name, document))


def workflow_from_json(data: bytes | str, source: str = "<json>") -> Workflow:
    """Rebuild a compiled workflow from its `Workflow.spec_json`.

    Raises `DefinitionError` naming `source` when `data` is not one valid definition.
    """
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        msg = f"not valid JSON: {exc}"
        raise DefinitionError(msg, source=source) from None
    if not isinstance(document, dict):
        msg = f"a JSON {type(document).__name__}, expected one workflow object"
        raise DefinitionError(msg, source=source)
    return _parse_one(document, 0, source)


def _canonical_json(name: str, document: Any) -> bytes:
    try:
        return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:
        msg = f"cannot be stored as JSON ({exc}); use only JSON values in `input` and `output`"
        raise DefinitionError(msg, workflow=name) from None


def _compile(spec: WorkflowSpec, spec_json: bytes) -> Workflow:
    name = spec.name
    by_id: dict[str, StepSpec] = {}
    graph: dict[str, list[str]] = {}
    for step in spec.steps:
        if step.id in by_id:
            raise DuplicateStep(name, step.id)
        by_id[step.id] = step
        graph[step.id] = step.depends_on
    order, dependants = _topological_order(name, graph)
    steps = {step_id: _compile_step(name, by_id[step_id]) for step_id in order}
    return Workflow(
        name=name,
        version=spec.version,
        steps=steps,
        order=tuple(order),
        dependants={step_id: tuple(after) for step_id, after in dependants.items()},
        max_parallel=spec.max_parallel,
        timeout_ms=_duration(name, None, "timeout", spec.timeout),
        output=_template(name, None, "output", spec.output) if spec.output is not None else None,
        description=spec.description,
        roots=tuple(step_id for step_id in order if not graph[step_id]),
        position={step_id: index for index, step_id in enumerate(order)},
        spec_json=spec_json,
        content_hash=hashlib.blake2b(spec_json, digest_size=16).hexdigest(),
        concurrency=_concurrency(name, spec.concurrency),
        keyed_steps=tuple(sid for sid in order if steps[sid].concurrency is not None),
        undo_attempts=frozenset(sid for sid in order if _undoes_attempts(steps[sid])),
    )


def _undoes_attempts(step: Step) -> bool:
    undos = (step.compensate, step.fallback.compensate if step.fallback else None)
    return any(undo is not None and undo.attempted for undo in undos)


def _concurrency(
    name: str, spec: ConcurrencySpec | None, step: str | None = None
) -> Concurrency | None:
    if spec is None:
        return None
    return Concurrency(_template(name, step, "concurrency.key", spec.key), spec.limit)


def _topological_order(
    name: str, graph: Mapping[str, list[str]]
) -> tuple[list[str], dict[str, list[str]]]:
    """Steps in dependency order (Kahn's algorithm, ties in definition order), and each
    step's dependants (in definition order).

    A plan of a thousand steps is built in well under a millisecond this way; only when
    the graph has a cycle does `graphlib` walk it, to name the cycle in the error.
    """
    waiting = {step: len(deps) for step, deps in graph.items()}
    dependants: dict[str, list[str]] = {step: [] for step in graph}
    for step, deps in graph.items():
        for dep in deps:
            after = dependants.get(dep)
            if after is None:
                raise UnknownDependency(name, step, dep, list(graph))
            after.append(step)
    order = [step for step, count in waiting.items() if not count]
    append = order.append
    for step in order:  # grows as steps become free
        for dependant in dependants[step]:
            count = waiting[dependant] - 1
            waiting[dependant] = count
            if not count:
                append(dependant)
    if len(order) == len(graph):
        return order, dependants
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        # graphlib reports the cycle walking dependencies backwards; print it forwards.
        raise CyclicDependency(name, list(reversed(exc.args[1]))) from None
    msg = "dependency graph could not be ordered"  # unreachable: Kahn stalls only on cycles
    raise DefinitionError(msg, workflow=name)


def _compile_step(name: str, spec: StepSpec) -> Step:
    timeout_ms = None if spec.timeout is None else _duration(name, spec.id, "timeout", spec.timeout)
    step_input = (
        _DEFAULT_INPUT if spec.input is None else _template(name, spec.id, "input", spec.input)
    )
    compensate = None
    child = None
    service, action = spec.service or "", spec.action or ""
    if spec.workflow is not None:
        child = Child(spec.workflow, spec.version, spec.on_cancel)
        service, action = CHILD_PREFIX + spec.workflow, "run"
        # The child run is undone by a `compensate` control, retried as compensations are.
        compensate = Compensation(
            service, "compensate", _DEFAULT_INPUT, timeout_ms, _DEFAULT_COMPENSATE_POLICY
        )
    if spec.compensate is not None:
        compensate = _compensation(
            name, spec.id, "compensate", spec.compensate, spec.service or "", timeout_ms
        )
    fallback = None
    if (alt := spec.fallback) is not None:
        fallback = Fallback(
            service=alt.service,
            action=alt.action or spec.action or "",
            input=step_input
            if alt.input is None
            else _template(name, spec.id, "fallback.input", alt.input),
            compensate=None
            if alt.compensate is None
            else _compensation(
                name, spec.id, "fallback.compensate", alt.compensate, alt.service, timeout_ms
            ),
        )
    when = None
    if spec.when is not None:
        try:
            when = Condition.compile(spec.when)
        except ExpressionError as exc:
            raise BadExpression(name, spec.id, "when", spec.when, str(exc)) from None
    # Positional and with the common defaults short-cut: plans of thousands of steps are
    # built at start-up and on every `validate`.
    return Step(
        spec.id,
        service,
        action,
        tuple(spec.depends_on),
        step_input,
        when,
        timeout_ms,
        _retry_policy(name, spec.id, spec.retry),
        compensate,
        fallback,
        None if spec.wait is None else spec.wait.event,
        child,
        *_wait_expressions(name, spec),
        _concurrency(name, spec.concurrency, spec.id),
    )


def _wait_expressions(name: str, spec: StepSpec) -> tuple[Condition | None, Template | None]:
    """A `wait` step's compiled `match` and `key`."""
    wait = spec.wait
    if wait is None:
        return None, None
    match = None
    if wait.match is not None:
        try:
            match = Condition.compile(wait.match)
        except ExpressionError as exc:
            raise BadExpression(name, spec.id, "wait.match", wait.match, str(exc)) from None
    key = _template(name, spec.id, "wait.key", wait.key) if wait.key is not None else None
    return match, key


def _compensation(
    name: str,
    step: str,
    where: str,
    undo: CompensateSpec,
    service: str,
    timeout_ms: int | None,
) -> Compensation:
    """A compiled `CompensateSpec`: its service defaults to `service`, its timeout to the
    step's."""
    return Compensation(
        service=undo.service or service,
        action=undo.action,
        input=_template(name, step, f"{where}.input", undo.input)
        if undo.input is not None
        else _DEFAULT_INPUT,
        timeout_ms=timeout_ms
        if undo.timeout is None
        else _duration(name, step, f"{where}.timeout", undo.timeout),
        retry=_retry_policy(name, step, undo.retry),
        attempted=undo.after == "attempted",
    )


def _retry_policy(name: str, step: str, retry: RetrySpec) -> RetryPolicy:
    if retry is _DEFAULT_RETRY_SPEC and _DEFAULT_RETRY is not None:
        return _DEFAULT_RETRY
    backoff = _duration(name, step, "retry.backoff", retry.backoff) or 0
    max_backoff = _duration(name, step, "retry.max_backoff", retry.max_backoff) or 0
    return RetryPolicy(
        max_attempts=retry.max_attempts,
        backoff_ms=backoff,
        max_backoff_ms=max(backoff, max_backoff),
        multiplier=retry.multiplier,
        jitter=retry.jitter,
    )


_DEFAULT_RETRY: RetryPolicy | None = None  # set at the end of the module


def _template(name: str, step: str | None, where: str, source: Any) -> Template:
    try:
        return Template.compile(source)
    except ExpressionError as exc:
        bad = _first_bad_expression(source)
        raise BadExpression(name, step, where, bad, str(exc)) from None


def _first_bad_expression(source: Any) -> str:
    if isinstance(source, str):
        return source
    values = (
        source.values()
        if isinstance(source, Mapping)
        else source
        if isinstance(source, list)
        else []
    )
    for value in values:
        try:
            Template.compile(value)
        except ExpressionError:
            return _first_bad_expression(value)
    return repr(source)


def _duration(name: str, step: str | None, where: str, value: Duration | None) -> int | None:
    if value is None:
        return None
    millis = parse_duration_ms(value)
    if millis is None:
        raise BadDuration(name, step, where, value)
    return millis


def parse_workflows(document: Any, source: str = "<memory>") -> list[Workflow]:
    """Compile the workflows in one parsed YAML document.

    A document is one workflow mapping, a list of them, or ``{"workflows": [...]}``
    (beside which ``schedules: [...]`` may stand: `mediator.core.schedules`).
    """
    if isinstance(document, Mapping) and set(document) <= {"workflows", "schedules"}:
        document = document.get("workflows") or []
    items = document if isinstance(document, list) else [document]
    return [_parse_one(item, index, source) for index, item in enumerate(items)]


def _parse_one(item: Any, index: int, source: str) -> Workflow:
    if not isinstance(item, Mapping):
        msg = f"entry {index} is a {type(item).__name__}, expected a workflow mapping"
        raise DefinitionError(msg, source=source)
    label = str(item.get("name") or f"#{index}")
    try:
        spec = WorkflowSpec.model_validate(item)
    except ValidationError as exc:
        raise DefinitionError(_describe(exc, item), source=source, workflow=label) from None
    try:
        return _compile(spec, _document_json(spec, item))
    except DefinitionError as exc:
        raise exc.located(source) from None


def _document_json(spec: WorkflowSpec, item: Mapping[str, Any]) -> bytes:
    """The canonical JSON of a spec, from the mapping it was validated from.

    Serialising the validated mapping as it is takes a tenth of the time pydantic needs to
    dump the model again (a 1,000-step plan is built at every start). It is the definition
    exactly as written, where a dump writes numbers in their field's type (``2.0`` for a
    float field given ``2``); both survive `workflow_from_json` byte for byte. A mapping that
    JSON cannot hold as it is (non-string keys, say) goes the slow way, through the model.
    """
    if type(item) is dict:
        try:
            return orjson.dumps(item, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass
    return _canonical_json(spec.name, spec.model_dump(mode="json", exclude_unset=True))


def _describe(exc: ValidationError, item: Mapping[str, Any]) -> str:
    return "; ".join(describe_error(error, item) for error in exc.errors()[:5])


def describe_error(error: Any, item: Mapping[str, Any]) -> str:
    """One schema error of a workflow mapping, naming the step it is in by its id."""
    loc = list(error["loc"])
    where = ".".join(str(part) for part in loc)
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        steps = item.get("steps") or []
        step = steps[loc[1]] if loc[1] < len(steps) else None
        step_id = step.get("id") if isinstance(step, Mapping) else None
        rest = "".join(f" {part}" if i == 0 else f".{part}" for i, part in enumerate(loc[2:]))
        where = f"step {step_id!r}{rest}" if step_id else f"steps[{loc[1]}]{rest}"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


_DEFAULT_RETRY = _retry_policy("", "", _DEFAULT_RETRY_SPEC)
_DEFAULT_COMPENSATE_POLICY = _retry_policy("", "", _DEFAULT_COMPENSATE_RETRY)
