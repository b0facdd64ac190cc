"""The replica's own hot path, in process: a `Mediator` whose Kafka is replaced by lists.

Requests and replies are handed to the runtime as batches (as its consumer would) and the
commands it publishes are answered by an in-process echo (signed replies, as the SDK
worker writes them), against a real Redis. What is measured is the CPU the runtime spends
per step with the broker, the worker and the Kafka client taken out: decoding, signature
checks, the engine, commit building and the Redis round trip, the outbox, counters. The
process is alone on its core for most of the time, so the figure moves far less than the
end-to-end ones and a change on the hot path can be compared side by side.

``python -m benchmarks.inproc [--runs N] [--profile FILE]`` prints the CPU per step
(``--profile`` also writes a cProfile of the measured part). The ``inproc`` section of the
suite runs it for chain3 and chain1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from benchmarks.common import Measure, Profile
from benchmarks.stage import BENCH_KEY, BENCH_KEY_ID, ECHO, WORKFLOWS, steps_of
from mediator import clock
from mediator.cli.infra import EmbeddedRedis
from mediator.codec import encode_plain, record
from mediator.core.signing import Keyring
from mediator.definitions import load_paths
from mediator.replica import Mediator
from mediator.runtime.collector import tune_gc
from mediator.settings import Settings, load_settings
from topics.events import CommandEvent, HealthEvent, RequestEvent
from topics.headers import headers_for

__all__ = ["InProcess", "run_inproc"]

#: Runs in flight and the batch the consumer hands over: about what the saturated
#: end-to-end benchmark sees (100 runs in flight, batches of 30-50 records).
IN_FLIGHT, BATCH = 100, 40


@dataclass(slots=True)
class _Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


@dataclass
class _Producer:
    """Takes what the outbox publishes; every send is acknowledged at once."""

    sent: list[_Record] = field(default_factory=list)
    _offsets: itertools.count[int] = field(default_factory=itertools.count)

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Any:
        self.sent.append(
            _Record(topic, partition or 0, next(self._offsets), key, value, headers or [])
        )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def flush(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2, 3}


class InProcess:
    """A mediator fed from and publishing to lists, echo answered in process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        app = logging.getLogger("mediator.app")
        level = app.level
        app.setLevel(logging.ERROR)  # the suite's settings are warned about: signing keys
        try:
            self.mediator = Mediator(settings, load_paths(settings.workflows))
        finally:
            app.setLevel(level)
        self.producer = _Producer()
        self.mediator.producer._producer = self.producer
        self.topics = settings.kafka.topics
        self.keys = Keyring.parse(f"{BENCH_KEY_ID}={BENCH_KEY}")
        self._offsets = itertools.count()
        self.finished = 0

    async def __aenter__(self) -> InProcess:
        await self.mediator.store.check_layout()
        await self.mediator.catalog.publish()
        tune_gc(self.settings.gc)  # as `Mediator.prepare` does
        await self._heartbeat()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.mediator.dispatcher.stop()
        await self.mediator.redis.aclose()

    def _record(self, topic: str, key: bytes | None, value: bytes, hdrs: list[Any]) -> _Record:
        return _Record(topic, 0, next(self._offsets), key, value, hdrs)

    async def _heartbeat(self) -> None:
        beat = HealthEvent(
            service=ECHO,
            instance="echo-1",
            capacity=1000,
            partitions=[0, 1, 2, 3],
            ts_ms=clock.now_ms(),
        )
        topic = self.topics.health
        value, hdrs = record(beat, topic, b"echo-1", self.keys)
        await self.mediator.runtime.handle_health([self._record(topic, b"echo-1", value, hdrs)])

    def request(self, workflow: str, n: int) -> _Record:
        request = RequestEvent(
            request_id=f"req-{secrets.token_hex(6)}-{n}",
            workflow=workflow,
            payload={"n": n},
            created_ms=clock.now_ms(),
        )
        value, hdrs = record(request, self.topics.requests, request.request_id.encode())
        return self._record(self.topics.requests, request.request_id.encode(), value, hdrs)

    def answer(self) -> list[_Record]:
        """Echo replies to the commands published since the last call, as the SDK worker
        writes them; counts the results."""
        sent, self.producer.sent = self.producer.sent, []
        replies = []
        for message in sent:
            if message.topic == self.topics.results:
                self.finished += 1
                continue
            if not message.topic.startswith(self.topics.service_prefix):
                continue
            command = CommandEvent.model_validate_json(message.value or b"")
            fields = {
                "schema_version": 1,
                "type": "reply",
                "command_id": command.command_id,
                "workflow_id": command.workflow_id,
                "step": command.step,
                "attempt": command.attempt,
                "status": "ok",
                "output": command.input,
                "service": ECHO,
                "instance": "echo-1",
                "replied_ms": clock.now_ms(),
            }
            value = encode_plain(fields)
            assert value is not None
            key = command.workflow_id.encode()
            hdrs = headers_for("reply", 1, None, command.command_id)
            hdrs += self.keys.headers(value, command.reply_to, key)
            replies.append(self._record(command.reply_to, key, value, hdrs))
        return replies


