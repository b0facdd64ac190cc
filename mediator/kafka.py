"""How every Kafka client of the project connects: one settings block, one way to build.

`KafkaConnection` holds the broker addresses and the transport security (TLS, SASL) that
the mediator, the SDK's workers and clients, the CLI and the dashboard all use;
`KafkaSettings` extends it. Clients are built only here and in `mediator.producers`
(`new_consumer`, `new_admin`, `new_producer`), so none can be made without it.
"""

from __future__ import annotations

import asyncio
import importlib
import ssl
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.helpers import create_ssl_context
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from mediator.errors import ConfigurationError

__all__ = [
    "KafkaConnection",
    "as_connection",
    "broker_options",
    "check_tls",
    "client_options",
    "new_admin",
    "new_consumer",
]

Protocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
Mechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]


class KafkaConnection(BaseModel):
    """Where the brokers are and how to talk to them securely."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        description="Brokers to bootstrap from, host:port separated by commas.",
    )
    metadata_max_age_ms: int = Field(
        default=30_000,
        ge=1_000,
        description="How often every client refreshes the topics' metadata: partitions added "
        "to a topic are read and written within this (Kafka's default is 5 minutes).",
    )
    security_protocol: Protocol = Field(
        default="PLAINTEXT",
        description="PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL (SASL over TLS).",
    )
    ssl_cafile: Path | None = Field(
        default=None,
        description="PEM file of the certificate authorities to trust (default: the system's).",
    )
    ssl_certfile: Path | None = Field(
        default=None,
        description="This client's certificate and key (PEM), for brokers that require client TLS.",
    )
    ssl_keyfile: Path | None = Field(
        default=None,
        description="This client's private key (PEM), with `ssl_certfile`.",
    )
    ssl_key_password: SecretStr | None = Field(
        default=None,
        description="The password of `ssl_keyfile`, if it has one.",
    )
    ssl_check_hostname: bool = Field(
        default=True,
        description="Check that the broker's certificate names the host connected to. Only turn "
        "off for a test set-up: it is what stops a man in the middle with any trusted "
        "certificate.",
    )
    sasl_mechanism: Mechanism = Field(
        default="PLAIN",
        description="PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER.",
    )
    sasl_username: str | None = Field(
        default=None,
        description="The SASL user (PLAIN and SCRAM).",
    )
    sasl_password: SecretStr | None = Field(
        default=None,
        description="The SASL password (PLAIN and SCRAM); see also `sasl_password_file`.",
    )
    sasl_password_file: Path | None = Field(
        default=None,
        description="A file holding the SASL password (a Docker or Kubernetes secret), instead of "
        "it.",
    )
    sasl_oauth_token_provider: str | None = Field(
        default=None,
        pattern=r"^[\w.]+:[\w.]+$",
        description="For OAUTHBEARER: ``module:attribute`` of a callable returning an aiokafka "
        "``AbstractTokenProvider`` (the token source of your identity provider).",
    )

    def check(self) -> None:
        """Refuse settings that cannot make a connection, saying what is missing. (Not a
        validator: the environment and a config file may each hold part of the block.)"""
        if not self.sasl:
            return
        if self.sasl_mechanism == "OAUTHBEARER":
            if self.sasl_oauth_token_provider is None:
                msg = "kafka.sasl_mechanism OAUTHBEARER needs kafka.sasl_oauth_token_provider"
                raise ConfigurationError(msg)
        elif not self.sasl_username or (
            self.sasl_password is None and self.sasl_password_file is None
        ):
            msg = (
                f"kafka.sasl_mechanism {self.sasl_mechanism} needs kafka.sasl_username and "
                "kafka.sasl_password (or kafka.sasl_password_file)"
            )
            raise ConfigurationError(msg)
        if self.sasl_password is not None and self.sasl_password_file is not None:
            msg = "give kafka.sasl_password or kafka.sasl_password_file, not both"
            raise ConfigurationError(msg)

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of every client, or None without TLS."""
        if not self.tls:
            return None
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                msg = f"kafka.{name}: {path} is not a readable file"
                raise ConfigurationError(msg)
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            msg = "kafka.ssl_certfile and kafka.ssl_keyfile go together"
            raise ConfigurationError(msg)
        try:
            context: ssl.SSLContext = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
                password=self.ssl_key_password.get_secret_value()
                if self.ssl_key_password
                else None,
            )
        except (OSError, ssl.SSLError) as exc:
            msg = f"kafka TLS files cannot be used: {exc}"
            raise ConfigurationError(msg) from exc
        context.check_hostname = self.ssl_check_hostname
        return context

    def password(self) -> str | None:
        """The SASL password, from the setting or its file."""
        if self.sasl_password is not None:
            return self.sasl_password.get_secret_value()
        if self.sasl_password_file is None:
            return None
        try:
            return Path(self.sasl_password_file).read_text().strip()
        except OSError as exc:
            msg = f"kafka.sasl_password_file: {exc}"
            raise ConfigurationError(msg) from exc

    def token_provider(self) -> Any:
        """The OAUTHBEARER token provider named by `sasl_oauth_token_provider`."""
        assert self.sasl_oauth_token_provider is not None
        module_name, _, attribute = self.sasl_oauth_token_provider.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                target = getattr(target, part)
            return target()
        except Exception as exc:
            msg = f"kafka.sasl_oauth_token_provider {self.sasl_oauth_token_provider}: {exc}"
            raise ConfigurationError(msg) from exc


