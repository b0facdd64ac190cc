"""The raw floor: a plain aiokafka echo service and a plain aiokafka client.

Nothing of the project is on the message path: bytes in, `orjson`, bytes out, the wire
contract's field names written by hand. This is what the broker and Python's Kafka client
can do on this machine for the same request/reply exchanges the mediator makes, and so the
floor every other row is compared with. The client can also drive the service SDK's echo
worker (`signing_key`: it then signs commands with the standard library's HMAC, as the
contract says), which measures what the SDK costs a service.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

__all__ = ["RawClient", "serve_raw_echo"]

#: The producer and consumer settings of both raw ends (the issue's floor).
PRODUCER = {"acks": 1, "linger_ms": 1, "enable_idempotence": False}
FETCH_WAIT_MS = 5
#: How often, at most, the raw echo service commits its consumed offsets.
COMMIT_INTERVAL_S = 0.05
STEP_TIMEOUT_S = 30.0
KEY_ID, SIGNATURE = "mediator-key", "mediator-signature-2"


async def serve_raw_echo(
    bootstrap: str, topic: str, group: str, stop: asyncio.Event, session_timeout_ms: int = 3000
) -> None:
    """Answer every command on ``topic`` with an ``ok`` reply carrying its input, until
    ``stop`` is set: one batch of sends per fetched batch, offsets committed after their
    replies were acknowledged, at most every `COMMIT_INTERVAL_S`."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **PRODUCER)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=FETCH_WAIT_MS,
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=max(100, session_timeout_ms // 10),
    )
    await producer.start()
    await consumer.start()
    last_commit = 0.0
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100, max_records=1000)
            sends = []
            for records in batch.values():
                for record in records:
                    command = orjson.loads(record.value)
                    reply = orjson.dumps(
                        {
                            "type": "reply",
                            "schema_version": 1,
                            "command_id": command["command_id"],
                            "workflow_id": command["workflow_id"],
                            "step": command["step"],
                            "attempt": command["attempt"],
                            "status": "ok",
                            "output": command.get("input"),
                        }
                    )
                    sends.append(await producer.send(command["reply_to"], reply, key=record.key))
            if sends:
                await asyncio.gather(*sends)
            now = time.monotonic()
            if now - last_commit >= COMMIT_INTERVAL_S:
                last_commit = now
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


class RawClient:
    """Runs sequential chains of echo commands by hand: each step is sent once the
    previous step's reply is in."""

    def __init__(
        self,
        bootstrap: str,
        service_topic: str,
        replies_topic: str,
        *,
        service: str = "echo",
        signing_key: tuple[str, bytes] | None = None,
    ) -> None:
        self.bootstrap, self.service_topic, self.replies_topic = (
            bootstrap,
            service_topic,
            replies_topic,
        )
        self.service = service
        self._key = signing_key
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **PRODUCER)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=FETCH_WAIT_MS,
        )
        self._reader: asyncio.Task[None] | None = None
        self.replies = 0

    async def __aenter__(self) -> RawClient:
        await self._producer.start()
        await self._consumer.start()
        partitions = await self._producer.partitions_for(self.replies_topic)
        tps = [TopicPartition(self.replies_topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for future in self._waiting.values():
            future.cancel()
        await self._consumer.stop()
        await self._producer.stop()

    async def run_chain(self, steps: int, payload: Any) -> bool:
        """Send step after step, each once the previous one's reply is in; True if all ok."""
        workflow_id = uuid.uuid4().hex
        key = workflow_id.encode()
        loop = asyncio.get_running_loop()
        for i in range(steps):
            command_id = f"{workflow_id}.s{i}.1"
            value = orjson.dumps(
                {
                    "type": "command",
                    "schema_version": 1,
                    "command_id": command_id,
                    "workflow_id": workflow_id,
                    "request_id": workflow_id,
                    "workflow": f"chain{steps}",
                    "step": f"s{i}",
                    "service": self.service,
                    "action": self.service,
                    "attempt": 1,
                    "input": payload,
                    "reply_to": self.replies_topic,
                    "sent_ms": int(time.time() * 1000),
                }
            )
            headers = None
            if self._key is not None:
                key_id, secret = self._key
                # The contract's signed string: topic, key (hex) and value.
                signed = b"mediator-2\n%s\n%s\n%s" % (
                    self.service_topic.encode(),
                    key.hex().encode(),
                    value,
                )
                signature = hmac.digest(secret, signed, hashlib.sha256).hex().encode()
                headers = [(KEY_ID, key_id.encode()), (SIGNATURE, signature)]
            future: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._waiting[command_id] = future
            try:
                await self._producer.send(self.service_topic, value, key=key, headers=headers)
                async with asyncio.timeout(STEP_TIMEOUT_S):
                    reply = await future
            finally:
                self._waiting.pop(command_id, None)
            if reply.get("status") != "ok":
                return False
        return True

    async def _read(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100, max_records=1000)
            for records in batch.values():
                for record in records:
                    try:
                        reply = orjson.loads(record.value)
                        future = self._waiting.get(reply["command_id"])
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        continue
                    self.replies += 1
                    if future is not None and not future.done():
                        future.set_result(reply)
