"""Where Kafka and Redis are and how to reach them securely."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from mediator.errors import ConfigurationError
from mediator.kafka import KafkaConnection
from mediator.settings.fields import DurationMs, DurationS
from topics.names import DEFAULT_PREFIX, DEFAULT_SERVICE_PREFIX, Topics


class KafkaSettings(KafkaConnection):
    """How to reach Kafka (addresses, TLS, SASL: `KafkaConnection`) and which topics to use."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    client_id: str = Field(
        default="mediator",
        description="Kafka client id of the replica's clients (the outbox producer adds "
        "`-outbox`).",
    )
    group_id: str = Field(
        default="mediator",
        description="Prefix of the replica's consumer groups: `<group_id>.inbound`, `.control`, "
        "`.health`.",
    )
    topic_prefix: str = Field(
        default=DEFAULT_PREFIX,
        description="Prefix of the mediator's topics (`<prefix>requests`, `replies`, `results`, "
        "...).",
    )
    service_topic_prefix: str = Field(
        default=DEFAULT_SERVICE_PREFIX,
        description="Prefix of the services' command topics (`<prefix><service>`).",
    )
    enable_idempotence: bool = Field(
        default=True,
        description="Apache Kafka supports the idempotent producer; the embedded Tansu broker "
        "does not (it rejects InitProducerId), so `mediator dev` turns it off. "
        "Correctness never depends on it: commands and results are deduplicated by id "
        "downstream.",
    )
    linger_ms: DurationMs = Field(
        default=1,
        ge=0,
        description="How long the outbox producer waits to fill a batch before sending it.",
    )
    max_batch_records: int = Field(
        default=500,
        ge=1,
        description="Most records a consumer hands to the runtime in one batch.",
    )
    partitions: int = Field(default=8, ge=1, description="Partitions for topics we create.")
    replication_factor: int = Field(default=1, ge=1, description="For topics we create.")
    fetch_max_wait_ms: DurationMs = Field(
        default=500,
        ge=0,
        description="How long the broker may hold a fetch open when no data is there. Apache "
        "Kafka answers as soon as data arrives, so a long wait costs nothing; Tansu "
        "waits it out, so the embedded default uses a few milliseconds (each hop "
        "would otherwise cost ~the wait).",
    )
    poll_timeout_ms: DurationMs = Field(
        default=500,
        ge=1,
        description="How long a subscriber's poll waits when nothing was fetched before it polls "
        "again. Records fetched meanwhile end the wait at once, so this costs no "
        "latency.",
    )
    session_timeout_ms: DurationMs = Field(
        default=10_000,
        ge=100,
        description="Consumer-group liveness. A dead replica's partitions move after the session "
        "timeout; Tansu also holds a JoinGroup reply for about half of it, which "
        "slows every start.",
    )
    heartbeat_interval_ms: DurationMs = Field(
        default=3_000,
        ge=10,
        description="Consumer-group heartbeat interval (below a third of `session_timeout_ms`).",
    )

    def consumer_options(self) -> dict[str, int]:
        """Options for any aiokafka consumer of this deployment (SDK workers included)."""
        return {
            "fetch_max_wait_ms": self.fetch_max_wait_ms,
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
        }

    @property
    def topics(self) -> Topics:
        """The topic names these settings select."""
        return Topics(prefix=self.topic_prefix, service_prefix=self.service_topic_prefix)


