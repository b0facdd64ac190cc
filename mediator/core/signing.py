"""Message signatures: HMAC-SHA256 over a record's topic, key and value, named by a key id
header.

A signed record carries ``mediator-key`` (the key id) and ``mediator-signature-2``
(lowercase hex of ``HMAC-SHA256(secret, bound(topic, key, value))``, where `secret` is the
key's UTF-8 bytes and `bound` the canonical string below). The value is the whole event,
type tag included, so a signed command cannot pass for a reply; the topic and key are in
the signed string, so a record published again to another topic (a command for one service
to another's inbox) or under another key does not verify. While services upgrade,
``legacy`` signers also send ``mediator-signature`` (over the value alone) and legacy
checkers accept it.

Keys belong to one service (`Key.service`) or are shared by every service without keys of
its own (`service` None). A `Keyring` is one party's keys: it signs with its current key
and accepts any of them, so a key can rotate without downtime: add the new key everywhere,
switch the current one, then retire the old.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from mediator.errors import MediatorError
from topics.headers import KEY_ID, SIGNATURE, SIGNATURE_2

__all__ = [
    "Key",
    "Keyring",
    "Operator",
    "Operators",
    "SignatureError",
    "Signatures",
    "bound",
    "parse_keys",
]

MIN_SECRET_CHARS = 16
#: `SignatureError.code`s: no signature headers; a signature no key of ours made; no key
#: to sign with.
UNSIGNED, BAD_SIGNATURE, NO_KEY = "unsigned", "bad_signature", "no_key"
#: A control signed by an operator who may not send it; one issued too long ago; a record
#: signed over its value alone where the topic and key must be signed too.
FORBIDDEN, STALE, UNBOUND = "forbidden", "stale", "unbound"


def bound(topic: str, key: bytes | None, value: bytes | None) -> bytes:
    """The string a signature covers: ``mediator-2``, the topic, the key in lowercase hex
    (empty for none) and the value, the first three each followed by a newline."""
    return b"mediator-2\n%s\n%s\n%s" % (topic.encode(), (key or b"").hex().encode(), value or b"")


class SignatureError(MediatorError, ValueError):
    """A record that must be signed is not, or not with a key this party accepts.

    `code` is ``unsigned`` (no signature headers) or ``bad_signature``.
    """

    def __init__(self, code: str, reason: str) -> None:
        self.code, self.reason = code, reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Key:
    """One signing key: its id (sent in the header), its secret and its owner."""

    id: str
    secret: bytes = field(repr=False)
    service: str | None = None  # None: shared by every service without keys of its own
    _keyed: hmac.HMAC = field(init=False, repr=False, compare=False)

    def sign(self, value: bytes) -> bytes:
        # A copy of the keyed state skips hashing the key's two pads for every value.
        mac = self._keyed.copy()
        mac.update(value)
        return mac.hexdigest().encode()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_keyed", hmac.new(self.secret, digestmod=hashlib.sha256))


class Keyring:
    """Keys one party signs with (`current`) and accepts (all of them)."""

    __slots__ = ("_by_id", "current")

    def __init__(self, keys: Iterable[Key], current: str | None = None) -> None:
        self._by_id: dict[str, Key] = {}
        for key in keys:
            if key.id in self._by_id:
                msg = f"signing key id {key.id!r} is given twice; key ids must be unique"
                raise ValueError(msg)
            self._by_id[key.id] = key
        if not self._by_id:
            msg = "a keyring needs at least one key"
            raise ValueError(msg)
        chosen = current if current is not None else next(iter(self._by_id))
        if chosen not in self._by_id:
            known = ", ".join(self._by_id)
            msg = f"current signing key {chosen!r} is not one of the keys ({known})"
            raise ValueError(msg)
        self.current = self._by_id[chosen]

    @classmethod
    def parse(cls, text: str, service: str | None = None) -> Keyring:
        """Keys from ``id=secret,id=secret`` (the first signs), e.g. an environment
        variable's value."""
        return cls(parse_keys(text, service))

    @property
    def keys(self) -> list[Key]:
        return list(self._by_id.values())

    @property
    def ids(self) -> list[str]:
        return list(self._by_id)

    def headers(
        self, value: bytes, topic: str, key: bytes | None, legacy: bool = False
    ) -> list[tuple[str, bytes]]:
        """The signature headers of a record of `value` published to `topic` under `key`,
        signed with the current key (`legacy`: over the value alone, too)."""
        current = self.current
        signed = [
            (KEY_ID, current.id.encode()),
            (SIGNATURE_2, current.sign(bound(topic, key, value))),
        ]
        if legacy:
            signed.append((SIGNATURE, current.sign(value)))
        return signed

    def check(
        self,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        topic: str,
        record_key: bytes | None,
        legacy: bool = False,
    ) -> Key:
        """The key that signed this record (`value`, as read from `topic` under
        `record_key`);
        `SignatureError` when none of ours did. A signature over the value alone holds
        only when `legacy`."""
        key_id = signature = plain = None
        for name, header in headers or ():
            if name == KEY_ID:
                key_id = header
            elif name == SIGNATURE_2:
                signature = header
            elif name == SIGNATURE:
                plain = header
        if key_id is None or (signature is None and plain is None):
            msg = f"not signed (no {KEY_ID!r} and {SIGNATURE_2!r} headers)"
            raise SignatureError(UNSIGNED, msg)
        name = key_id.decode(errors="replace")
        key = self._by_id.get(name)
        if key is None:
            msg = f"signed with key {name[:100]!r}, which is not one of ours"
            raise SignatureError(BAD_SIGNATURE, msg)
        if signature is not None:
            if not hmac.compare_digest(key.sign(bound(topic, record_key, value)), signature):
                msg = (
                    f"signature does not match the topic, key and value under key {name!r}: "
                    "forged, altered, or published again elsewhere"
                )
                raise SignatureError(BAD_SIGNATURE, msg)
            return key
        if not legacy:
            msg = (
                f"signed over its value alone ({SIGNATURE!r}), which holds on any topic: sign "
                f"the topic, key and value ({SIGNATURE_2!r}), or accept value-only signatures "
                "while services upgrade (signing.legacy_signatures)"
            )
            raise SignatureError(UNBOUND, msg)
        assert plain is not None
        if not hmac.compare_digest(key.sign(value or b""), plain):
            msg = f"signature does not match the value under key {name!r}: forged or altered"
            raise SignatureError(BAD_SIGNATURE, msg)
        return key


