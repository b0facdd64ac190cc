"""Starting runs: a request decoded and checked (payload, size, signature, reply_to),
its run started and committed, a duplicate answered, a refusal told to its requester."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence

import orjson

from mediator import clock
from mediator.clock import now_ms
from mediator.core.engine import Transition, result_of
from mediator.core.signing import SignatureError
from mediator.core.state import WorkflowState
from mediator.core.workflow import Workflow
from mediator.errors import UnknownWorkflow
from mediator.runtime.advance import Advance
from mediator.runtime.context import (
    BatchOutput,
    Record,
    Start,
)
from mediator.runtime.messages import Message
from mediator.storage.keys import workflow_id_for
from mediator.storage.store import CommitOutcome, CommitResult, Tombstone
from topics.events import (
    RequestEvent,
    WorkflowStatus,
)
from topics.headers import TRACEPARENT, parse_traceparent, w3c_trace_id

__all__ = ["Requests"]

log = logging.getLogger("mediator.runtime")


class Requests(Advance):
    """Starts a run for each request, or answers its duplicate."""

    async def handle_requests(self, records: Sequence[Record]) -> None:
        """Start a workflow for each request; re-send the result of finished duplicates."""
        received = time.perf_counter()
        now = now_ms()
        out = BatchOutput()
        starts: list[Start] = []
        for record in records:
            start = self._start(record, now, out)
            if start is not None:
                starts.append(start)
        taken = await self._prepare_sends([(s.workflow, s.transition, None) for s in starts], now)
        for start in starts:
            start.commit, start.messages = self._commit_of(
                start.workflow, start.transition, None, now, [start.request]
            )
        since = clock.monotonic()
        results = await self.store.commit_many([s.commit for s in starts if s.commit], now)
        outgoing: list[Message] = []
        committed: list[Transition] = []
        stored: list[tuple[Workflow | None, WorkflowState]] = []
        found: list[tuple[Workflow | None, WorkflowState | None]] = []  # runs that existed
        for start, result in zip(starts, results, strict=True):
            assert start.commit is not None
            state = start.commit.state
            if result.outcome is CommitOutcome.COMMITTED:
                for message in start.messages:
                    message.lease = result.lease
                outgoing += start.messages
                self.cache.put(state)
                self._parked_count(start.transition)
                committed.append(start.transition)
                stored.append((start.workflow, state))
            else:
                found.append((start.workflow, result.current))
                if (answer := self._duplicate(start, result)) is not None:
                    out.direct.append(answer)
        self._observe(committed, now)
        await self.dispatcher.send(outgoing, since)
        self.overhead.add((time.perf_counter() - received) * 1000, len(starts) or 1)
        # A run that existed already (or was started twice in the batch), or ended at
        # once: the slots given to its start are not held by anything committed.
        await self._release_permits(self._unclaimed_permits(taken.permits, stored + found))
        await self._free_slots(self._unclaimed(taken.slots, stored), now)
        await self._keep_queue_places(taken.queued, stored, now)
        await self._flush(out)

    def _start(self, record: Record, now: int, out: BatchOutput) -> Start | None:
        """Decode and check one request and compute its first transition."""
        request: RequestEvent | None = self._decode(record, RequestEvent, out)
        if request is None:
            return None
        self.stats.requests += 1
        origin = f"{record.topic}/{record.partition}/{record.offset}"
        try:
            canonical = orjson.dumps(request.payload, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError as exc:
            reason = f"payload cannot be stored: {exc}"
            self._refuse(record, request, "invalid_payload", reason, origin, out)
            return None
        if (too_large := self._oversized(record, "request")) is not None:
            self._refuse(record, request, "payload_too_large", too_large, origin, out)
            return None
        client = None
        if self.requests_signed != "off":
            try:
                client = self._client(record)
            except SignatureError as exc:
                self.stats.bad_signatures += 1
                # Neither where the result goes nor a parent to answer is its to choose.
                request = request.model_copy(update={"reply_to": None, "parent": None})
                self._refuse(record, request, exc.code, f"rejected: {exc.reason}", origin, out)
                return None
        if request.parent is not None and not self._from_mediator(client):
            request = request.model_copy(update={"parent": None})
            reason = (
                "a request naming a parent run must come from the mediator (signed with its "
                "client key, signing.client)"
            )
            self._refuse(record, request, "forbidden", reason, origin, out)
            return None
        if request.reply_to and not self.limits.reply_to_allowed(
            request.reply_to, self.topics.results
        ):
            reason = (
                f"reply_to {request.reply_to!r} is not a topic results may go to "
                "(limits.reply_to_topics)"
            )
            request = request.model_copy(update={"reply_to": None})  # told on the results topic
            self._refuse(record, request, "reply_to_refused", reason, origin, out)
            return None
        depth = request.parent.depth if request.parent is not None else 0
        if depth > self.limits.max_child_depth:
            reason = (
                f"child run of {request.workflow!r} would be {depth} deep, past "
                f"limits.max_child_depth ({self.limits.max_child_depth})"
            )
            log.warning("request %s refused: %s", request.request_id, reason)
            self.stats.rejected_requests += 1
            out.direct.append(self._rejection(request, "child_depth_exceeded", reason, origin))
            return None
        try:
            workflow = self.definitions.definitions.get(request.workflow, request.version)
        except UnknownWorkflow as exc:
            self.stats.rejected_requests += 1
            log.warning(
                "request %s rejected: %s",
                request.request_id,
                exc,
                extra={
                    "request_id": request.request_id,
                    "workflow": request.workflow,
                    "trace_id": request.trace_id,
                    "code": "unknown_workflow",
                },
            )
            out.direct.append(self._rejection(request, "unknown_workflow", str(exc), origin))
            return None
        digest = hashlib.blake2b(request.workflow.encode() + b"\0" + canonical, digest_size=12)
        wid = workflow_id_for(request.request_id)
        trace_id, parent = trace_context(request, record.headers)
        transition = self.engine.start(workflow, request, wid, now, trace_id, parent)
        transition.state.fingerprint = digest.hexdigest()
        transition.state.origin = origin
        transition.state.client = client
        return Start(request, workflow, transition)

    def _from_mediator(self, client: str | None) -> bool:
        """Whether a request signed by `client` (None: unsigned) may name a parent run:
        only the mediator's own child requests may, signed as its client when requests
        are checked (with signing off nothing is, and any may)."""
        if self.requests_signed == "off":
            return True
        return self.request_signer is not None and client == self.request_signer[0]

    def _refuse(
        self,
        record: Record,
        request: RequestEvent,
        code: str,
        reason: str,
        origin: str,
        out: BatchOutput,
    ) -> None:
        self.stats.rejected_requests += 1
        log.warning(
            "request %s refused: %s",
            request.request_id,
            reason,
            extra={
                "request_id": request.request_id,
                "workflow": request.workflow,
                "trace_id": request.trace_id,
                "code": code,
            },
        )
        self._dead_letter(record, reason, code, out)
        out.direct.append(self._rejection(request, code, reason, origin))

    def _duplicate(self, start: Start, result: CommitResult) -> Message | None:
        """What to answer a request whose run already exists (or existed)."""
        self.stats.duplicates += 1
        request = start.request
        asked = start.transition.state  # what this request would have started
        current = result.current
        tomb: Tombstone | None = result.tombstone
        fingerprint = current.fingerprint if current is not None else tomb and tomb.fingerprint
        origin = current.origin if current is not None else tomb and tomb.origin
        if origin == asked.origin:
            # Kafka redelivered the record that started the run (a rebalance, a rewind):
            # not a new publish, so no second result.
            self.stats.redelivered += 1
            return None
        if fingerprint and fingerprint != asked.fingerprint:
            self.stats.conflicting_requests += 1
            reason = (
                f"request id {request.request_id!r} was already used for a different "
                f"workflow or payload (run {workflow_id_for(request.request_id)}); "
                "use a new request id for a new request"
            )
            log.warning("%s", reason)
            return self._rejection(request, "request_id_conflict", reason, asked.origin or "")
        if current is not None and current.terminal:
            # A duplicate of a finished request: the client may have missed the result.
            return self._result_message(result_of(current), current.reply_to, "resend")
        if tomb is not None:
            reason = (
                f"request {request.request_id!r} already ran and finished {tomb.status}; "
                "its result is past the retention (redis.retention_s) and was not kept"
            )
            return self._rejection(
                request, "result_expired", reason, asked.origin or "", WorkflowStatus(tomb.status)
            )
        return None


def trace_context(
    request: RequestEvent, headers: Sequence[tuple[str, bytes]]
) -> tuple[str | None, str | None]:
    """(trace id, parent span id) from the request's W3C ``traceparent`` header, if it has
    a valid one that agrees with the request's own ``trace_id`` (the value wins)."""
    for name, value in headers:
        if name == TRACEPARENT:
            parsed = parse_traceparent(value)
            if parsed is None:
                return None, None
            trace, parent, _ = parsed
            if request.trace_id and w3c_trace_id(request.trace_id) != trace:
                return None, None
            return trace, parent
    return None, None