class RedisSettings(BaseModel):
    """Where orchestration state lives and how it is laid out."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(
        default="redis://127.0.0.1:6379/0",
        repr=False,
        description="``redis://`` or, for TLS, ``rediss://``. A password in it is never logged, "
        "but prefer `password` or `password_file`.",
    )
    mode: Literal["standalone", "cluster", "sentinel"] = Field(
        default="standalone",
        description="``standalone``: one Redis (with replicas, optionally). ``cluster``: a "
        "Redis Cluster (Redis 7+ / Valkey 8); `url` names any one of its nodes. "
        "``sentinel``: the primary the Sentinels in `sentinels` name for `sentinel_master`, "
        "found again after a failover; `url` gives only the scheme, credentials and database.",
    )
    sentinels: list[str] = Field(
        default_factory=list,
        description="With ``mode: sentinel``: the Sentinels, as ``host:port`` (JSON list in "
        "the environment).",
    )
    sentinel_master: str = Field(
        default="mymaster",
        description="With ``mode: sentinel``: the name the Sentinels monitor the primary by.",
    )
    sentinel_password: SecretStr | None = Field(
        default=None,
        description="With ``mode: sentinel``: the Sentinels' own password, when they require "
        "one (the primary's is `password`).",
    )
    username: str | None = Field(
        default=None,
        description="An ACL user and its password (Redis 6+), or the password of ``requirepass``.",
    )
    password: SecretStr | None = Field(
        default=None,
        description="The Redis password (with `username`: an ACL user); see also `password_file`.",
    )
    password_file: Path | None = Field(
        default=None,
        description="A file holding the password (a Docker or Kubernetes secret), instead of it.",
    )
    ssl_ca_certs: Path | None = Field(
        default=None,
        description="TLS (with a ``rediss://`` URL): the CA to trust, this client's certificate "
        "and key when the server asks for one, and whether the certificate must name "
        "the host.",
    )
    ssl_certfile: Path | None = Field(
        default=None,
        description="This client's certificate (PEM), for a Redis that requires client TLS.",
    )
    ssl_keyfile: Path | None = Field(
        default=None,
        description="This client's private key (PEM), with `ssl_certfile`.",
    )
    ssl_check_hostname: bool = Field(
        default=True,
        description="Check that Redis's certificate names the host connected to.",
    )
    key_prefix: str = Field(
        default="med",
        description="Prefix of every Redis key the mediator writes (see the key layout).",
    )
    shards: int = Field(
        default=16,
        ge=1,
        le=16384,
        description="Hash-tagged shards the runs are spread over; fixed once a deployment has "
        "data.",
    )
    retention_s: DurationS = Field(
        default=7 * 24 * 3600,
        gt=0,
        description="How long a finished run's state is kept.",
    )
    recent_limit: int = Field(
        default=1000,
        ge=1,
        description="Finished runs listed as recent, per shard.",
    )
    socket_timeout_s: DurationS = Field(
        default=5.0,
        gt=0,
        description="Without a timeout a stalled Redis would hang a handler forever; with one, "
        "the batch is rewound and redelivered once Redis answers again.",
    )
    call_timeout_s: DurationS = Field(
        default=15.0,
        gt=0,
        description="With ``mode: cluster``: how long one Redis call (a command, or a pipeline "
        "of them) may take in all, its client's retries, reconnections and layout refreshes "
        "included; past it the call fails as Redis unavailable (transient: what waited is "
        "retried with backoff). Without it, a cluster with a slot that no primary serves keeps "
        "a call retrying for minutes. At least `socket_timeout_s` plus `wait_timeout_ms`.",
    )
    wait_replicas: int = Field(
        default=0,
        ge=0,
        description="With Redis replicas: after each batch's commits, WAIT until this many "
        "replicas have them before Kafka offsets move, so a failover cannot lose a "
        "transition whose input was already acknowledged. 0 (the default) does not "
        "wait.",
    )
    wait_timeout_ms: DurationMs = Field(
        default=1_000,
        ge=1,
        description="How long a commit waits for `wait_replicas` Redis replicas to acknowledge it.",
    )
    tombstone_s: DurationS = Field(
        default=30 * 24 * 3600,
        ge=0,
        description="A finished run's request fingerprint and status are kept this long after its "
        "state expired, so a late duplicate is still recognised (and not run again).",
    )

    @field_validator("sentinels")
    @classmethod
    def _sentinel_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                msg = f"a Sentinel is host:port, not {address!r}"
                raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _sentinels_given(self) -> RedisSettings:
        if self.mode == "sentinel" and not self.sentinels:
            msg = "mode sentinel needs the Sentinels' addresses (redis.sentinels: [host:port])"
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _call_outlasts_its_parts(self) -> RedisSettings:
        least = self.socket_timeout_s + self.wait_timeout_ms / 1000
        if self.call_timeout_s < least:
            msg = (
                f"redis.call_timeout_s ({self.call_timeout_s:g}) must be at least "
                f"socket_timeout_s plus wait_timeout_ms ({least:g} s): a call that waits "
                "that long for one answer would be cut short"
            )
            raise ValueError(msg)
        return self

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """`sentinels` as (host, port) pairs."""
        return [
            (a.rpartition(":")[0].strip("[]"), int(a.rpartition(":")[2])) for a in self.sentinels
        ]

    def client_options(self) -> dict[str, Any]:
        """redis-py's options for these settings: credentials and TLS (with the URL)."""
        options: dict[str, Any] = {}
        if self.password is not None and self.password_file is not None:
            msg = "give redis.password or redis.password_file, not both"
            raise ConfigurationError(msg)
        if self.username is not None:
            options["username"] = self.username
        if self.password is not None:
            options["password"] = self.password.get_secret_value()
        elif self.password_file is not None:
            try:
                options["password"] = self.password_file.read_text().strip()
            except OSError as exc:
                msg = f"redis.password_file: {exc}"
                raise ConfigurationError(msg) from exc
        tls = {
            "ssl_ca_certs": self.ssl_ca_certs,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
        }
        given = {name: path for name, path in tls.items() if path is not None}
        if given or not self.ssl_check_hostname:
            if not self.url.startswith("rediss://"):
                msg = "redis TLS settings need a rediss:// URL (redis.url)"
                raise ConfigurationError(msg)
            for name, path in given.items():
                if not path.is_file():
                    msg = f"redis.{name}: {path} is not a readable file"
                    raise ConfigurationError(msg)
                options[name] = str(path)
            options["ssl_check_hostname"] = self.ssl_check_hostname
        return options