def parse_keys(spec: str | Mapping[str, str], service: str | None = None) -> list[Key]:
    """Keys from ``id=secret,id=secret``, a JSON object or a mapping of id to secret, in
    order."""
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            spec = json.loads(spec)
        except ValueError as exc:
            msg = f"signing keys are not valid JSON: {exc}"
            raise ValueError(msg) from None
        if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
            msg = "signing keys in JSON must be an object of key id to secret string"
            raise ValueError(msg)
    if isinstance(spec, str):
        pairs = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key_id, sep, secret = part.partition("=")
            if not sep:
                msg = "a signing key must be written id=secret"
                raise ValueError(msg)
            pairs.append((key_id.strip(), secret.strip()))
    else:
        pairs = list(spec.items())
    keys = []
    for key_id, secret in pairs:
        if not key_id:
            msg = "a signing key needs an id"
            raise ValueError(msg)
        if len(secret) < MIN_SECRET_CHARS:
            msg = f"signing key {key_id!r} is too short: use at least {MIN_SECRET_CHARS} characters"
            raise ValueError(msg)
        keys.append(Key(key_id, secret.encode(), service))
    return keys


class Signatures:
    """The mediator's keys: every service's own keyring and the shared one.

    Commands to a service (and error replies the mediator writes in a service's stead) are
    signed with that service's current key, else the shared one; a reply or heartbeat is
    accepted under any key, and `check` says whose it is, so the caller can hold a record
    to the service it claims to come from.
    """

    __slots__ = ("_all", "_services", "legacy", "shared")

    def __init__(
        self, shared: Keyring | None, services: Mapping[str, Keyring], legacy: bool = False
    ) -> None:
        self.shared = shared
        #: Also sign over the value alone, and accept such signatures (while services
        #: upgrade to signatures over topic, key and value).
        self.legacy = legacy
        self._services = dict(services)
        rings = [*([shared] if shared else []), *self._services.values()]
        if not rings:
            msg = "signing needs at least one key"
            raise ValueError(msg)
        # One ring of every key (ids unique across them all), to check with.
        self._all = Keyring(key for ring in rings for key in ring.keys)

    def keyring(self, service: str) -> Keyring | None:
        """The keys `service` signs and verifies with: its own, else the shared ones."""
        return self._services.get(service, self.shared)

    def sign(
        self, service: str, value: bytes, topic: str, key: bytes | None
    ) -> list[tuple[str, bytes]]:
        """Signature headers of `value`, a record to or for `service` on `topic`."""
        ring = self.keyring(service)
        if ring is None:
            msg = (
                f"no signing key for service {service!r}: give it keys "
                f"(signing.services.{service}.keys) or set shared ones (signing.keys)"
            )
            raise SignatureError(NO_KEY, msg)
        return ring.headers(value, topic, key, self.legacy)

    def has_own_keys(self, service: str | None = None) -> bool:
        """Whether `service` has keys of its own (shared keys then do not sign for it);
        without `service`, whether any service has."""
        return service in self._services if service is not None else bool(self._services)

    def sign_any(self, value: bytes, topic: str, key: bytes | None) -> list[tuple[str, bytes]]:
        """Signature headers of a record of the mediator's own that is for no one service
        (a health-topic marker): the shared current key, else the first service's."""
        ring = self.shared or self._services[min(self._services)]
        return ring.headers(value, topic, key, self.legacy)

    def check(
        self,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        topic: str,
        key: bytes | None,
    ) -> Key:
        """The key that signed the record; `SignatureError` when no key of ours did."""
        return self._all.check(value, headers, topic, key, self.legacy)

    def unsigned(self, services: Iterable[str]) -> list[str]:
        """Those of `services` that have no key to be signed with."""
        return sorted(s for s in services if self.keyring(s) is None)


