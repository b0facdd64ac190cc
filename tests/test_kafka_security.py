"""Kafka transport security: one settings block that every client is built from, a whole
workflow over TLS through a real TLS endpoint in front of the broker, a broker certificate
from another authority refused with the reason, and the exact SASL options each mechanism
gives aiokafka and FastStream (no SASL broker runs here)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from faststream.security import SASLOAuthBearer, SASLPlaintext, SASLScram512

from mediator.errors import ConfigurationError
from mediator.kafka import KafkaConnection, broker_options, check_tls, client_options
from mediator.replica import Mediator
from mediator.settings import Settings, load_settings
from tests.helpers import step
from tests.system import System, echo
from tests.tls import Authority, tls_kafka
from topics import WorkflowStatus

ROOT = Path(__file__).resolve().parents[1]


def _over(settings: Settings, connection: KafkaConnection) -> Settings:
    kafka = settings.kafka.model_copy(update=connection.model_dump(exclude_unset=True))
    return settings.model_copy(update={"kafka": kafka})


async def test_a_workflow_runs_end_to_end_over_tls(settings: Settings, tmp_path: Path) -> None:
    async with tls_kafka(tmp_path) as (broker, _):
        system = System(
            _over(settings, broker.connection),
            [{"name": "tls", "steps": [step("a"), step("b", depends_on=["a"])]}],
        )
        try:
            await system.create_topics()
            await system.worker("svc", {"a": echo, "b": echo})
            await system.mediator()
            client = await system.client()
            result = await client.submit("tls", {"n": 1}, request_id="over-tls", timeout=30)
        finally:
            await system.close()
        assert result.status is WorkflowStatus.COMPLETED
        assert broker.proxy.connections > 0  # every client came through the TLS endpoint


async def test_a_broker_certificate_from_another_authority_is_refused_with_the_reason(
    settings: Settings, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    stranger = Authority(other)
    async with tls_kafka(tmp_path) as (broker, _):
        wrong = broker.connection.model_copy(update={"ssl_cafile": stranger.cafile})
        with pytest.raises(ConfigurationError, match=r"does not trust.*ssl_cafile"):
            await check_tls(wrong)
        mediator = Mediator(_over(settings, wrong), System(settings, []).definitions)
        with pytest.raises(ConfigurationError, match="certificate this client does not trust"):
            await mediator.start()
        # Plaintext against the TLS endpoint is not mistaken for a broker either.
        plain = broker.connection.model_copy(update={"security_protocol": "PLAINTEXT"})
        assert "ssl_context" not in client_options(plain)


def test_settings_take_tls_and_sasl_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "kafka-password"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("MEDIATOR_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("MEDIATOR_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("MEDIATOR_KAFKA__SASL_USERNAME", "mediator")
    monkeypatch.setenv("MEDIATOR_KAFKA__SASL_PASSWORD_FILE", str(secret))
    kafka = load_settings().kafka
    assert kafka.security_protocol == "SASL_SSL"
    options = client_options(kafka)
    assert options["sasl_plain_password"] == "s3cret"
    assert "s3cret" not in repr(kafka) and "s3cret" not in str(kafka.model_dump())


@pytest.mark.parametrize(
    ("protocol", "mechanism", "expected", "security"),
    [
        ("SASL_PLAINTEXT", "PLAIN", {"security_protocol": "SASL_PLAINTEXT"}, SASLPlaintext),
        ("SASL_SSL", "SCRAM-SHA-512", {"security_protocol": "SASL_SSL"}, SASLScram512),
    ],
)
def test_each_sasl_mechanism_gives_the_clients_exactly_its_options(
    protocol: str, mechanism: str, expected: dict[str, Any], security: type
) -> None:
    kafka = KafkaConnection(
        bootstrap_servers="b1:9093,b2:9093",
        security_protocol=protocol,  # type: ignore[arg-type]
        sasl_mechanism=mechanism,  # type: ignore[arg-type]
        sasl_username="svc",
        sasl_password="pw",  # type: ignore[arg-type]
    )
    options = client_options(kafka)
    assert options["bootstrap_servers"] == "b1:9093,b2:9093"
    assert options["security_protocol"] == expected["security_protocol"]
    assert options["sasl_mechanism"] == mechanism
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("svc", "pw")
    assert ("ssl_context" in options) == protocol.endswith("SSL")
    broker = broker_options(kafka)
    assert isinstance(broker["security"], security)
    assert broker["security"].use_ssl == protocol.endswith("SSL")


class TokenProvider:
    """An OAUTHBEARER token source, as an identity provider's SDK would give one."""

    async def token(self) -> str:
        return "a-token"


def test_oauthbearer_uses_the_named_token_provider() -> None:
    kafka = KafkaConnection(
        security_protocol="SASL_SSL",
        sasl_mechanism="OAUTHBEARER",
        sasl_oauth_token_provider=f"{__name__}:TokenProvider",
    )
    options = client_options(kafka)
    assert isinstance(options["sasl_oauth_token_provider"], TokenProvider)
    broker = broker_options(kafka)
    assert isinstance(broker["security"], SASLOAuthBearer)
    assert isinstance(broker["sasl_oauth_token_provider"], TokenProvider)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"security_protocol": "SASL_SSL"}, "needs kafka.sasl_username and kafka.sasl_password"),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"},
            "needs kafka.sasl_oauth_token_provider",
        ),
        ({"security_protocol": "TLS"}, "security_protocol"),
    ],
)
def test_incomplete_security_settings_are_refused_clearly(
    fields: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ConfigurationError, match=reason):
        load_settings(kafka=fields)


def test_a_missing_tls_file_is_named() -> None:
    kafka = KafkaConnection(security_protocol="SSL", ssl_cafile=Path("/nonexistent/ca.pem"))
    with pytest.raises(ConfigurationError, match=r"kafka\.ssl_cafile: /nonexistent/ca\.pem"):
        client_options(kafka)


def test_no_kafka_client_is_built_outside_the_connection_factories() -> None:
    """Every client of the product goes through `mediator.kafka` or `mediator.producers`,
    so none can miss the transport security."""
    allowed = {ROOT / "mediator" / "kafka.py", ROOT / "mediator" / "producers.py"}
    built = {"AIOKafkaConsumer", "AIOKafkaProducer", "AIOKafkaAdminClient", "KafkaBroker"}
    offenders = []
    for package in ("mediator", "handlers"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path in allowed:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                    if name in built:
                        keywords = {k.arg for k in node.keywords}
                        if name == "KafkaBroker" and None in keywords:
                            continue  # built from **broker_options(...)
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not offenders
