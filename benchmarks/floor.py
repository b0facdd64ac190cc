"""The floor: the same echo services driven over raw Kafka request/reply, no mediator.

The client itself sends each step's `CommandEvent` to the service's topic and waits for
its `ReplyEvent` on a replies topic of its own before sending the next step: exactly the
messages the mediator would exchange, minus the mediator. This is the most this broker and
these services can do for the same work on this machine.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import ValidationError

from benchmarks.common import Measure, Profile, closed_loop, open_loop, run_count
from benchmarks.stage import ECHO, Rig, Rigs, Stage
from mediator import clock, codec
from mediator.core.signing import Keyring
from topics.events import CommandEvent, ReplyEvent, ReplyStatus
from topics.names import Topics

__all__ = ["FloorClient", "run_floor", "run_floor_latency"]

STEP_TIMEOUT_S = 30.0


class FloorClient:
    """Runs sequential chains of echo commands by hand over Kafka."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        fetch_max_wait_ms: int = 5,
        keys: Keyring | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        #: Signs the commands as the mediator would (the echo service checks them).
        self.keys = keys
        self.topics = topics
        self.replies_topic = topics.replies
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self._waiting: dict[str, asyncio.Future[ReplyEvent]] = {}
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self.replies = 0

    async def start(self) -> None:
        """Connect, and read the replies topic from its current end."""
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, enable_idempotence=False, acks="all", linger_ms=1
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=self.fetch_max_wait_ms,
        )
        await self._producer.start()
        await self._consumer.start()
        partitions = await self._producer.partitions_for(self.replies_topic)
        tps = [TopicPartition(self.replies_topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        """Stop reading and close the connections."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for future in self._waiting.values():
            future.cancel()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def __aenter__(self) -> FloorClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def run_chain(self, steps: int, payload: dict[str, Any]) -> bool:
        """Send step after step, each once the previous one's reply is in; True if all ok."""
        assert self._producer is not None
        workflow_id = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        for i in range(steps):
            command = CommandEvent(
                command_id=f"{workflow_id}.s{i}.1",
                workflow_id=workflow_id,
                request_id=workflow_id,
                workflow=f"chain{steps}",
                step=f"s{i}",
                service=ECHO,
                action=ECHO,
                attempt=1,
                input=payload,
                reply_to=self.replies_topic,
                sent_ms=clock.now_ms(),
            )
            future: asyncio.Future[ReplyEvent] = loop.create_future()
            self._waiting[command.command_id] = future
            try:
                value = codec.encode(command)
                headers = codec.headers(command)
                if self.keys is not None:
                    headers += self.keys.headers(value)
                await self._producer.send(
                    self.topics.service(ECHO), value, key=workflow_id.encode(), headers=headers
                )
                async with asyncio.timeout(STEP_TIMEOUT_S):
                    reply = await future
            finally:
                self._waiting.pop(command.command_id, None)
            if reply.status is not ReplyStatus.OK:
                return False
        return True

    async def _read(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=100, max_records=1000)
            for records in batch.values():
                for record in records:
                    try:
                        reply = ReplyEvent.model_validate_json(record.value or b"")
                    except ValidationError:
                        continue
                    self.replies += 1
                    future = self._waiting.get(reply.command_id)
                    if future is not None and not future.done():
                        future.set_result(reply)


def _chain(client: FloorClient, steps: int) -> Callable[[int], Awaitable[bool]]:
    async def run(n: int) -> bool:
        return await client.run_chain(steps, {"n": n})

    return run


async def run_floor(
    stage: Stage,
    profile: Profile,
    chains: tuple[int, ...] = (1, 3),
    out: list[Measure] | None = None,
) -> list[Measure]:
    """Chains/s, steps/s and client CPU per step at saturation for each chain length.

    Measures are appended to ``out`` as they start (a section cut short keeps them).
    """
    measures: list[Measure] = [] if out is None else out
    note = f"closed loop, {profile.floor_in_flight} in flight"
    async with Rigs(stage, "floor", fresh=profile.fresh_rigs) as rigs:
        for steps in chains:
            name = f"floor.chain{steps}"
            runs = Measure(f"{name}.chains_per_s", "chains/s", note=note)
            step_rate = Measure(f"{name}.steps_per_s", "steps/s", note=note)
            cpu = Measure(f"{name}.cpu_per_step", "ms CPU", note="the floor's client process")
            measures += [runs, step_rate, cpu]
            for _ in range(profile.repeat):
                async with rigs.use() as rig, _floor_client(rig) as client:
                    await run_count(_chain(client, steps), 100, in_flight=50, timeout_s=60)
                    began, replies = time.process_time(), client.replies
                    result = await closed_loop(
                        _chain(client, steps),
                        in_flight=profile.floor_in_flight,
                        warmup_s=profile.warmup_s,
                        measure_s=profile.measure_s,
                        drain_s=profile.drain_s,
                    )
                    result.check(name)
                    runs.values.append(round(result.rate, 1))
                    step_rate.values.append(round(result.rate * steps, 1))
                    cpu_ms = (time.process_time() - began) * 1000
                    cpu.values.append(round(cpu_ms / max(1, client.replies - replies), 3))
    return measures


async def run_floor_latency(
    stage: Stage, profile: Profile, rate: float, out: list[Measure] | None = None
) -> list[Measure]:
    """3-step chain latency p50/p99 at a constant arrival ``rate`` (the mediator's half load)."""
    note = f"open loop at {rate:.0f} chains/s for {profile.half_load_s:g}s"
    p50 = Measure("floor.chain3.half_load.latency_p50", "ms", note=note)
    p99 = Measure("floor.chain3.half_load.latency_p99", "ms", note=note)
    if out is not None:
        out += [p50, p99]
    async with Rigs(stage, "floorlat", fresh=profile.fresh_rigs) as rigs:
        for _ in range(profile.repeat):
            async with rigs.use() as rig, _floor_client(rig) as client:
                await run_count(_chain(client, 3), 100, in_flight=50, timeout_s=60)
                result = await open_loop(
                    _chain(client, 3),
                    rate=rate,
                    duration_s=profile.half_load_s,
                    drain_s=profile.drain_s,
                )
                result.check("floor chain3 half load")
                p50.values.append(round(result.latency(50), 2))
                p99.values.append(round(result.latency(99), 2))
    return [p50, p99]


def _floor_client(rig: Rig) -> FloorClient:
    return FloorClient(rig.bootstrap, rig.topics, keys=rig.settings.signing.for_service(ECHO))
