"""Evidence that a service instance died: markers in the health topic, and how far it has
been read.

An instance is due to be marked down when its heartbeats stop: its deadline (last heard
from, plus `discovery.missed_heartbeats` of its intervals and `grace_ms`, on Redis's clock)
passes. But silence is evidence of death only if the heartbeats it would have sent have
been read. When the mediator itself stalls (its health consumer falls behind, Redis or the
broker pauses, a replica is frozen), a live instance's heartbeats wait unread in the topic
while its deadline passes all the same; taking it for dead would hand every command in
flight on it to another instance, and each would run twice.

So one replica at a time (a lease) writes a marker (`MarkEvent`) into every partition of
the health topic every `discovery.mark_ms`, stamped with Redis's time read *before* it is
sent. A replica that reads a marker has read every record that partition got before it,
and records its time as that partition's watermark (`Registry.apply`). Every heartbeat sent
before the least watermark across the partitions has been applied, up to its time in flight
(which `grace_ms` covers): an instance whose deadline is before that watermark missed
heartbeats the registry would have seen, which is evidence; one whose deadline is after it
is waited for, however long ago its deadline was, until the topic has been read that far.
Nothing here reads a replica's own clock, so clock skew changes nothing either.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from mediator import clock
from mediator.codec import encode, headers
from mediator.core.signing import Signatures
from mediator.runtime.ports import Producer
from mediator.settings import DiscoverySettings
from mediator.storage.keys import Keys
from mediator.storage.registry import RegistryHashes
from topics.events import MarkEvent

__all__ = ["MARK_KEY", "Marker"]

log = logging.getLogger("mediator.registry")

#: The key of every marker record.
MARK_KEY = b"mediator-mark"


class Marker:
    """Writes the health topic's markers, when this replica holds the marking lease."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        producer: Producer,
        topic: str,
        settings: DiscoverySettings,
        replica: str,
        signatures: Signatures | None = None,
    ) -> None:
        self.hashes = RegistryHashes(redis, keys)
        self.producer = producer
        self.topic = topic
        self.settings = settings
        self.replica = replica
        self.signatures = signatures
        self.written = 0
        self._last = float("-inf")

    async def tick(self) -> int:
        """Write a marker into every partition if one is due and this replica holds the
        lease; how many were written."""
        now = clock.monotonic()
        if now - self._last < self.settings.mark_ms / 1000:
            return 0
        if not await self.hashes.take_marker_lease(self.replica, 3 * self.settings.mark_ms):
            return 0
        t_ms = await self.hashes.time_ms()
        self._last = now
        mark = MarkEvent(t_ms=t_ms, replica=self.replica)
        value = encode(mark)
        signed = headers(mark)
        if self.signatures is not None:
            signed += self.signatures.sign_any(value, self.topic, MARK_KEY)
        partitions = sorted(await self.producer.partitions_for(self.topic))
        await self.hashes.set_partitions(len(partitions))
        deliveries = [
            await self.producer.send(self.topic, value, MARK_KEY, partition, headers=signed)
            for partition in partitions
        ]
        await asyncio.gather(*deliveries)
        self.written += len(partitions)
        return len(partitions)
