"""A transition as a commit: the state, outbox messages (signed commands, results), timers,
parked and routed deltas and audit entries, within the size limit."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydantic import ValidationError

from mediator.clock import now_ms
from mediator.codec import encode, headers
from mediator.core import audit
from mediator.core.audit import AuditEvent
from mediator.core.engine import PublishResult, SendCommand, Transition
from mediator.core.parking import parking_delta
from mediator.core.routing import routing_delta
from mediator.core.state import Failure, WorkflowState
from mediator.core.workflow import Workflow
from mediator.logs import run_fields
from mediator.runtime.context import (
    BatchOutput,
    Record,
)
from mediator.runtime.intake import Intake
from mediator.runtime.messages import Message
from mediator.storage.store import Commit
from topics.events import (
    ErrorInfo,
    RequestEvent,
    ResultEvent,
    WorkflowStatus,
)

__all__ = ["Commits"]

log = logging.getLogger("mediator.runtime")


class Commits(Intake):
    """Builds a transition's commit and the messages it sends."""

    def _commit_of(
        self,
        workflow: Workflow | None,
        transition: Transition,
        base: WorkflowState | None,
        now: int,
        events: Sequence[AuditEvent] = (),
    ) -> tuple[Commit, list[Message]]:
        """The commit of `transition` from `base` (None: a new run), and its messages,
        each within the size limit: a command or result that would be too large fails its
        step or run instead."""
        expected_rev = base.rev if base is not None else 0
        messages = self._messages(transition)
        limit = self.limits.max_message_bytes - 1024  # room for the record framing
        while (big := next((m for m in messages if m.size > limit), None)) is not None:
            error: Failure = {
                "message": f"{big.kind} {big.id} would be {big.size} bytes, over the "
                f"{self.limits.max_message_bytes}-byte limit (limits.max_message_bytes); "
                "pass large data by reference",
                "code": "payload_too_large",
            }
            log.warning(
                "workflow %s: %s",
                transition.state.workflow_id,
                error["message"],
                extra=run_fields(transition.state, code="payload_too_large"),
            )
            if big.kind == "command" and workflow is not None:
                transition = self.engine.refuse_command(workflow, transition, big.id, error, now)
            else:
                transition = self.engine.refuse_result(transition, error, now)
            messages = self._messages(transition)
        # The engine hands over a state of its own (a fork or a new one): stamp it in place.
        state = transition.state
        state.rev = expected_rev + 1
        state.stamp = f"{self._stamp_prefix}{next(self._stamps):x}"
        commit = Commit(
            state=state,
            expected_rev=expected_rev,
            expected_stamp=(base.stamp or "") if base is not None else "",
            outbox=[(m.id, m.frame) for m in messages],
            counters=transition.counters,
            timers=[(t.member, t.delay_ms) for t in transition.timers],
            cleared=transition.cleared,
            parked=parking_delta(workflow, base, state, transition.parked),
            routed=routing_delta(workflow, base, state) if self.router is not None else (),
            audit=audit.entries(events, transition, now, self.replica)
            if self.store.audit_limit
            else (),
        )
        return commit, messages

    def _messages(self, transition: Transition) -> list[Message]:
        shard = self.keys.shard_of(transition.state.workflow_id)
        messages = []
        for effect in transition.effects:
            if isinstance(effect, SendCommand):
                command = effect.command
                value = encode(command)
                signed = headers(command)
                topic, key = self.topics.service(command.service), command.workflow_id.encode()
                if self.signatures is not None:
                    signed += self.signatures.sign(command.service, value, topic, key)
                messages.append(
                    Message(
                        shard,
                        command.command_id,
                        topic,
                        key,
                        value,
                        signed,
                        "command",
                        partition=effect.partition,
                    )
                )
            elif isinstance(effect, PublishResult):
                messages.append(
                    self._result_message(effect.result, effect.reply_to, "result", shard)
                )
        return messages

    def _result_message(
        self, result: ResultEvent, reply_to: str | None, kind: str, shard: int = -1
    ) -> Message:
        return Message(
            shard,
            f"{kind}.{result.workflow_id or result.request_id}",
            reply_to or self.topics.results,
            result.request_id.encode(),
            encode(result),
            headers(result),
        )

    def _rejection(
        self,
        request: RequestEvent,
        code: str,
        reason: str,
        origin: str,
        status: WorkflowStatus = WorkflowStatus.FAILED,
    ) -> Message:
        result = ResultEvent(
            result_id=f"{code}@{origin}",
            request_id=request.request_id,
            workflow_id=None,
            workflow=request.workflow,
            status=status,
            error=ErrorInfo(message=reason, code=code),
            finished_ms=now_ms(),
            trace_id=request.trace_id,
        )
        return self._result_message(result, request.reply_to, "rejected")

    async def reject(self, record: Record, reason: str, code: str = "unprocessable") -> None:
        """Dead-letter one record now (the batch boundary found it cannot be processed);
        a request's requester gets a failed result that says why."""
        out = BatchOutput()
        self._dead_letter(record, reason, code, out)
        if record.topic == self.topics.requests:
            try:
                request = RequestEvent.model_validate_json(record.value or b"")
            except ValidationError:
                pass
            else:
                origin = f"{record.topic}/{record.partition}/{record.offset}"
                out.direct.append(self._rejection(request, code, reason, origin))
        await self._flush(out)
