"""Where Kafka and Redis are and how to reach them securely."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
)

from mediator.errors import ConfigurationError
from mediator.kafka import KafkaConnection
from topics.names import DEFAULT_PREFIX, DEFAULT_SERVICE_PREFIX, Topics


class KafkaSettings(KafkaConnection):
    """How to reach Kafka (addresses, TLS, SASL: `KafkaConnection`) and which topics to use."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    client_id: str = "mediator"
    group_id: str = "mediator"
    topic_prefix: str = DEFAULT_PREFIX
    service_topic_prefix: str = DEFAULT_SERVICE_PREFIX
    # Apache Kafka supports the idempotent producer; the embedded Tansu broker does not
    # (it rejects InitProducerId), so `mediator dev` turns it off. Correctness never
    # depends on it: commands and results are deduplicated by id downstream.
    enable_idempotence: bool = True
    linger_ms: int = Field(default=1, ge=0)
    max_batch_records: int = Field(default=500, ge=1)
    partitions: int = Field(default=8, ge=1, description="Partitions for topics we create.")
    replication_factor: int = Field(default=1, ge=1, description="For topics we create.")
    # How long the broker may hold a fetch open when no data is there. Apache Kafka answers
    # as soon as data arrives, so a long wait costs nothing; Tansu waits it out, so the
    # embedded default uses a few milliseconds (each hop would otherwise cost ~the wait).
    fetch_max_wait_ms: int = Field(default=500, ge=0)
    # How long a subscriber's poll waits when nothing was fetched before it polls again.
    # Records fetched meanwhile end the wait at once, so this costs no latency.
    poll_timeout_ms: int = Field(default=500, ge=1)
    # Consumer-group liveness. A dead replica's partitions move after the session timeout;
    # Tansu also holds a JoinGroup reply for about half of it, which slows every start.
    session_timeout_ms: int = Field(default=10_000, ge=100)
    heartbeat_interval_ms: int = Field(default=3_000, ge=10)

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

    #: ``redis://`` or, for TLS, ``rediss://``. A password in it is never logged, but
    #: prefer `password` or `password_file`.
    url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    #: An ACL user and its password (Redis 6+), or the password of ``requirepass``.
    username: str | None = None
    password: SecretStr | None = None
    #: A file holding the password (a Docker or Kubernetes secret), instead of it.
    password_file: Path | None = None
    #: TLS (with a ``rediss://`` URL): the CA to trust, this client's certificate and key
    #: when the server asks for one, and whether the certificate must name the host.
    ssl_ca_certs: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True
    key_prefix: str = "med"
    shards: int = Field(default=16, ge=1, le=16384)
    retention_s: float = Field(default=7 * 24 * 3600, gt=0)
    recent_limit: int = Field(default=1000, ge=1)
    # Without a timeout a stalled Redis would hang a handler forever; with one, the batch
    # is rewound and redelivered once Redis answers again.
    socket_timeout_s: float = Field(default=5.0, gt=0)
    # With Redis replicas: after each batch's commits, WAIT until this many replicas have
    # them before Kafka offsets move, so a failover cannot lose a transition whose input
    # was already acknowledged. 0 (the default) does not wait.
    wait_replicas: int = Field(default=0, ge=0)
    wait_timeout_ms: int = Field(default=1_000, ge=1)
    # A finished run's request fingerprint and status are kept this long after its state
    # expired, so a late duplicate is still recognised (and not run again).
    tombstone_s: float = Field(default=30 * 24 * 3600, ge=0)

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
        tls = {"ssl_ca_certs": self.ssl_ca_certs, "ssl_certfile": self.ssl_certfile,
               "ssl_keyfile": self.ssl_keyfile}  # fmt: skip
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
