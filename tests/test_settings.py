"""Settings: one precedence (overrides over the environment over the YAML file, field by
field), one duration convention, every field described, every mistake a
`ConfigurationError`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from mediator.errors import ConfigurationError
from mediator.settings import Settings, load_settings, settings_document


def _fields(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    found: dict[str, object] = {}
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            found |= _fields(kind, f"{prefix}{name}.")
        else:
            found[prefix + name] = field
    return found


def test_every_setting_is_described() -> None:
    undescribed = [name for name, f in _fields(Settings).items() if not f.description]  # type: ignore[attr-defined]
    assert undescribed == []


def test_durations_carry_their_unit_in_their_name() -> None:
    names = [name.rsplit(".", 1)[-1] for name in _fields(Settings)]
    timed = [n for n in names if any(w in n for w in ("timeout", "interval", "after", "grace"))]
    assert [n for n in timed if not n.endswith(("_ms", "_s"))] == []


def test_a_duration_is_a_number_in_its_unit_or_a_string_with_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings(timers={"lease_ms": "3s"}, redis={"retention_s": "2h"})
    assert settings.timers.lease_ms == 3_000 and settings.redis.retention_s == 7_200
    monkeypatch.setenv("MEDIATOR_TIMERS__LEASE_MS", "2500")
    monkeypatch.setenv("MEDIATOR_OUTBOX__LEASE_MS", "1m")
    settings = load_settings()
    assert settings.timers.lease_ms == 2_500 and settings.outbox.lease_ms == 60_000
    with pytest.raises(ConfigurationError, match=r"timers\.lease_ms.*not a duration"):
        load_settings(timers={"lease_ms": "soon"})


def test_a_duration_under_its_earlier_name_still_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "mediator.yaml"
    config.write_text(
        "circuit_breaker:\n  recovery_timeout: 10s\n  services:\n    pay: {recovery_timeout: 3}\n"
        "service_monitoring: {alert_window: 2m}\n"
    )
    settings = load_settings(config)
    assert settings.circuit_breaker.recovery_timeout_ms == 10_000
    assert settings.circuit_breaker.policy("pay").recovery_timeout_ms == 3_000  # seconds
    assert settings.service_monitoring.alert_window_ms == 120_000
    monkeypatch.setenv("MEDIATOR_DISCOVERY__FORGET_AFTER", "5m")
    assert load_settings().discovery.forget_after_ms == 300_000
    with pytest.raises(ConfigurationError, match="one setting"):
        load_settings(circuit_breaker={"recovery_timeout": 1, "recovery_timeout_ms": 1000})


def test_overrides_win_over_the_environment_over_the_file_field_by_field(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "mediator.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka": {"client_id": "from-file", "group_id": "g-file"},
                "redis": {"key_prefix": "file"},
            }
        )
    )
    monkeypatch.setenv("MEDIATOR_CONFIG", str(config))
    monkeypatch.setenv("MEDIATOR_KAFKA__CLIENT_ID", "from-env")
    settings = load_settings(kafka={"bootstrap_servers": "b:9092"})
    assert settings.kafka.client_id == "from-env"
    assert settings.kafka.group_id == "g-file"
    assert settings.kafka.bootstrap_servers == "b:9092"
    assert settings.redis.key_prefix == "file"


def test_every_mistake_is_a_configuration_error_saying_where(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "mediator.yaml"
    config.write_text("redis: {shards: many}\n")
    with pytest.raises(ConfigurationError, match=r"mediator\.yaml.*redis\.shards"):
        load_settings(config)
    config.write_text("- a list\n")
    with pytest.raises(ConfigurationError, match="must hold a mapping"):
        load_settings(config)
    config.write_text("kafka: [unclosed\n")
    with pytest.raises(ConfigurationError, match="cannot read config file"):
        load_settings(config)
    with pytest.raises(ConfigurationError, match="cannot read config file"):
        load_settings(tmp_path / "missing.yaml")
    monkeypatch.setenv("MEDIATOR_REDIS__SHARDS", "0")
    with pytest.raises(ConfigurationError, match="MEDIATOR_"):
        load_settings()


def test_a_redis_call_deadline_shorter_than_one_answer_may_take_is_refused(
    tmp_path: Path,
) -> None:
    config = tmp_path / "mediator.yaml"
    config.write_text("redis: {socket_timeout_s: 10, call_timeout_s: 8}\n")
    with pytest.raises(ConfigurationError, match=r"call_timeout_s \(8\) must be at least"):
        load_settings(config)
    config.write_text("redis: {socket_timeout_s: 10s, call_timeout_s: 12s}\n")
    assert load_settings(config).redis.call_timeout_s == 12


def test_a_settings_document_loads_back_the_same(tmp_path: Path) -> None:
    settings = load_settings(
        timers={"lease_ms": "3s"},
        circuit_breaker={"recovery_timeout": "2s"},
        signing={"keys": {"k1": "0123456789abcdef0123"}},
    )
    config = tmp_path / "mediator.yaml"
    config.write_text(yaml.safe_dump(settings_document(settings)))
    assert load_settings(config) == settings


def test_an_unquoted_off_in_a_yaml_file_is_off(tmp_path: Path) -> None:
    # YAML reads `off` as false: the documented value must work as written.
    config = tmp_path / "mediator.yaml"
    config.write_text("signing:\n  requests: off\n  controls: off\n")
    settings = load_settings(config)
    assert (settings.signing.requests, settings.signing.controls) == ("off", "off")
    config.write_text("signing:\n  requests: yes\n")
    with pytest.raises(ConfigurationError, match=r"signing\.requests"):
        load_settings(config)
