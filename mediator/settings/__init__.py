"""Configuration: one frozen `Settings`, from environment variables and/or a YAML file.

Environment variables use the ``MEDIATOR_`` prefix and ``__`` for nesting, e.g.
``MEDIATOR_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or ``MEDIATOR_REDIS__URL=redis://r:6379/0``.
A YAML file (``--config FILE`` or ``MEDIATOR_CONFIG=FILE``) gives the same fields; the
environment wins over the file.
"""

from __future__ import annotations

import logging
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

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
    FlowControlSettings,
    LimitsSettings,
    LoadBalancingSettings,
    OutboxSettings,
    ScheduleSettings,
    ServiceLimit,
    SignalSettings,
    SignalSource,
    TimerSettings,
)
from mediator.settings.operations import (
    AlertThreshold,
    AuditSettings,
    DashboardSettings,
    EventSettings,
    GcSettings,
    HttpSettings,
    MonitoringSettings,
    TracingSettings,
)
from mediator.settings.signing import KeySet, OperatorKeys, SigningSettings

__all__ = [
    "DEV_SETTINGS",
    "AlertThreshold",
    "AuditSettings",
    "BackoffSettings",
    "BalancePolicy",
    "BreakerOverride",
    "BreakerPolicy",
    "BreakerSettings",
    "DashboardSettings",
    "DiscoverySettings",
    "EventSettings",
    "FlowControlSettings",
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
    "ScheduleSettings",
    "ServiceLimit",
    "Settings",
    "SignalSettings",
    "SignalSource",
    "SigningSettings",
    "TimerSettings",
    "TracingSettings",
    "config_source",
    "load_settings",
    "settings_document",
]


#: The YAML file `load_settings` reads (None: none), for `Settings`' sources.
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("mediator_config_file", default=None)


class Settings(BaseSettings):
    """Everything a mediator replica needs to know."""

    model_config = SettingsConfigDict(
        env_prefix="MEDIATOR_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """What is given explicitly, over the environment, over the YAML file (if
        `load_settings` reads one), field by field at every depth."""
        path = _CONFIG_FILE.get()
        if path is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls, path))

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    outbox: OutboxSettings = OutboxSettings()
    timers: TimerSettings = TimerSettings()
    schedules: ScheduleSettings = ScheduleSettings()
    signals: SignalSettings = SignalSettings()
    flow_control: FlowControlSettings = FlowControlSettings()
    events: EventSettings = EventSettings()
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
    log_level: str = Field(
        default="INFO",
        description="DEBUG, INFO, WARNING, ERROR, CRITICAL or a number.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description='"text" for people, "json" (one object per line, with the run\'s fields) for '
        "pipelines.",
    )
    event_loop: EventLoop = Field(
        default="auto",
        description="The event loop of `mediator run`, `dev` and `demo-services` "
        "(mediator.loops): auto is uvloop where it is installed, else asyncio's.",
    )
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


#: Where a running ``mediator dev`` keeps its settings (in the directory it was started
#: in): the CLI and the SDKs use them when given no others, so a second terminal talks to
#: the development system.
DEV_SETTINGS = Path(".mediator") / "dev.yaml"


def config_source(config_file: Path | None = None, *, dev: bool = True) -> Path | None:
    """The YAML file settings are read from: `config_file`, else ``MEDIATOR_CONFIG``, else
    (with `dev`) the settings of a ``mediator dev`` running from this directory
    (`DEV_SETTINGS`) when no ``MEDIATOR_*`` variable is set; None: none."""
    if config_file is not None:
        return config_file
    if "MEDIATOR_CONFIG" in os.environ:
        return Path(os.environ["MEDIATOR_CONFIG"])
    if dev and DEV_SETTINGS.is_file() and not any(k.startswith("MEDIATOR_") for k in os.environ):
        return DEV_SETTINGS
    return None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from explicit overrides, over the environment, over a YAML file (optional:
    see `config_source`). Anything wrong is a `ConfigurationError` saying what and
    where."""
    # Settings built for a purpose (explicit overrides: tests, tools) never pick up a
    # development system's by accident.
    path = config_source(config_file, dev=not overrides)
    if path is not None:
        _check_file(path)
    given: dict[str, Any] = {
        k: v.model_dump(exclude_unset=True) if isinstance(v, BaseModel) else v
        for k, v in overrides.items()
    }
    token = _CONFIG_FILE.set(path)
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        where = f"{str(path)!r} or the MEDIATOR_* environment" if path else "MEDIATOR_* environment"
        msg = f"invalid settings (from {where}): {validation_reason(exc)}"
        raise ConfigurationError(msg) from exc
    except SettingsError as exc:
        msg = f"invalid MEDIATOR_* environment: {exc}".replace("\n", " ")
        raise ConfigurationError(msg) from exc
    finally:
        _CONFIG_FILE.reset(token)
    settings.kafka.check()
    return settings


def _check_file(path: Path) -> None:
    """A config file that cannot be read, is not YAML or holds no mapping is refused here,
    with the reason (the YAML source would skip a missing file silently)."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        msg = f"cannot read config file {str(path)!r}: {exc}"
        raise ConfigurationError(msg) from exc
    if loaded is not None and not isinstance(loaded, dict):
        msg = f"config file {str(path)!r} must hold a mapping of settings"
        raise ConfigurationError(msg)