async def drive(
    inproc: InProcess, workflow: str, runs: int, profiler: cProfile.Profile | None = None
) -> float:
    """Run `runs` runs of `workflow` to the end with `IN_FLIGHT` in flight; the runtime's
    CPU seconds (its handling of batches only, not the echo's)."""
    runtime = inproc.mediator.runtime
    inbox: list[_Record] = []
    started = 0
    cpu = 0.0
    while inproc.finished < runs:
        live = started - inproc.finished
        while live < IN_FLIGHT and started < runs:
            inbox.append(inproc.request(workflow, started))
            started += 1
            live += 1
        if not inbox:
            msg = f"stalled: {inproc.finished} of {runs} runs finished, nothing to deliver"
            raise RuntimeError(msg)
        while inbox:
            batch, inbox = inbox[:BATCH], inbox[BATCH:]
            before = time.process_time()
            if profiler is not None:
                profiler.enable()
            await runtime.handle_inbound(batch)
            if profiler is not None:
                profiler.disable()
            cpu += time.process_time() - before
            inbox += inproc.answer()
    return cpu


def settings_for(redis_url: str, workdir: str) -> Settings:
    """The suite's settings (signing on, 16 shards), its workflows, a fresh key prefix."""
    path = f"{workdir}/workflows.yaml"
    with open(path, "w") as out:
        yaml.safe_dump({"workflows": list(WORKFLOWS.values())}, out)
    run = f"inproc{secrets.token_hex(4)}"
    return load_settings(
        kafka={"enable_idempotence": False, "topic_prefix": f"{run}.",
               "service_topic_prefix": f"{run}.svc.", "partitions": 4},
        redis={"url": redis_url, "key_prefix": run, "shards": 16},
        http={"enabled": False},
        workflows=[path],
        log_level="WARNING",
        signing={"keys": {BENCH_KEY_ID: BENCH_KEY}},
    )  # fmt: skip


@contextlib.asynccontextmanager
async def _redis(redis_url: str | None) -> AsyncIterator[str]:
    if redis_url:
        yield redis_url
        return
    async with EmbeddedRedis() as redis:
        yield redis.url


async def _redis_cpu(redis: Any) -> float:
    """The Redis server's CPU seconds so far (user and system, every thread)."""
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def measure(
    redis_url: str, workdir: str, workflow: str, runs: int, profile_to: str | None = None
) -> tuple[float, float]:
    """Microseconds of the runtime's CPU, and of Redis's, per step over `runs` runs
    (after a warm-up)."""
    async with InProcess(settings_for(redis_url, workdir)) as inproc:
        await drive(inproc, workflow, 200)
        inproc.finished = 0
        profiler = cProfile.Profile() if profile_to else None
        redis = inproc.mediator.redis
        before = await _redis_cpu(redis)
        cpu = await drive(inproc, workflow, runs, profiler)
        redis_cpu = await _redis_cpu(redis) - before
        if profiler is not None and profile_to:
            profiler.dump_stats(profile_to)
    steps = runs * steps_of(workflow)
    return cpu * 1e6 / steps, redis_cpu * 1e6 / steps


async def run_inproc(
    redis_url: str | None, profile: Profile, out: list[Measure], runs: int | None = None
) -> list[Measure]:
    """``inproc.<workflow>.cpu_per_step`` (the runtime's) and ``.redis_cpu_per_step``
    for chain3 and chain1."""
    import tempfile

    if runs is None:
        runs = 500 if profile.name == "quick" else 3000
    note = f"the runtime in process, Kafka replaced by lists, {runs} runs, {IN_FLIGHT} in flight"
    found = {
        workflow: (
            Measure(f"inproc.{workflow}.cpu_per_step", "us CPU", note=note),
            Measure(f"inproc.{workflow}.redis_cpu_per_step", "us CPU", note=note),
        )
        for workflow in ("chain3", "chain1")
    }
    for pair in found.values():
        out += pair
    with tempfile.TemporaryDirectory() as workdir:
        async with _redis(redis_url) as url:
            for _ in range(profile.repeat):
                for workflow, (runtime_us, redis_us) in found.items():
                    mine, theirs = await measure(url, workdir, workflow, runs)
                    runtime_us.values.append(round(mine, 1))
                    redis_us.values.append(round(theirs, 1))
    return out


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--workflow", default="chain3")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--redis", default=None, help="a Redis URL (default: an embedded one)")
    parser.add_argument("--profile", default=None, help="write a cProfile of the last repetition")
    args = parser.parse_args()

    async def go() -> None:
        with tempfile.TemporaryDirectory() as workdir:
            async with _redis(args.redis) as url:
                for i in range(args.repeat):
                    last = i == args.repeat - 1
                    mine, theirs = await measure(
                        url, workdir, args.workflow, args.runs, args.profile if last else None
                    )
                    print(
                        f"{args.workflow}: runtime {mine:.1f}, Redis {theirs:.1f} us CPU per step"
                    )

    from mediator import loops

    loops.run(go())


if __name__ == "__main__":
    main()
