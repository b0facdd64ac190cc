"""Moving on runs that Redis rolled back: publish again the replies they still wait for.

A failover that loses the latest writes of Redis (an asynchronous replica promoted before
it had them) leaves a run at an older revision: waiting for the reply of a step that in
fact answered, whose transition was committed and then lost, and whose Kafka offset moved
on. That reply will not come again by itself; without a step timeout the run waits for
ever, and with one it sends the step again as a new attempt.

Reading the replies topic over a window, `Redrive` publishes again (same key, value and
headers, so signatures still hold) each reply that a live run is waiting for now: the
current attempt of a running step, or of a compensation, by ``command_id`` and attempt.
The mediator applies it as it applied it the first time, and the run moves on from where
Redis left it: the commands that follow have the ids they had (ids are derived from the
run, the step and the attempt), so services answer them from their deduplication.

A reply a run was waiting for only because no mediator had consumed it yet is published
twice: the mediator applies the first copy and finds the second stale. Nothing else is
sent: replies to attempts that moved on, to finished runs or to runs Redis does not have
are left alone (the requests of lost runs are what `recover` re-publishes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer, ConsumerRecord
from pydantic import ValidationError
from redis.asyncio import Redis

from mediator.core.state import StepStatus, WorkflowState
from mediator.errors import CorruptState
from mediator.storage.commit import state_of
from mediator.storage.errors import redis_errors
from mediator.storage.keys import Keys
from topics.events import ReplyEvent

__all__ = ["Redrive", "awaited", "publish"]


def awaited(state: WorkflowState, reply: ReplyEvent) -> bool:
    """Whether the live run `state` is waiting for `reply` now: it answers the current
    attempt of a running step or compensation."""
    if state.terminal:
        return False
    for attempts in (state.steps, state.compensations or {}):
        current = attempts.get(reply.step)
        if (
            current is not None
            and current.status is StepStatus.RUNNING
            and current.command_id == reply.command_id
            and current.attempt == reply.attempt
        ):
            return True
    return False


class Redrive:
    """One pass over replies: publish again those a live run waits for (once each)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        producer: AIOKafkaProducer | None,
        topic: str,
        timeout_s: float,
    ) -> None:
        self.redis = redis
        self.keys = keys
        #: None: count only (a dry run).
        self.producer = producer
        self.topic = topic
        self.timeout_s = timeout_s
        self.scanned = 0
        self.awaited = 0
        self.republished = 0
        self._seen: set[str] = set()

    async def handle(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        """Look one batch of replies up against their runs; publish the awaited ones."""
        replies: list[tuple[ConsumerRecord[bytes, bytes], ReplyEvent]] = []
        for record in records:
            self.scanned += 1
            try:
                reply = ReplyEvent.model_validate_json(record.value or b"")
            except ValidationError:
                continue  # the mediator dead-lettered it; nothing to bring back
            if reply.command_id not in self._seen:
                replies.append((record, reply))
        states = await self._states(sorted({reply.workflow_id for _, reply in replies}))
        due = []
        for record, reply in replies:
            state = states.get(reply.workflow_id)
            if state is not None and awaited(state, reply) and reply.command_id not in self._seen:
                self._seen.add(reply.command_id)
                self.awaited += 1
                due.append(record)
        if due and self.producer is not None:
            await publish(self.producer, self.topic, due, self.timeout_s)
            self.republished += len(due)

    async def _states(self, workflow_ids: Sequence[str]) -> dict[str, WorkflowState]:
        if not workflow_ids:
            return {}
        with redis_errors("reading runs to re-drive"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for wid in workflow_ids:
                    pipe.hgetall(self.keys.workflow(wid))
                hashes = await pipe.execute()
        states = {}
        for wid, fields in zip(workflow_ids, hashes, strict=True):
            try:
                state = state_of(wid, fields)
            except CorruptState:
                continue  # a state that does not decode is not one to move on
            if state is not None:
                states[wid] = state
        return states


async def publish(
    producer: AIOKafkaProducer,
    topic: str,
    records: Sequence[ConsumerRecord[bytes, bytes]],
    timeout_s: float,
) -> None:
    """Publish `records` again to `topic`, as they were (key, value, headers)."""
    async with asyncio.timeout(timeout_s):
        sent = [
            await producer.send(topic, value=r.value, key=r.key, headers=list(r.headers))
            for r in records
        ]
        await asyncio.gather(*sent)
