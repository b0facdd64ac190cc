"""Every reason a workflow does not compile, for ``mediator validate``: compiling
(`mediator.core.workflow`) stops at the first, which is what loading needs."""

from __future__ import annotations

import functools
from collections.abc import Callable

from mediator.core.workflow import (
    WorkflowSpec,
    _compile_step,
    _duration,
    _template,
    _topological_order,
)
from mediator.errors import DefinitionError, DuplicateStep, UnknownDependency

__all__ = ["compile_problems"]


def compile_problems(spec: WorkflowSpec) -> list[DefinitionError]:
    """Every reason `spec` (valid against the schema) does not compile, where compiling
    stops at the first: each step's, the workflow's own, then its graph's."""
    name = spec.name
    found: list[DefinitionError] = []
    checks: list[Callable[[], object]] = [
        *(functools.partial(_compile_step, name, step) for step in spec.steps),
        functools.partial(_duration, name, None, "timeout", spec.timeout),
    ]
    if spec.output is not None:
        checks.append(functools.partial(_template, name, None, "output", spec.output))
    for check in checks:
        try:
            check()
        except DefinitionError as exc:
            found.append(exc)
    graph: dict[str, list[str]] = {}
    for step in spec.steps:
        if step.id in graph:
            found.append(DuplicateStep(name, step.id))
        graph[step.id] = step.depends_on
    for sid, deps in graph.items():
        found += [UnknownDependency(name, sid, d, list(graph)) for d in deps if d not in graph]
    if not any(isinstance(e, UnknownDependency | DuplicateStep) for e in found):
        try:
            _topological_order(name, graph)
        except DefinitionError as exc:
            found.append(exc)
    return found
