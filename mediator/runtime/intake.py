"""Where records enter the runtime: decoding, signature and size checks, dead letters,
and the flush of what a batch publishes directly."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import TypeAdapter, ValidationError

from mediator.clock import now_ms
from mediator.codec import encode, headers, validation_reason
from mediator.core.signing import UNSIGNED, SignatureError
from mediator.errors import StateUnavailable
from mediator.runtime.context import (
    BatchOutput,
    Record,
    RuntimeContext,
)
from mediator.runtime.failures import dead_letter
from mediator.runtime.messages import Message
from topics.events import (
    ControlEvent,
)
from topics.headers import KEY_ID

__all__ = ["Intake"]

log = logging.getLogger("mediator.runtime")


class Intake(RuntimeContext):
    """Decodes and checks records; dead-letters what cannot be taken."""

    def _oversized(self, record: Record, what: str) -> str | None:
        """Why `record` is over the size limit, or None when it is within it."""
        size = len(record.value or b"")
        limit = self.limits.max_message_bytes
        if size <= limit:
            return None
        return (
            f"{what} is {size} bytes, over the {limit}-byte limit "
            "(limits.max_message_bytes); send large data by reference"
        )

    def _signer(self, record: Record, out: BatchOutput) -> tuple[bool, str | None]:
        """Whether `record` may be applied, and whose key signed it: a service's name, or
        None for a shared key (or signing off). One no key of ours signed is
        dead-lettered."""
        if self.signatures is None:
            return True, None
        try:
            key = self.signatures.check(record.value, record.headers, record.topic, record.key)
            return True, key.service
        except SignatureError as exc:
            self._forged(record, exc.reason, out, exc.code)
            return False, None

    def _client(self, record: Record) -> str | None:
        """The client whose key signed a request; None for an unsigned one when signatures
        are optional. `SignatureError` when it may not be taken."""
        names = {name for name, _ in record.headers or ()}
        if KEY_ID not in names and self.requests_signed == "optional":
            return None
        if self.clients is None:
            msg = "requests must be signed by a client, and no client has keys (signing.clients)"
            raise SignatureError(UNSIGNED, msg)
        key = self.clients.check(record.value, record.headers, record.topic, record.key)
        return key.service

    def _operator(self, record: Record, control: ControlEvent, out: BatchOutput) -> str | None:
        """The operator who signed `control`, or None when no operator may have sent it
        (dead-lettered: unsigned, forged, not theirs to send, or stale)."""
        if self.operators is None:
            reason = "controls must be signed by an operator, and none is configured"
            self._forged(record, f"{reason} (signing.operators)", out, UNSIGNED)
            return None
        try:
            return self.operators.authorise(
                record.value,
                record.headers,
                record.topic,
                record.key,
                control.action.value,
                control.issued_ms,
                now_ms(),
            )
        except SignatureError as exc:
            self._forged(record, exc.reason, out, exc.code)
            return None

    def _forged(
        self, record: Record, reason: str, out: BatchOutput, code: str = "bad_signature"
    ) -> None:
        """Dead-letter a record whose signature does not hold: it is never applied."""
        self.stats.bad_signatures += 1
        out.counts["bad_signatures"] += 1
        self._dead_letter(record, f"rejected: {reason}", code, out)

    def _not_from(self, service: str, signer: str | None) -> str | None:
        """Why a record of `service` signed by `signer`'s key (None: a shared key) cannot
        be its own, or None when it can: a service's own key signs only for it, and shared
        keys only for services without keys of their own."""
        if signer is not None:
            return None if signer == service else f"{service!r} signed with a key of {signer!r}"
        if self.signatures is not None and self.signatures.has_own_keys(service):
            return f"{service!r} signed with a shared key, but it has keys of its own"
        return None

    def _decode(self, record: Record, model: Any, out: BatchOutput) -> Any:
        try:
            if isinstance(model, TypeAdapter):
                return model.validate_json(record.value or b"")
            return model.model_validate_json(record.value or b"")
        except ValidationError as exc:
            reason = validation_reason(exc)
        self._dead_letter(record, reason, "invalid", out)
        return None

    def _dead_letter(self, record: Record, reason: str, code: str, out: BatchOutput) -> None:
        self.stats.dead_letters += 1
        out.counts["dead_letters"] += 1
        out.counts[f"dead_letters:{code}"] += 1
        log.warning(
            "dead letter from %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason
        )
        out.dead.append(
            dead_letter(
                reason=reason,
                code=code,
                topic=record.topic,
                value=record.value,
                key=record.key,
                headers=record.headers or (),
                partition=record.partition,
                offset=record.offset,
                excerpt_bytes=self.limits.excerpt_bytes,
            )
        )

    async def _flush(self, out: BatchOutput) -> None:
        """Publish direct messages and dead letters, then count what was counted."""
        await self.dispatcher.send_now(
            out.direct
            + [
                Message(
                    -1,
                    f"dlq.{d.source_topic}.{d.partition}.{d.offset}",
                    self.topics.dlq,
                    d.key.encode() if d.key is not None else None,
                    encode(d),
                    headers(d),
                    "dead_letter",
                )
                for d in out.dead
            ]
        )
        if out.counts:
            await self.store.count(dict(out.counts))
        if out.controls:
            try:
                await self.store.control_outcomes(out.controls, now_ms())
            except StateUnavailable as exc:
                # Not worth redelivering the batch for: a redelivered control would find
                # its run already changed and be recorded as refused, which is wrong. The
                # operator's command line says no replica answered, and the run shows it.
                log.warning("outcomes of %d controls not recorded: %s", len(out.controls), exc)
