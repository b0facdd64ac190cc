"""Where a step's CPU goes: the replica sampled by ``py-spy`` while it runs 3-step chains,
each sample given to the stage of the step's work it was in.

Each repetition takes, for each of `VARIANTS` (plain chain3, and chain3 with the transition
stream on), a fresh rig (one echo instance, one replica in its own process), warms it up,
then runs chain3 to completion with ``py-spy record --nonblocking`` attached to the
replica. The replica's CPU per step (from /proc) is split between the stages in
proportion to their samples. A sample belongs to the innermost frame that names a stage
(see ``RULES``): a pydantic or orjson call made by the commit builder is the commit's, one
made by the consumer's decoding is decoding's.

``py-spy`` is a separate install (``pip install py-spy``; it needs to be allowed to read
another process's memory: root, or ``ptrace_scope`` 0). Without it the section says so
and measures nothing.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Measure, Profile, run_count
from benchmarks.cpu import cpu_seconds
from benchmarks.mediator_bench import make_client, submitter, warm_up
from benchmarks.stage import Rig, Stage, steps_of

__all__ = ["RULES", "STAGES", "VARIANTS", "attribute", "classify", "run_stages"]

#: (workflow, runs, runs in flight): 9,000 steps, with about 100 steps in flight as the
#: growth section runs them.
LOAD = ("chain3", 3000, 100)
RATE_HZ = 1000

#: Where a frame's code is (py-spy names files from their ``sys.path`` entry: ``hmac.py``,
#: ``mediator/core/state.py``) -> its stage, tried in order; the first rule the file starts
#: with wins. Frames are looked at from the innermost out, so the deepest frame that any
#: rule names decides.
RULES: tuple[tuple[str, str], ...] = (
    ("logging/", "logging"),
    ("mediator/logs.py", "logging"),
    ("mediator/core/signing.py", "signature"),
    ("hmac.py", "signature"),
    ("mediator/runtime/stats.py", "counters and metrics"),
    ("mediator/runtime/metrics.py", "counters and metrics"),
    ("mediator/runtime/recording.py", "counters and metrics"),
    ("mediator/core/counters.py", "counters and metrics"),
    ("mediator/core/metrics.py", "counters and metrics"),
    ("mediator/runtime/tracing.py", "counters and metrics"),
    ("mediator/runtime/outbox.py", "outbox encode and produce"),
    ("mediator/codec.py:encode", "outbox encode and produce"),
    ("mediator/codec.py:headers", "outbox encode and produce"),
    ("topics/headers.py", "outbox encode and produce"),
    ("aiokafka/producer/", "outbox encode and produce"),
    ("mediator/producers.py", "outbox encode and produce"),
    ("mediator/storage/", "commit build and Redis"),
    ("mediator/runtime/commits.py", "commit build and Redis"),
    ("mediator/core/state.py", "commit build and Redis"),
    ("redis/", "commit build and Redis"),
    ("mediator/core/", "engine"),
    ("mediator/workflows/", "engine"),
    ("aiokafka/consumer/", "consume and decode"),
    ("aiokafka/record/", "consume and decode"),
    ("mediator/runtime/messages.py", "consume and decode"),
    ("mediator/runtime/consumers.py", "consume and decode"),
    ("mediator/runtime/batches.py", "consume and decode"),
    ("mediator/codec.py", "consume and decode"),
    ("faststream/", "consume and decode"),
    ("topics/", "consume and decode"),
    ("mediator/", "runtime (other)"),
    ("aiokafka/", "kafka client (other)"),
    ("asyncio/", "event loop"),
    ("uvloop", "event loop"),
)
STAGES = (
    "consume and decode",
    "signature",
    "engine",
    "commit build and Redis",
    "outbox encode and produce",
    "counters and metrics",
    "logging",
    "runtime (other)",
    "kafka client (other)",
    "event loop",
    "other",
)


#: Stages a frame gives only when nothing above it names another: the event loop's own
#: frames (a Redis write through asyncio's streams is Redis's, not the loop's).
LOOP = "event loop"


def classify(stack: list[str]) -> str:
    """The stage of one sampled stack (outermost frame first, each ``function (file:line)``)."""
    fallback = "other"
    for frame in reversed(stack):
        where = _where(frame)
        for text, stage in RULES:
            if where.startswith(text) or f"/{text}" in where:
                if stage != LOOP:
                    return stage
                fallback = LOOP
                break
    return fallback


def _where(frame: str) -> str:
    """``file:function`` of a py-spy frame ``function (file:line)``."""
    name, _, rest = frame.partition(" (")
    return f"{rest.rsplit(':', 1)[0]}:{name}"


def attribute(raw: str) -> tuple[dict[str, int], collections.Counter[str]]:
    """Samples per stage, and per innermost frame, of py-spy's raw (collapsed) output."""
    per_stage: dict[str, int] = dict.fromkeys(STAGES, 0)
    leaves: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        stack = [f for f in stack_text.split(";") if not f.startswith(("process ", "thread "))]
        if not stack:
            continue
        count = int(count_text)
        per_stage[classify(stack)] += count
        leaves[_where(stack[-1])] += count
    return per_stage, leaves