@dataclass(frozen=True, slots=True)
class Operator:
    """Someone allowed to send controls: their id (what the audit log records), their
    keys, and the control actions they may send (`may`, by action value)."""

    id: str
    keys: Keyring
    may: frozenset[str]


class Operators:
    """The operators whose signed controls the mediator accepts.

    A control is accepted only signed by an operator's key, for an action that operator
    may send, and issued recently (`max_age_ms`): the signed operator id, not the
    control's own ``operator`` field, is who sent it. A captured control published again
    later is refused as stale; within its age, a control for a run is applied once (its
    id is remembered by the run).
    """

    __slots__ = ("_by_key", "max_age_ms", "ring")

    def __init__(self, operators: Iterable[Operator], max_age_ms: int = 300_000) -> None:
        self._by_key: dict[str, Operator] = {}
        for operator in operators:
            for key in operator.keys.keys:
                self._by_key[key.id] = operator
        self.ring = Keyring(
            k for o in {o.id: o for o in self._by_key.values()}.values() for k in o.keys.keys
        )
        self.max_age_ms = max_age_ms

    def authorise(
        self,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        topic: str,
        record_key: bytes | None,
        action: str,
        issued_ms: int,
        now_ms: int,
    ) -> str:
        """The id of the operator who signed this control; `SignatureError` when no
        operator did, the signer may not send `action`, or the control is stale."""
        key = self.ring.check(value, headers, topic, record_key)
        operator = self._by_key[key.id]
        if action not in operator.may:
            allowed = ", ".join(sorted(operator.may)) or "nothing"
            msg = f"operator {operator.id!r} may not {action} (may: {allowed})"
            raise SignatureError(FORBIDDEN, msg)
        age = now_ms - issued_ms
        if age > self.max_age_ms or age < -60_000:
            msg = (
                f"issued {age // 1000} s ago, outside the {self.max_age_ms // 1000} s a "
                "control is accepted for (a replay, or a clock far off)"
            )
            raise SignatureError(STALE, msg)
        return operator.id
