"""Signing keys: the shared and per-service keys, operators and clients."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode

from mediator.core.signing import Keyring, Operator, Operators, Signatures, parse_keys
from mediator.settings.fields import DurationS, comma_separated


class KeySet(BaseModel):
    """Signing keys: id to secret (at least 16 characters); `current` signs (default: the
    first), all are accepted. Two at once let a key rotate without downtime."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keys: Annotated[dict[str, SecretStr], NoDecode] = Field(
        default_factory=dict,
        description="Keys by id (`id=secret`, 16+ characters): HMAC-SHA256 keys, several at once "
        "while one rotates.",
    )
    current: str | None = Field(
        default=None,
        description="The id of the key that signs (default: the first); the others only verify.",
    )
    keys_file: Path | None = Field(
        default=None,
        description="A file holding the keys (``id=secret,...`` or a JSON object: a Docker or "
        "Kubernetes secret), read at start and added to `keys`.",
    )

    @field_validator("keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: Any) -> Any:
        # From the environment: ``id=secret,id=secret`` or a JSON object.
        if isinstance(value, str):
            return {key.id: key.secret.decode() for key in parse_keys(value)}
        return value

    def revealed(self) -> dict[str, Any]:
        """As a JSON-ready dict with the secrets in it (a JSON dump shows them as stars)."""
        doc = self.model_dump(mode="json")
        doc["keys"] = {key_id: s.get_secret_value() for key_id, s in self.keys.items()}
        return doc

    def keyring(self, service: str | None = None) -> Keyring | None:
        """These keys as a keyring owned by `service` (None: shared); None when empty."""
        plain = {key_id: secret.get_secret_value() for key_id, secret in self.keys.items()}
        if self.keys_file is not None:
            try:
                text = self.keys_file.read_text().strip()
            except OSError as exc:
                msg = f"keys_file: {exc}"
                raise ValueError(msg) from exc
            plain |= {key.id: key.secret.decode() for key in parse_keys(text)}
        if not plain:
            return None
        return Keyring(parse_keys(plain, service), self.current)


Action = Literal[
    "cancel",
    "retry",
    "pause",
    "resume",
    "signal",
    "compensate",
    "subscribe",
    "reset_breaker",
    "drain",
    "undrain",
]
_ACTIONS: tuple[Action, ...] = get_args(Action)


class OperatorKeys(KeySet):
    """One operator's keys and what they may do (default: every control action)."""

    may: Annotated[list[Action], NoDecode, BeforeValidator(comma_separated)] = Field(
        default_factory=lambda: list(_ACTIONS)
    )


class SigningSettings(KeySet):
    """HMAC-SHA256 signatures on commands, replies and heartbeats (see
    `mediator.core.signing`). On by default: the mediator refuses to start without keys
    unless ``enabled`` is false."""

    enabled: bool = Field(
        default=True,
        description="Sign commands and check replies, heartbeats and controls (off: anyone may "
        "answer).",
    )
    services: dict[str, KeySet] = Field(
        default_factory=dict,
        description="Per-service keys, e.g. ``payments: {keys: {pay-2: ..., pay-1: ...}, current: "
        "pay-2}``; a service without its own signs with the shared `keys`.",
    )
    operators: dict[str, OperatorKeys] = Field(
        default_factory=dict,
        description="Who may send controls: operator id -> their keys and the actions they may "
        "send, e.g. ``alice: {keys: {alice-1: ...}, may: [cancel, retry]}``. A "
        "control is applied only signed by one of these keys (with signing on and "
        "`controls` required).",
    )
    operator: str | None = Field(
        default=None,
        description="The operator this process (the CLI, the dashboard) sends controls as.",
    )
    controls: Literal["required", "off"] = Field(
        default="required",
        description="``required``: unsigned controls, and those of operators who may not send "
        "them, are dead-lettered; ``off``: controls are not checked (a closed network "
        "only).",
    )
    control_max_age_s: DurationS = Field(
        default=300.0,
        gt=0,
        description="How long after it was issued a control is accepted: a captured control "
        "published again later is refused.",
    )
    clients: dict[str, KeySet] = Field(
        default_factory=dict,
        description="Clients whose signed requests are accepted: client id -> their keys. The id "
        "of the client whose key signed a request is kept with its run and in its "
        "audit log.",
    )
    requests: Literal["off", "optional", "required"] = Field(
        default="off",
        description="Requests: ``off`` (not checked), ``optional`` (a signed one must verify and "
        "is recorded as its client's; unsigned ones are taken) or ``required`` "
        "(unsigned ones are refused). Who may start workflows is otherwise up to "
        "Kafka ACLs.",
    )
    client: str | None = Field(
        default=None,
        description="The client this process (`mediator submit`) signs requests as.",
    )
    legacy_signatures: bool = Field(
        default=False,
        description="Also sign over the value alone (``mediator-signature``) and accept records "
        "signed so: only while services that predate signatures over topic, key and "
        "value upgrade.",
    )

    @field_validator("controls", "requests", mode="before")
    @classmethod
    def _unquoted_off(cls, value: Any) -> Any:
        # YAML reads an unquoted `off` as false: `requests: off` means "off".
        return "off" if value is False else value

    @model_validator(mode="after")
    def _valid_keys(self) -> SigningSettings:
        self.signatures()
        self.operator_keys()
        self.client_keys()
        if self.client is not None and self.client not in self.clients:
            msg = f"signing.client {self.client!r} is not one of signing.clients"
            raise ValueError(msg)
        if self.operator is not None and self.operator not in self.operators:
            msg = f"signing.operator {self.operator!r} is not one of signing.operators"
            raise ValueError(msg)
        return self

    def operator_keys(self) -> Operators | None:
        """The operators whose controls are accepted; None when none are configured."""
        try:
            found = [
                Operator(name, ring, frozenset(keys.may))
                for name, keys in self.operators.items()
                if (ring := keys.keyring()) is not None
            ]
            if not found:
                return None
            return Operators(found, round(self.control_max_age_s * 1000))
        except ValueError as exc:
            msg = f"signing.operators: {exc}"
            raise ValueError(msg) from exc

    def client_keys(self) -> Keyring | None:
        """Every client's keys in one ring (each key owned by its client: `Key.service`);
        None when no client has keys."""
        try:
            keys = [
                key
                for name, keyset in self.clients.items()
                if (ring := keyset.keyring(name)) is not None
                for key in ring.keys
            ]
            return Keyring(keys) if keys else None
        except ValueError as exc:
            msg = f"signing.clients: {exc}"
            raise ValueError(msg) from exc

    def request_signer(self) -> Keyring | None:
        """The keys this process signs requests with (`client`); None: unsigned."""
        if not self.enabled or self.client is None:
            return None
        return self.clients[self.client].keyring(self.client)

    def control_signer(self) -> tuple[str, Keyring] | None:
        """Who this process sends controls as, and the keys it signs them with: the
        configured `operator`, else the only one configured; None when none can sign."""
        name = self.operator
        if name is None and len(self.operators) == 1:
            name = next(iter(self.operators))
        if name is None:
            return None
        ring = self.operators[name].keyring()
        return (name, ring) if ring is not None else None

    def signatures(self) -> Signatures | None:
        """Every key, for the mediator; None when no key is set."""
        try:
            services = {}
            for service, keys in self.services.items():
                ring = keys.keyring(service)
                if ring is not None:
                    services[service] = ring
            shared = self.keyring()
            if not (shared or services):
                return None
            return Signatures(shared, services, self.legacy_signatures)
        except ValueError as exc:
            msg = f"signing: {exc}"
            raise ValueError(msg) from exc

    def revealed(self) -> dict[str, Any]:
        doc = super().revealed()
        doc["services"] = {name: keys.revealed() for name, keys in self.services.items()}
        doc["operators"] = {name: keys.revealed() for name, keys in self.operators.items()}
        doc["clients"] = {name: keys.revealed() for name, keys in self.clients.items()}
        return doc

    def for_service(self, service: str) -> Keyring | None:
        """The keys a process serving `service` signs and verifies with."""
        signatures = self.signatures()
        return signatures.keyring(service) if signatures is not None else None