def as_connection(kafka: str | KafkaConnection) -> KafkaConnection:
    """A connection from bootstrap servers alone (plaintext), or the one given."""
    if isinstance(kafka, KafkaConnection):
        return kafka
    return KafkaConnection(bootstrap_servers=kafka)


def client_options(kafka: str | KafkaConnection) -> dict[str, Any]:
    """The aiokafka options of a client of `kafka`: addresses and transport security."""
    connection = as_connection(kafka)
    connection.check()
    options: dict[str, Any] = {
        "bootstrap_servers": connection.bootstrap_servers,
        "security_protocol": connection.security_protocol,
        "metadata_max_age_ms": connection.metadata_max_age_ms,
    }
    if connection.tls:
        options["ssl_context"] = connection.ssl_context()
    if connection.sasl:
        options["sasl_mechanism"] = connection.sasl_mechanism
        if connection.sasl_mechanism == "OAUTHBEARER":
            options["sasl_oauth_token_provider"] = connection.token_provider()
        else:
            options["sasl_plain_username"] = connection.sasl_username
            options["sasl_plain_password"] = connection.password()
    return options


def broker_options(kafka: KafkaConnection) -> dict[str, Any]:
    """The same connection as options of FastStream's ``KafkaBroker``."""
    from faststream.security import (
        BaseSecurity,
        SASLOAuthBearer,
        SASLPlaintext,
        SASLScram256,
        SASLScram512,
    )

    kafka.check()
    context = kafka.ssl_context()
    security: BaseSecurity
    options: dict[str, Any] = {}
    if not kafka.sasl:
        security = BaseSecurity(ssl_context=context, use_ssl=kafka.tls)
    elif kafka.sasl_mechanism == "OAUTHBEARER":
        security = SASLOAuthBearer(ssl_context=context, use_ssl=kafka.tls)
        options["sasl_oauth_token_provider"] = kafka.token_provider()
    else:
        kind = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256}.get(
            kafka.sasl_mechanism, SASLScram512
        )
        username, password = kafka.sasl_username or "", kafka.password() or ""
        security = kind(username, password, ssl_context=context, use_ssl=kafka.tls)
    return {"bootstrap_servers": kafka.bootstrap_servers, "security": security} | options


def new_consumer(kafka: str | KafkaConnection, *topics: str, **options: Any) -> AIOKafkaConsumer:
    """A consumer of `kafka` (`options` go to aiokafka as they are)."""
    return AIOKafkaConsumer(*topics, **(client_options(kafka) | options))


def new_admin(kafka: str | KafkaConnection, **options: Any) -> AIOKafkaAdminClient:
    """An admin client of `kafka`."""
    return AIOKafkaAdminClient(**(client_options(kafka) | options))


async def check_tls(kafka: str | KafkaConnection, timeout_s: float = 10.0) -> None:
    """With TLS on, shake hands with the first bootstrap server: a broker whose certificate
    is not trusted (a wrong `ssl_cafile`, a name that does not match) is refused here with
    the reason, where aiokafka would only say it cannot bootstrap. Unreachable brokers are
    left to the clients (they retry)."""
    connection = as_connection(kafka)
    if not connection.tls:
        return
    context = connection.ssl_context()
    first = connection.bootstrap_servers.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    host = host.strip("[]")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port), ssl=context, server_hostname=host),
            timeout_s,
        )
    except ssl.SSLCertVerificationError as exc:
        msg = (
            f"Kafka at {first} presented a certificate this client does not trust: "
            f"{exc.verify_message or exc.reason}; check kafka.ssl_cafile"
            + (" and the broker's host name" if connection.ssl_check_hostname else "")
        )
        raise ConfigurationError(msg) from exc
    except ssl.SSLError as exc:
        msg = (
            f"TLS with Kafka at {first} failed: {exc.reason or exc}; is the listener TLS "
            "(kafka.security_protocol), and does it want a client certificate "
            "(kafka.ssl_certfile, kafka.ssl_keyfile)?"
        )
        raise ConfigurationError(msg) from exc
    except (OSError, TimeoutError, ValueError):
        return
    writer.close()
    try:
        await writer.wait_closed()
    except (OSError, ssl.SSLError):
        pass