#: The variants profiled: (name, settings overrides). With the transition stream on, a
#: step also writes its events through the outbox: where that costs shows beside plain.
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("chain3", {}),
    ("chain3_events", {"events": {"enabled": True}}),
)


async def run_stages(stage: Stage, profile: Profile, out: list[Measure]) -> list[Measure]:
    """``stages.<variant>.<stage>.us_per_step`` for every stage, and the CPU per step they
    split, for each variant, side by side in every repetition."""
    spy = shutil.which("py-spy")
    if spy is None:
        print("stages: py-spy is not installed (pip install py-spy): section skipped")
        return out
    workflow, runs, in_flight = LOAD
    runs = runs // 4 if profile.name == "quick" else runs
    note = f"the replica, {runs} {workflow} runs to completion, {in_flight} in flight"
    measures: dict[str, list[Measure]] = {}
    for variant, _ in VARIANTS:
        measures[variant] = [
            Measure(f"stages.{variant}.cpu_per_step", "us CPU", note=note),
            *(Measure(f"stages.{variant}.{_slug(name)}.us_per_step", "us CPU", note=name)
              for name in STAGES),
        ]  # fmt: skip
        out += measures[variant]
    for _ in range(profile.repeat):
        for variant, overrides in VARIANTS:
            async with stage.rig("stages", mediator=True, **overrides) as rig:
                us, counts, leaves = await _profile(spy, rig, workflow, runs, in_flight)
            sampled = sum(counts.values())
            total, *per = measures[variant]
            total.values.append(round(us, 1))
            for name, measure in zip(STAGES, per, strict=True):
                measure.values.append(round(us * counts[name] / sampled, 1))
            print(f"stages ({variant}):", end=" ")
            _print_leaves(leaves, us)
    return out


async def _profile(
    spy: str, rig: Rig, workflow: str, runs: int, in_flight: int
) -> tuple[float, dict[str, int], collections.Counter[str]]:
    """The replica's CPU per step over `runs` runs, and its samples per stage and leaf."""
    assert rig.replica is not None and rig.replica.process is not None
    pid = rig.replica.process.pid
    async with make_client(rig.settings) as client:
        await warm_up(client, workflow)
        with tempfile.TemporaryDirectory() as tmp:
            raw_path = Path(tmp) / "stacks.txt"
            sampler = await _start(spy, pid, raw_path)
            used = cpu_seconds(pid)
            done = await run_count(
                submitter(client, workflow), runs, in_flight=in_flight, timeout_s=300
            )
            used = cpu_seconds(pid) - used
            await _stop(sampler)
            raw = raw_path.read_text() if raw_path.exists() else ""
    _keep(raw, rig.settings.events.enabled)
    if done != runs:
        msg = f"stages: {done} of {runs} {workflow} runs completed"
        raise RuntimeError(msg)
    counts, leaves = attribute(raw)
    if not sum(counts.values()):
        msg = "stages: py-spy took no samples (is ptrace allowed?)"
        raise RuntimeError(msg)
    return used * 1e6 / (runs * steps_of(workflow)), counts, leaves


async def _start(spy: str, pid: int, raw_path: Path) -> asyncio.subprocess.Process:
    sampler = await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--nonblocking",
        "--format", "raw", "--output", str(raw_path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.sleep(0.5)  # attached before the load starts
    return sampler


async def _stop(sampler: asyncio.subprocess.Process) -> None:
    if sampler.returncode is None:
        sampler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        async with asyncio.timeout(30):
            await sampler.wait()
    except TimeoutError:
        sampler.kill()
        await sampler.wait()


def _print_leaves(leaves: collections.Counter[str], us_per_step: float, top: int = 25) -> None:
    """The functions the samples ended in most (self time), in microseconds per step."""
    total = sum(leaves.values()) or 1
    print(f"stages: {us_per_step:.1f} us CPU per step; innermost frames, us per step:")
    for where, count in leaves.most_common(top):
        print(f"  {us_per_step * count / total:7.2f}  {where}")


def _keep(raw: str, events: bool) -> None:
    """With ``MEDIATOR_STAGES_OUT=<dir>``, the sampled stacks of every repetition are kept
    there (py-spy's collapsed format, for a flame graph), named by variant and time."""
    folder = os.environ.get("MEDIATOR_STAGES_OUT")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        variant = "events" if events else "plain"
        name = f"stacks-{variant}-{time.strftime('%H%M%S')}.txt"
        (Path(folder) / name).write_text(raw)


def _slug(name: str) -> str:
    return "_".join(name.replace("(", "").replace(")", "").split())
