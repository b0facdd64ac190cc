"""What a Redis Cluster would refuse: every script call and multi-key command whose keys
fall in more than one hash slot (CROSSSLOT), seen at the client as the mediator issues
them. `audited()` patches redis-py's asyncio client (single commands and pipelined
ones) for the block and collects what it finds; a test then asserts it found nothing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.client import Pipeline, Redis
from redis.crc import key_slot

__all__ = ["Audit", "audited"]

#: Commands whose every argument after the name is a key.
_ALL_KEYS = frozenset({"DEL", "UNLINK", "EXISTS", "MGET", "TOUCH", "WATCH", "SINTER", "SUNION"})
#: Commands whose first two arguments are keys.
_TWO_KEYS = frozenset({"RENAME", "RENAMENX", "SMOVE", "LMOVE", "RPOPLPUSH", "COPY"})


@dataclass
class Audit:
    """Commands seen, and those whose keys span slots (command, keys)."""

    seen: int = 0
    scripts: int = 0
    crossslot: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def check(self, args: tuple[Any, ...]) -> None:
        if not args:
            return
        self.seen += 1
        name = _text(args[0]).upper()
        if name in ("EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO"):
            self.scripts += 1
            keys = args[3 : 3 + int(args[2])]
        elif name in _ALL_KEYS:
            keys = args[1:]
        elif name in _TWO_KEYS:
            keys = args[1:3]
        else:
            return
        slots = {key_slot(_bytes(k)) for k in keys}
        if len(slots) > 1:
            self.crossslot.append((name, tuple(_text(k) for k in keys)))


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@contextmanager
def audited() -> Iterator[Audit]:
    """Within the block, every command the asyncio client sends is checked."""
    audit = Audit()
    single, queued = Redis.execute_command, Pipeline.pipeline_execute_command

    async def execute(self: Any, *args: Any, **options: Any) -> Any:
        if not isinstance(self, Pipeline):
            audit.check(args)
        return await single(self, *args, **options)

    def pipelined(self: Any, *args: Any, **options: Any) -> Any:
        audit.check(args)
        return queued(self, *args, **options)

    Redis.execute_command = execute  # type: ignore[method-assign]
    Pipeline.pipeline_execute_command = pipelined  # type: ignore[method-assign]
    try:
        yield audit
    finally:
        Redis.execute_command = single  # type: ignore[method-assign]
        Pipeline.pipeline_execute_command = queued  # type: ignore[method-assign]
