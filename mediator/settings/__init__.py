"""Configuration: one frozen `Settings`, from environment variables and/or a YAML file.

Environment variables use the ``MEDIATOR_`` prefix and ``__`` for nesting, e.g.
``MEDIATOR_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or ``MEDIATOR_REDIS__URL=redis://r:6379/0``.
A YAML file (``--config FILE`` or ``MEDIATOR_CONFIG=FILE``) gives the same fields; the
environment wins over the file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from mediator.codec import validation_reason
from mediator.errors import ConfigurationError
from mediator.loops import EventLoop
from mediator.settings.connections import KafkaSettings, RedisSettings
from mediator.settings.delivery import (
    BackoffSettings,
    BalancePolicy,
    BreakerOverride,
    BreakerPolicy,
    BreakerSettings,
    DiscoverySettings,
    LimitsSettings,
    LoadBalancingSettings,
    OutboxSettings,
    TimerSettings,
)
from mediator.settings.operations import (
    AlertThreshold,
    AuditSettings,
    DashboardSettings,
    GcSettings,
    HttpSettings,
    MonitoringSettings,
    TracingSettings,
)
from mediator.settings.signing import KeySet, OperatorKeys, SigningSettings

__all__ = [
    "AlertThreshold",
    "AuditSettings",
    "BackoffSettings",
    "BalancePolicy",
    "BreakerOverride",
    "BreakerPolicy",
    "BreakerSettings",
    "DashboardSettings",
    "DiscoverySettings",
    "GcSettings",
    "HttpSettings",
    "KafkaSettings",
    "KeySet",
    "LimitsSettings",
    "LoadBalancingSettings",
    "MonitoringSettings",
    "OperatorKeys",
    "OutboxSettings",
    "RedisSettings",
    "Settings",
    "SigningSettings",
    "TimerSettings",
    "TracingSettings",
    "load_settings",
    "settings_document",
]


class Settings(BaseSettings):
    """Everything a mediator replica needs to know."""

    model_config = SettingsConfigDict(
        env_prefix="MEDIATOR_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    outbox: OutboxSettings = OutboxSettings()
    timers: TimerSettings = TimerSettings()
    limits: LimitsSettings = LimitsSettings()
    backoff: BackoffSettings = BackoffSettings()
    circuit_breaker: BreakerSettings = BreakerSettings()
    discovery: DiscoverySettings = DiscoverySettings()
    load_balancing: LoadBalancingSettings = LoadBalancingSettings()
    signing: SigningSettings = SigningSettings()
    service_monitoring: MonitoringSettings = MonitoringSettings()
    audit: AuditSettings = AuditSettings()
    http: HttpSettings = HttpSettings()
    dashboard: DashboardSettings = DashboardSettings()
    tracing: TracingSettings = TracingSettings()
    gc: GcSettings = GcSettings()
    workflows: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="YAML files or directories of workflow definitions "
        "(in the environment: separated by commas or the path separator).",
    )
    log_level: str = "INFO"
    # "text" for people, "json" (one object per line, with the run's fields) for pipelines.
    log_format: Literal["text", "json"] = "text"
    # The event loop of `mediator run`, `dev` and `demo-services` (mediator.loops): auto is
    # uvloop where it is installed, else asyncio's.
    event_loop: EventLoop = "auto"
    state_cache_size: int = Field(
        default=100_000, ge=0, description="Unfinished workflow states kept in memory (0: off)."
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level.isdigit() or level in logging.getLevelNamesMapping():
            return level
        msg = f"unknown log level {value!r}; use DEBUG, INFO, WARNING, ERROR, CRITICAL or a number"
        raise ValueError(msg)

    @field_validator("workflows", mode="before")
    @classmethod
    def _split_paths(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = value.replace(os.pathsep, ",").split(",")
            return [part.strip() for part in parts if part.strip()]
        return value


def settings_document(settings: Settings) -> dict[str, Any]:
    """`settings` as a document `load_settings` reads back the same (secrets included):
    for a config file handed to another process."""
    doc = settings.model_dump(mode="json")
    doc["signing"] = settings.signing.revealed()
    return doc


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from a YAML file (optional), the environment, then explicit overrides."""
    path = config_file or (
        Path(os.environ["MEDIATOR_CONFIG"]) if "MEDIATOR_CONFIG" in os.environ else None
    )
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            msg = f"cannot read config file {str(path)!r}: {exc}"
            raise ConfigurationError(msg) from exc
        if not isinstance(loaded, dict):
            msg = f"config file {str(path)!r} must hold a mapping of settings"
            raise ConfigurationError(msg)
        file_values = loaded
    try:
        env = Settings()
    except ValidationError as exc:
        msg = f"invalid MEDIATOR_* environment: {validation_reason(exc)}"
        raise ConfigurationError(msg) from exc
    except SettingsError as exc:
        msg = f"invalid MEDIATOR_* environment: {exc}".replace("\n", " ")
        raise ConfigurationError(msg) from exc
    merged = _deep_merge(file_values, env.model_dump(exclude_unset=True))
    merged = _deep_merge(merged, overrides)
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        msg = f"invalid settings: {validation_reason(exc)}"
        raise ConfigurationError(msg) from exc
    settings.kafka.check()
    return settings


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_unset=True)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
