"""A worker's actions: registered by name, run on a command's input, their outcome made
a reply."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic_core import PydanticSerializationError

from mediator.errors import MediatorError
from mediator.sdk.claims import ClaimMissing, Claims, ClaimUnavailable
from mediator.sdk.replies import Replies
from mediator.sdk.tracing import action_span
from topics.events import (
    CommandEvent,
    ErrorInfo,
)

__all__ = ["ActionError", "Actions", "Handler"]

log = logging.getLogger("mediator.worker")

Handler = Callable[..., Any]
"""An action: ``(input)`` or ``(input, command)``, returning the step's output (any JSON)."""
H = TypeVar("H", bound=Handler)

_UNTRACED = contextlib.nullcontext()


class ActionError(MediatorError):
    """Raised by a handler to fail its step with a chosen code and retry policy."""

    def __init__(self, message: str, *, code: str = "error", retryable: bool = False) -> None:
        self.message, self.code, self.retryable = message, code, retryable
        super().__init__(f"{code}: {message}")


class Actions(Replies):
    """Registers actions and runs them."""

    #: Large values by reference: references in a command's input are resolved before
    #: its action runs, and an output over the threshold is stored and sent as one.
    claims: Claims | None

    def action(self, name: str, *, idempotent: bool = False) -> Callable[[H], H]:
        """Decorator registering ``fn`` as the handler of action ``name``; with
        `idempotent`, its work is done once per idempotency key (see the module)."""

        def register(fn: H) -> H:
            self.add_action(name, fn, idempotent=idempotent)
            return fn

        return register

    def add_action(self, name: str, fn: Handler, *, idempotent: bool = False) -> None:
        """Register ``fn`` as the handler of ``name``: ``(input)`` or ``(input, command)``;
        with `idempotent`, deduplicated on the command's idempotency key too."""
        if name in self._actions:
            msg = f"action {name!r} of service {self.service!r} is already registered"
            raise ValueError(msg)
        self._actions[name] = (fn, _wants_command(fn, name))
        if idempotent:
            self._idempotent.add(name)

    async def _execute(self, command: CommandEvent, tracing: bool) -> bytes:
        """Run the command's action and encode its reply; every failure becomes an error reply."""
        entry = self._actions.get(command.action)
        if entry is None:
            known = ", ".join(sorted(self._actions)) or "(none)"
            msg = f"service {self.service!r} has no action {command.action!r}; known: {known}"
            return self._error(command, ErrorInfo(message=msg, code="unknown_action"))
        fn, wants_command = entry
        async with self._limit:
            self.stats["executed"] += 1
            started = time.perf_counter()
            try:
                # A failure is recorded on the span (when tracing) as it leaves it.
                with action_span(self.service, command) if tracing else _UNTRACED:
                    result = await self._call(fn, wants_command, command)
            except ClaimMissing as exc:
                info = ErrorInfo(message=str(exc), code="claim_missing", retryable=False)
            except ClaimUnavailable as exc:
                info = ErrorInfo(message=str(exc), code="claim_unavailable", retryable=True)
            except ActionError as exc:
                info = ErrorInfo(message=exc.message, code=exc.code, retryable=exc.retryable)
            except (Exception, asyncio.CancelledError) as exc:
                # A CancelledError the handler raised itself (we were not cancelled) is a
                # failure like any other; re-running it on redelivery would loop forever.
                current = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and current and current.cancelling():
                    raise
                log.exception(
                    "action %s.%s failed",
                    self.service,
                    command.action,
                    extra={
                        "workflow_id": command.workflow_id,
                        "step": command.step,
                        "attempt": command.attempt,
                        "trace_id": command.trace_id,
                    },
                )
                info = ErrorInfo(
                    message=f"{type(exc).__name__}: {exc}", code="exception", retryable=True
                )
            else:
                try:
                    reply = self._ok(command, result)
                except PydanticSerializationError as exc:
                    msg = f"action {command.action!r} returned output that is not JSON: {exc}"
                    info = ErrorInfo(message=msg, code="bad_output")
                else:
                    self._tally.record((time.perf_counter() - started) * 1000, error=False)
                    return reply
            self._tally.record((time.perf_counter() - started) * 1000, error=True)
        return self._error(command, info)

    async def _call(self, fn: Handler, wants_command: bool, command: CommandEvent) -> Any:
        """The handler's output for `command`: its input's references resolved first, and
        the output stored by reference when it is over the threshold."""
        data = command.input
        if self.claims is not None:
            data = await self.claims.resolve(data)
        result = fn(data, command) if wants_command else fn(data)
        if inspect.isawaitable(result):
            result = await result
        if self.claims is not None:
            result = await self.claims.offload(result)
        return result


def _wants_command(fn: Handler, name: str) -> bool:
    """Whether ``fn`` takes ``(input, command)`` rather than ``(input)``; decided once."""
    positional = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if any(p.kind is p.VAR_POSITIONAL for p in positional):
        return True
    required = [p for p in positional if p.default is p.empty]
    if not positional or len(required) > 2:
        msg = f"handler of action {name!r} must take (input) or (input, command)"
        raise TypeError(msg)
    return len(positional) >= 2
