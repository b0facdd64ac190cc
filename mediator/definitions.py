"""Workflow definitions loaded from YAML files, and the registry of the loaded ones.

The pure side (the YAML schema, validation and the compiled plan) is `mediator.core.workflow`;
this module reads files and keeps what was loaded, by name and version.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from mediator.core.schedules import Schedule, parse_schedules
from mediator.core.workflow import Workflow, parse_workflows
from mediator.errors import DefinitionError, UnknownWorkflow

__all__ = ["Definitions", "load_file", "load_paths", "read_document", "workflow_files"]


#: libyaml's safe loader when PyYAML was built with it (the wheels are): ~10x faster.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_file(path: Path) -> list[Workflow]:
    """Compile every workflow in one YAML file."""
    return parse_workflows(read_document(path), source=str(path))


def read_document(path: Path) -> Any:
    """One YAML file, parsed."""
    try:
        document = yaml.load(path.read_text(), Loader=_YAML_LOADER)
    except OSError as exc:
        msg = f"cannot read: {exc.strerror or exc}"
        raise DefinitionError(msg, source=str(path)) from None
    except UnicodeDecodeError as exc:
        msg = f"not UTF-8 text: {exc.reason} at byte {exc.start}"
        raise DefinitionError(msg, source=str(path)) from None
    except yaml.YAMLError as exc:
        msg = f"not valid YAML: {exc}".replace("\n", " ")
        raise DefinitionError(msg, source=str(path)) from None
    return document


def workflow_files(path: Path) -> list[Path]:
    """`path` itself, or the ``*.yaml``/``*.yml`` files of a directory, sorted."""
    if path.is_dir():
        return sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
    return [path]


def load_paths(paths: Iterable[Path]) -> Definitions:
    """Load YAML files, and the ``*.yaml``/``*.yml`` files of directories, into `Definitions`."""
    definitions = Definitions()
    for path in paths:
        for file in workflow_files(path):
            document = read_document(file)
            for workflow in parse_workflows(document, source=str(file)):
                definitions.add(workflow, source=str(file))
            for schedule in parse_schedules(document, source=str(file)):
                definitions.add_schedule(schedule, source=str(file))
    definitions.check_children()
    for schedule in definitions.schedules.values():
        if schedule.workflow not in definitions.names():
            msg = (
                f"schedule {schedule.name!r} starts workflow {schedule.workflow!r}, which is "
                f"not loaded; loaded: {sorted(definitions.names())}"
            )
            raise DefinitionError(msg)
    return definitions


class Definitions:
    """The loaded workflows, by name and version; the latest version serves new requests."""

    def __init__(self, workflows: Iterable[Workflow] = ()) -> None:
        self._by_key: dict[tuple[str, int], Workflow] = {}
        self._latest: dict[str, Workflow] = {}
        #: The schedules loaded with the workflows, by name.
        self.schedules: dict[str, Schedule] = {}
        for workflow in workflows:
            self.add(workflow)

    def add_schedule(self, schedule: Schedule, source: str | None = None) -> None:
        """Register a schedule; the same name twice is an error."""
        if schedule.name in self.schedules:
            msg = f"schedule {schedule.name!r} is defined twice"
            raise DefinitionError(msg, source=source)
        self.schedules[schedule.name] = schedule

    def add(self, workflow: Workflow, source: str | None = None) -> None:
        """Register a workflow; the same name and version twice is an error."""
        key = (workflow.name, workflow.version)
        if key in self._by_key:
            msg = f"version {workflow.version} is defined twice; bump `version` to change it"
            raise DefinitionError(msg, source=source, workflow=workflow.name)
        self._by_key[key] = workflow
        latest = self._latest.get(workflow.name)
        if latest is None or latest.version < workflow.version:
            self._latest[workflow.name] = workflow

    def services(self) -> set[str]:
        """Every service these workflows talk to: steps, compensations and fallbacks."""
        names = set()
        for workflow in self:
            for step in workflow.steps.values():
                if step.child is not None:
                    continue  # a child run's step calls no service
                if step.wait is None:  # a wait step calls no service
                    names.add(step.service)
                if step.compensate is not None:
                    names.add(step.compensate.service)
                if step.fallback is not None:
                    names.add(step.fallback.service)
        return names

    def child_services(self) -> set[str]:
        """The services child runs reply as (``workflow.<name>``): signed like services."""
        return {step.service for workflow in self for step in workflow.steps.values() if step.child}

    def check_children(self) -> None:
        """Every `workflow` step runs a loaded workflow (at a loaded version, if it names
        one), and no workflow runs itself, directly or through others: `DefinitionError`
        naming the step, or the cycle."""
        calls: dict[str, set[str]] = {}
        for workflow in self:
            for step in workflow.steps.values():
                child = step.child
                if child is None:
                    continue
                if child.workflow not in self._latest or (
                    child.version is not None and self.find(child.workflow, child.version) is None
                ):
                    at = f" version {child.version}" if child.version is not None else ""
                    msg = (
                        f"step {step.id!r} runs workflow {child.workflow!r}{at}, which is not "
                        f"loaded; loaded: {sorted(self.names())}"
                    )
                    raise DefinitionError(msg, workflow=workflow.name)
                calls.setdefault(workflow.name, set()).add(child.workflow)
        cycle = _cycle(calls)
        if cycle:
            msg = (
                "workflows run each other as child runs in a cycle: "
                + " -> ".join(cycle)
                + "; a run would start runs for ever"
            )
            raise DefinitionError(msg)

    def find(self, name: str, version: int) -> Workflow | None:
        """The loaded workflow `name` at `version`, or None."""
        return self._by_key.get((name, version))

    def get(self, name: str, version: int | None = None) -> Workflow:
        """The named workflow (its latest version unless one is given)."""
        found = self._latest.get(name) if version is None else self._by_key.get((name, version))
        if found is None:
            raise UnknownWorkflow(name, version, sorted(self.names()))
        return found

    def names(self) -> list[str]:
        """Names of the loaded workflows."""
        return list(self._latest)

    def __iter__(self) -> Any:
        return iter(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)


def _cycle(calls: dict[str, set[str]]) -> list[str]:
    """A cycle in the graph `calls` (workflow -> the workflows it runs), as the path that
    closes it (``a -> b -> a``); empty when there is none."""
    done: set[str] = set()
    for start in sorted(calls):
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, list[str]]] = [(start, sorted(calls.get(start, ())))]
        path.append(start)
        on_path.add(start)
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
                continue
            nxt = todo.pop(0)
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt in done:
                continue
            path.append(nxt)
            on_path.add(nxt)
            stack.append((nxt, sorted(calls.get(nxt, ()))))
    return []
