"""Two workers in one process stop on one SIGTERM: each drains, the process exits."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap

import pytest

from mediator.cli.infra import create_topics
from topics.names import Topics

PROGRAM = textwrap.dedent(
    """
    import asyncio, sys
    from mediator.sdk.worker import Worker
    from topics.names import Topics

    async def main(bootstrap, prefix):
        topics = Topics(prefix=prefix, service_prefix=prefix + "svc.")
        workers = [
            Worker(name, bootstrap, topics=topics, signing=False, enable_idempotence=False,
                   heartbeat_interval=None)
            for name in ("one", "two")
        ]
        running = [asyncio.create_task(w.run()) for w in workers]
        while not all(w._task for w in workers):
            await asyncio.sleep(0.05)
        print("ready", flush=True)
        await asyncio.gather(*running)
        print("stopped", flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@pytest.mark.slow
async def test_one_sigterm_drains_every_worker_of_the_process(
    topics: Topics, kafka: object
) -> None:
    bootstrap = kafka.bootstrap_servers  # type: ignore[attr-defined]
    await create_topics(bootstrap, [topics.service("one"), topics.service("two")], partitions=1)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PROGRAM,
        bootstrap,
        topics.prefix,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert line.strip() == b"ready", line
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
        rest = await process.stdout.read()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0, rest.decode()
    assert b"stopped" in rest, rest.decode()
