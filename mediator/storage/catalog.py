"""Workflow definitions kept in Redis, so that a run outlives the file it started from.

A rolling deploy can remove a workflow file, or replace it with a new version, while runs of
the old version are still in flight. Every replica publishes the definitions it loaded when
it starts; a replica that meets a run of a version it did not load reads that version back
from Redis, rebuilds the plan and keeps it in memory.

Each definition is one string key, ``<prefix>:def:<name>@<version>``, written once (SET NX),
never changed and never expired. Its value is a small JSON document::

    {"content_hash": "<32 hex digits>", "format": 1, "spec": {<the definition>}}

``spec`` is the workflow's canonical spec JSON (`Workflow.spec_json`: the definition as
written, keys sorted) and ``content_hash`` its BLAKE2b-128 (`Workflow.content_hash`). A file
edited under a version Redis already holds is refused with `DefinitionConflict`: runs of that
version may still be following the stored plan.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import orjson
from redis.asyncio import Redis

from mediator.core.workflow import Workflow, workflow_from_json
from mediator.definitions import Definitions
from mediator.errors import (
    DefinitionConflict,
    DefinitionError,
    StateUnavailable,
    UnknownWorkflow,
)
from mediator.storage.errors import redis_errors
from mediator.storage.keys import Keys

__all__ = ["DOCUMENT_FORMAT", "DefinitionStore"]

log = logging.getLogger("mediator.definition_store")

#: The ``format`` of the stored document; a reader refuses formats it does not know.
DOCUMENT_FORMAT = 1

DefinitionKey = tuple[str, int]


def _document(workflow: Workflow) -> bytes:
    """The stored value of `workflow`, spliced together: its spec JSON is already canonical."""
    return b'{"content_hash":"%s","format":%d,"spec":%s}' % (
        workflow.content_hash.encode(),
        DOCUMENT_FORMAT,
        workflow.spec_json,
    )


class DefinitionStore:
    """The loaded definitions, backed by the ones every replica published to Redis.

    Definitions read back from Redis are kept in memory (at most `max_cached` of them, the
    oldest dropped first): a definition never changes once stored, so the copy never goes
    stale.
    """

    def __init__(
        self, redis: Redis, keys: Keys, definitions: Definitions, *, max_cached: int = 256
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.definitions = definitions
        self.max_cached = max_cached
        self._stored: dict[DefinitionKey, Workflow] = {}

    async def publish(self) -> None:
        """Store every loaded definition that Redis does not hold yet, in one round trip.

        Raises `DefinitionConflict` when Redis holds one of them with other content, and
        `StateUnavailable` when Redis cannot be reached.
        """
        workflows = [workflow for workflow in self.definitions if workflow.spec_json]
        if unpublishable := len(self.definitions) - len(workflows):
            # Only a plan built by hand, in Python, has no spec: nothing could rebuild it.
            log.warning("%d definitions have no spec JSON and are not published", unpublishable)
        if not workflows:
            return
        with redis_errors("publishing workflow definitions"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for workflow in workflows:
                    key = self.keys.definition(workflow.name, workflow.version)
                    pipe.set(key, _document(workflow), nx=True)
                    pipe.get(key)  # ours, or the one stored before
                replies = await pipe.execute()
        conflicts = []
        for workflow, stored in zip(workflows, replies[1::2], strict=True):
            if stored is None:
                continue  # deleted by hand since; the next replica to start writes it again
            key = self.keys.definition(workflow.name, workflow.version)
            stored_hash = _parse(key, stored)[0]
            if stored_hash != workflow.content_hash:
                conflicts.append(
                    DefinitionConflict(
                        workflow.name, workflow.version, workflow.content_hash, stored_hash
                    )
                )
        if conflicts:
            if len(conflicts) > 1:
                log.error("%d loaded definitions conflict with stored ones", len(conflicts))
                for conflict in conflicts[1:]:
                    log.error("%s", conflict)
            raise conflicts[0]
        log.info("published %d workflow definitions", len(workflows))

    def get_local(self, name: str, version: int) -> Workflow | None:
        """The definition if it is loaded or already read back from Redis, else None."""
        found = self.definitions.find(name, version)
        if found is None:
            found = self._stored.get((name, version))
        return found

    async def get(self, name: str, version: int) -> Workflow:
        """The definition of `name` at `version`: loaded, or read back from Redis.

        Raises `UnknownWorkflow` when no replica ever published it, and `StateUnavailable`
        when Redis cannot be reached or holds something that is not a definition.
        """
        found = self.get_local(name, version)
        if found is not None:
            return found
        key = self.keys.definition(name, version)
        with redis_errors(f"reading stored definition {key}"):
            stored = await self.redis.get(key)
        if stored is None:
            raise UnknownWorkflow(name, version, sorted(self.definitions.names()))
        return self._remember((name, version), _rebuild(key, name, version, stored))

    async def get_many(self, wanted: Iterable[DefinitionKey]) -> dict[DefinitionKey, Workflow]:
        """The definitions of several ``(name, version)`` pairs; those not at hand are read
        from Redis in one round trip.

        Pairs no replica ever published are left out of the result. So is a stored value that
        cannot be rebuilt (it is logged), so one bad key does not hold up the whole batch;
        `get` raises the reason. Raises `StateUnavailable` when Redis cannot be reached.
        """
        found: dict[DefinitionKey, Workflow] = {}
        missing: list[DefinitionKey] = []
        for name, version in dict.fromkeys(wanted):
            workflow = self.get_local(name, version)
            if workflow is None:
                missing.append((name, version))
            else:
                found[name, version] = workflow
        if not missing:
            return found
        keys = [self.keys.definition(name, version) for name, version in missing]
        with redis_errors(f"reading {len(keys)} stored definitions"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.get(key)
                replies = await pipe.execute()
        for (name, version), key, stored in zip(missing, keys, replies, strict=True):
            if stored is None:
                continue
            try:
                workflow = _rebuild(key, name, version, stored)
            except StateUnavailable as exc:
                log.error("%s", exc, extra={"workflow": name, "version": version})
                continue
            found[name, version] = self._remember((name, version), workflow)
        return found

    def _remember(self, key: DefinitionKey, workflow: Workflow) -> Workflow:
        if key not in self._stored and len(self._stored) >= self.max_cached:
            del self._stored[next(iter(self._stored))]
        self._stored[key] = workflow
        return workflow


def _parse(key: str, stored: bytes | str) -> tuple[str, Any]:
    """The content hash and spec of a stored document."""
    try:
        document = orjson.loads(stored)
    except orjson.JSONDecodeError as exc:
        raise _corrupt(key, f"not JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise _corrupt(key, f"a JSON {type(document).__name__}, not an object")
    if document.get("format") != DOCUMENT_FORMAT:
        found = document.get("format")
        raise _corrupt(key, f"format {found!r}, this release reads format {DOCUMENT_FORMAT}")
    content_hash, spec = document.get("content_hash"), document.get("spec")
    if not isinstance(content_hash, str) or not isinstance(spec, dict):
        raise _corrupt(key, "no `content_hash` string or no `spec` object")
    return content_hash, spec


def _rebuild(key: str, name: str, version: int, stored: bytes | str) -> Workflow:
    """The compiled workflow in a stored document, checked against its key and hash."""
    content_hash, spec = _parse(key, stored)
    try:
        workflow = workflow_from_json(orjson.dumps(spec), source=key)
    except DefinitionError as exc:
        raise _corrupt(key, f"its spec does not compile: {exc}") from exc
    if (workflow.name, workflow.version) != (name, version):
        raise _corrupt(key, f"it holds {workflow.key}")
    if workflow.content_hash != content_hash:
        raise _corrupt(
            key, f"its spec hashes to {workflow.content_hash}, the document says {content_hash}"
        )
    return workflow


def _corrupt(key: str, reason: str) -> StateUnavailable:
    return StateUnavailable(
        f"stored definition {key} is unusable: {reason}; it was changed outside the mediator. "
        "Delete the key, and restart a replica that loads this version to store it again"
    )
