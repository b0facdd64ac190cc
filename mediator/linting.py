"""Checking workflow files as ``mediator validate`` does: every problem of every workflow,
each with the file and line it is at, where loading (`mediator.definitions.load_file`)
stops at the first."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mediator.core.problems import compile_problems
from mediator.core.schedules import parse_schedules
from mediator.core.workflow import Workflow, WorkflowSpec, describe_error, parse_workflows
from mediator.errors import DefinitionError

__all__ = ["Problem", "check_file"]

_STEP = re.compile(r"step '([^']+)'(?: (\w+))?")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a workflow file."""

    path: Path
    line: int | None
    workflow: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else str(self.path)
        named = f"workflow {self.workflow!r}: " if self.workflow else ""
        return f"{where}: {named}{self.message}"


def check_file(path: Path) -> tuple[list[Workflow], list[Problem]]:
    """The workflows of `path` that compile, and every problem of those that do not."""
    try:
        text = path.read_text()
        root = yaml.compose(text)
        document = yaml.safe_load(text)
    except OSError as exc:
        return [], [Problem(path, None, None, f"cannot read: {exc.strerror or exc}")]
    except UnicodeDecodeError as exc:
        return [], [Problem(path, None, None, f"not UTF-8 text: {exc.reason}")]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        detail = " ".join(str(getattr(exc, "problem", None) or exc).split())
        return [], [Problem(path, line, None, f"not valid YAML: {detail}")]
    items, nodes = _entries(document, root)
    workflows: list[Workflow] = []
    problems: list[Problem] = []
    for index, (item, node) in enumerate(zip(items, nodes, strict=True)):
        label = str(item.get("name") or f"#{index}") if isinstance(item, Mapping) else None
        try:
            spec_errors = _schema_errors(item)
        except DefinitionError as exc:
            problems.append(Problem(path, _line(node), label, exc.detail))
            continue
        if spec_errors:
            problems += [
                Problem(path, _line(_at(node, loc)) or _line(node), label, message)
                for loc, message in spec_errors
            ]
            continue
        try:
            workflows += parse_workflows(item, source=str(path))
        except DefinitionError as first:
            every = compile_problems(WorkflowSpec.model_validate(item)) or [first]
            for error in every:
                line = _line(_step_field(node, error.detail))
                problems.append(Problem(path, line or _line(node), label, error.detail))
    if isinstance(document, Mapping) and "schedules" in document:
        try:
            parse_schedules(document, source=str(path))
        except DefinitionError as exc:
            problems.append(Problem(path, _line(_value(root, "schedules")), None, exc.detail))
    return workflows, problems


def _entries(document: Any, root: yaml.Node | None) -> tuple[list[Any], list[yaml.Node | None]]:
    """The workflow entries of a document (one mapping, a list, or ``{workflows: [...]}``)
    and the YAML node of each."""
    if isinstance(document, Mapping) and set(document) <= {"workflows", "schedules"}:
        document = document.get("workflows") or []
        root = _value(root, "workflows")
    if isinstance(document, list):
        children = root.value if isinstance(root, yaml.SequenceNode) else []
        return document, [*children, *[None] * (len(document) - len(children))]
    return [document], [root]


def _schema_errors(item: Any) -> list[tuple[tuple[Any, ...], str]]:
    """Every schema error of one entry: where (its location) and what."""
    if not isinstance(item, Mapping):
        msg = f"a {type(item).__name__}, expected a workflow mapping"
        raise DefinitionError(msg)
    try:
        WorkflowSpec.model_validate(item)
    except ValidationError as exc:
        return [(tuple(e["loc"]), describe_error(e, item)) for e in exc.errors()]
    return []


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def _value(node: yaml.Node | None, key: Any) -> yaml.Node | None:
    """The child of a mapping or sequence node at `key`."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.value == str(key):
                found: yaml.Node = v
                return found
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
        child: yaml.Node = node.value[key]
        return child
    return None


def _at(node: yaml.Node | None, loc: Sequence[Any]) -> yaml.Node | None:
    """The deepest node along `loc` (a pydantic error location) that exists."""
    found = node
    for key in loc:
        child = _value(found, key)
        if child is None:
            break
        found = child
    return found


def _step_field(node: yaml.Node | None, detail: str) -> yaml.Node | None:
    """The node of the step (and its field) an error's text names, if any."""
    named = _STEP.search(detail)
    if named is None:
        return None
    step = _step_node(node, named.group(1))
    field = _value(step, named.group(2)) if named.group(2) else None
    return field or step


def _step_node(node: yaml.Node | None, step_id: str) -> yaml.Node | None:
    for step in _children(_value(node, "steps")):
        if isinstance(step, yaml.MappingNode):
            ident = _value(step, "id")
            if ident is not None and ident.value == step_id:
                return step
    return None


def _children(node: yaml.Node | None) -> Iterator[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        yield from node.value
