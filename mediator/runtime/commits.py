"""A transition as a commit: the state, outbox messages (signed commands, results), timers,
parked and routed deltas and audit entries, within the size limit."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from mediator.clock import now_ms
from mediator.codec import encode, encode_plain, headers, record
from mediator.core import audit, saga
from mediator.core.audit import AuditEvent
from mediator.core.engine import PublishResult, SendCommand, Transition
from mediator.core.lineage import CancelChild, ReplyToParent, is_child_service, parent_ref
from mediator.core.parking import parking_delta
from mediator.core.routing import routing_delta
from mediator.core.state import Failure, WorkflowState, touched
from mediator.core.stream import transition_fields
from mediator.core.transition import Subscribe
from mediator.core.workflow import CHILD_PREFIX, Workflow
from mediator.logs import run_fields
from mediator.runtime.context import (
    BatchOutput,
    Record,
)
from mediator.runtime.intake import Intake
from mediator.runtime.messages import EVENTS, Message
from mediator.storage.store import Commit
from topics.events import (
    CommandEvent,
    ControlAction,
    ControlEvent,
    ErrorInfo,
    ReplyEvent,
    ReplyStatus,
    RequestEvent,
    ResultEvent,
    TransitionEvent,
    WorkflowStatus,
)
from topics.headers import headers_for

__all__ = ["Commits"]

log = logging.getLogger("mediator.runtime")

#: The contract headers of every transition event (they carry no trace id).
_EVENT_HEADERS = tuple(headers_for("transition", 1, None))


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
        messages = self._messages(transition, workflow)
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
            messages = self._messages(transition, workflow)
        if workflow is not None and workflow.undo_attempts:
            saga.mark_sent(workflow, transition)
        # The engine hands over a state of its own (a fork or a new one): stamp it in place.
        state = transition.state
        state.rev = expected_rev + 1
        state.stamp = f"{self._stamp_prefix}{next(self._stamps):x}"
        if self.events:
            messages += self._events(base, state, now)
        changed = touched(base, state)
        commit = Commit(
            state=state,
            expected_rev=expected_rev,
            expected_stamp=(base.stamp or "") if base is not None else "",
            base=base,
            outbox=[(m.id, m.frame) for m in messages],
            counters=transition.counters,
            timers=[(t.member, t.delay_ms) for t in transition.timers],
            cleared=transition.cleared,
            parked=parking_delta(workflow, base, state, transition.parked, changed),
            routed=routing_delta(workflow, base, state, changed) if self.router is not None else (),
            audit=audit.entries(events, transition, now, self.replica)
            if self.store.audit_limit
            else (),
        )
        return commit, messages

    def _messages(self, transition: Transition, workflow: Workflow | None) -> list[Message]:
        shard = self.keys.shard_of(transition.state.workflow_id)
        messages = []
        for effect in transition.effects:
            if isinstance(effect, SendCommand):
                command = effect.command
                if is_child_service(command.service):
                    messages.append(self._to_child(transition.state, workflow, command, shard))
                    continue
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
                messages.append(self._result_of(effect.fields, effect.reply_to, shard))
            elif isinstance(effect, ReplyToParent):
                round_ = transition.state.round
                messages.append(self._parent_reply(effect.reply, f"r{round_}", shard))
            elif isinstance(effect, Subscribe):
                state = transition.state
                subscribe = ControlEvent(
                    control_id=f"{state.workflow_id}.{effect.step}.{effect.attempt}.subscribe",
                    action=ControlAction.SUBSCRIBE,
                    workflow_id=state.workflow_id,
                    signal=effect.event,
                    key=effect.key,
                    issued_ms=now_ms(),
                )
                messages.append(
                    self._control_message(subscribe, subscribe.control_id, "result", shard)
                )
            elif isinstance(effect, CancelChild):
                cancel = ControlEvent(
                    control_id=effect.control_id,
                    action=ControlAction.COMPENSATE if effect.undo else ControlAction.CANCEL,
                    workflow_id=effect.run,
                    reason=effect.reason,
                    issued_ms=now_ms(),
                )
                messages.append(self._control_message(cancel, effect.control_id, "result", shard))
        return messages

    def _events(self, base: WorkflowState | None, state: WorkflowState, now: int) -> list[Message]:
        """The transition stream's events of the commit from `base` to `state`: one outbox
        entry for all of them (kind "events", published as one record each, in order)."""
        values = []
        for fields in transition_fields(base, state, now):
            value = encode_plain(fields)
            if value is None:  # a value orjson would not write as pydantic does
                value = encode(TransitionEvent.model_validate(fields))
            values.append(value)
        if not values:
            return []
        shard = self.keys.shard_of(state.workflow_id)
        topic, key = self.topics.events, state.workflow_id.encode()
        entry = f"{state.workflow_id}:{state.rev}:events"
        return [Message(shard, entry, topic, key, b"\n".join(values), [*_EVENT_HEADERS], EVENTS)]

    def _to_child(
        self, state: WorkflowState, workflow: Workflow | None, command: CommandEvent, shard: int
    ) -> Message:
        """A `workflow` step's command as what it stands for: the child run's request
        (``run``) or the parent's ``compensate`` control to it. Kind ``command``: one
        too large fails its step, one that cannot be published fails it by error reply."""
        ref = parent_ref(state, command.step, command.attempt, command.command_id)
        if command.action == "compensate":
            control = ControlEvent(
                control_id=command.command_id,
                action=ControlAction.COMPENSATE,
                workflow_id=str(command.input["run"]),
                service=command.service,
                reason=f"parent run {state.workflow_id} is compensating step {command.step!r}",
                issued_ms=command.sent_ms,
                reply=ref,
            )
            return self._control_message(control, command.command_id, "command", shard)
        step = workflow.steps.get(command.step) if workflow is not None else None
        child = step.child if step is not None else None
        request = RequestEvent(
            request_id=command.command_id,
            workflow=command.service.removeprefix(CHILD_PREFIX),
            version=child.version if child is not None else None,
            payload=command.input,
            trace_id=command.trace_id,
            created_ms=command.sent_ms,
            parent=ref,
        )
        topic, key = self.topics.requests, request.request_id.encode()
        value, signed = record(
            request, topic, key, self.request_signer[1] if self.request_signer else None
        )
        return Message(shard, command.command_id, topic, key, value, signed, "command")

    def _control_message(self, control: ControlEvent, id_: str, kind: str, shard: int) -> Message:
        """A control the mediator sends a run of its own accord, signed as its operator."""
        signer = self.control_signer
        if signer is not None:
            control = control.model_copy(update={"operator": signer[0]})
        topic, key = self.topics.control, (control.workflow_id or "").encode()
        value, signed = record(control, topic, key, signer[1] if signer else None)
        return Message(shard, id_, topic, key, value, signed, kind)

    def _parent_reply(self, reply: ReplyEvent, suffix: str, shard: int = -1) -> Message:
        """A child run's outcome, as the reply to the parent's command that started (or
        compensated) it, signed as the service ``workflow.<name>`` (`signing.services`, else
        the shared keys)."""
        value = encode(reply)
        signed = headers(reply)
        topic, key = self.topics.replies, reply.workflow_id.encode()
        if self.signatures is not None and reply.service is not None:
            signed += self.signatures.sign(reply.service, value, topic, key)
        id_ = f"reply.{reply.command_id}.{suffix}"
        return Message(shard, id_, topic, key, value, signed, "reply")

    def _result_of(self, fields: dict[str, Any], reply_to: str | None, shard: int) -> Message:
        """A finished run's result from its fields (`PublishResult`): the same record
        `_result_message` makes of the event, without building the event."""
        value = encode_plain(fields)
        if value is None:  # a value orjson would not write as pydantic does
            value = encode(ResultEvent.model_validate(fields))
        return self._result_record(
            "result",
            fields["request_id"],
            fields.get("workflow_id"),
            fields.get("trace_id"),
            value,
            reply_to,
            shard,
        )

    def _result_message(
        self, result: ResultEvent, reply_to: str | None, kind: str, shard: int = -1
    ) -> Message:
        return self._result_record(
            kind,
            result.request_id,
            result.workflow_id,
            result.trace_id,
            encode(result),
            reply_to,
            shard,
        )

    def _result_record(
        self,
        kind: str,
        request_id: str,
        workflow_id: str | None,
        trace_id: str | None,
        value: bytes,
        reply_to: str | None,
        shard: int,
    ) -> Message:
        """A result's record: its outbox id, topic, key and contract headers (the span
        of its ``traceparent`` is the run, or the request when no run started)."""
        span = workflow_id or request_id
        return Message(
            shard,
            f"{kind}.{span}",
            reply_to or self.topics.results,
            request_id.encode(),
            value,
            headers_for("result", 1, trace_id, span),
        )

    def _rejection(
        self,
        request: RequestEvent,
        code: str,
        reason: str,
        origin: str,
        status: WorkflowStatus = WorkflowStatus.FAILED,
    ) -> Message:
        if (parent := request.parent) is not None:
            # A child run that cannot start fails the parent's step that waits for it.
            refused = ReplyEvent(
                command_id=parent.command_id,
                workflow_id=parent.workflow_id,
                step=parent.step,
                attempt=parent.attempt,
                status=ReplyStatus.ERROR,
                error=ErrorInfo(
                    message=f"child run of {request.workflow!r} refused: {reason}",
                    code=code,
                    step=parent.step,
                ),
                service=CHILD_PREFIX + request.workflow,
                trace_id=request.trace_id,
                replied_ms=now_ms(),
            )
            return self._parent_reply(refused, f"{code}@{origin}")
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
