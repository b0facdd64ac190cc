"""What operators see and use: metrics and alerts, the audit log, tracing, the collector,
the HTTP endpoints and the dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    model_validator,
)
from pydantic_settings import NoDecode

from mediator.core.alerts import Rule
from mediator.errors import ConfigurationError
from mediator.settings.fields import (
    DurationMs,
    comma_separated,
    renamed_durations,
    seconds_or_duration_ms,
)


def _fraction(value: Any) -> Any:
    """A share as written (``"5%"``, ``0.05``) as a fraction of one."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return float(value.strip()[:-1]) / 100
        except ValueError:
            pass
    elif isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    msg = f"{value!r} is not a share (e.g. 5% or 0.05)"
    raise ValueError(msg)


class AlertThreshold(BaseModel):
    """One alert rule, evaluated per service over the alert window.

    ``response_time`` fires when the window's `percentile` (p95 by default) is above the
    threshold (a duration); ``error_rate`` and ``timeout_rate`` when that share of the
    commands answered or timed out is above it (``"5%"``); ``availability`` when the
    share of samples with an instance up is below it (``"99%"``; services that heartbeat);
    ``queue_wait`` when the step waiting longest in a service's queue (held by its
    flow-control limit or its breaker), or the run waiting longest for a slot of a
    workflow's concurrency keys (named ``keys:<workflow>``), has waited longer than the
    threshold (a duration).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: Literal["response_time", "error_rate", "timeout_rate", "availability", "queue_wait"]
    threshold: str | float
    severity: Literal["info", "warning", "critical"] = "warning"
    percentile: float = Field(default=95, gt=0, le=100)
    services: list[str] = Field(
        default_factory=list,
        description="The services it applies to; empty: every service.",
    )
    min_samples: int = Field(
        default=5,
        ge=1,
        description="Fewer answers than this in the window are too few to judge a rate or a "
        "percentile.",
    )

    @model_validator(mode="after")
    def _threshold_parses(self) -> AlertThreshold:
        self.limit  # noqa: B018 - raises on a threshold that does not parse
        return self

    @property
    def limit(self) -> float:
        """The threshold as a number: milliseconds, or a fraction of one."""
        if self.metric in ("response_time", "queue_wait"):
            return float(seconds_or_duration_ms(self.threshold))
        return float(_fraction(self.threshold))

    def rule(self) -> Rule:
        """The rule the alert evaluator applies."""
        return Rule(
            self.metric,
            self.limit,
            self.severity,
            self.percentile,
            tuple(self.services),
            self.min_samples,
        )


def _default_thresholds() -> list[AlertThreshold]:
    return [
        AlertThreshold(metric="response_time", threshold="5s", severity="warning"),
        AlertThreshold(metric="error_rate", threshold="5%", severity="critical"),
        AlertThreshold(metric="availability", threshold="99%", severity="critical"),
    ]


class MonitoringSettings(BaseModel):
    """Service and workflow metrics kept in Redis, and the alerts evaluated over them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _earlier_names(cls, data: Any) -> Any:
        return renamed_durations(
            data,
            {
                "window": "window_ms",
                "alert_interval": "alert_interval_ms",
                "alert_window": "alert_window_ms",
            },
        )

    enabled: bool = Field(
        default=True,
        description="Metrics kept in Redis (off: nothing tallied, no alerts).",
    )
    bucket_s: int = Field(
        default=10, ge=1, le=3600, description="Width of one time bucket (seconds)."
    )
    window_ms: DurationMs = Field(
        default=24 * 3600 * 1000,
        ge=1000,
        description="How long the buckets are kept (the metrics the dashboard can show).",
    )
    flush_ms: DurationMs = Field(
        default=1_000,
        ge=10,
        description="How often a replica writes what it tallied (one pipeline).",
    )
    alerts: bool = Field(
        default=True,
        description="Alerts: evaluated by one replica at a time (a lease), this often, over this "
        "window.",
    )
    alert_interval_ms: DurationMs = Field(
        default=5_000, ge=100, description="How often the alert rules are evaluated."
    )
    alert_window_ms: DurationMs = Field(
        default=60_000, ge=1000, description="The window each rule is evaluated over."
    )
    alert_thresholds: list[AlertThreshold] = Field(
        default_factory=_default_thresholds,
        description="The alert rules: a metric (per service), a threshold and a severity.",
    )
    alert_history: int = Field(
        default=1_000,
        ge=1,
        description="Alert history kept in Redis (newest first).",
    )


class EventSettings(BaseModel):
    """The transition stream: every run's and step's transition on ``mediator.events``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        default=False,
        description="Publish a `TransitionEvent` for each run and step transition, through "
        "the outbox with the commit that made it (at least once, in commit order per run).",
    )


class AuditSettings(BaseModel):
    """The audit log of every run: each transition, in a capped Redis stream."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        default=True,
        description="The audit log of every run on.",
    )
    max_entries: int = Field(
        default=200,
        ge=1,
        description="Entries kept per run (the oldest go first).",
    )


class TracingSettings(BaseModel):
    """OpenTelemetry spans of runs and step attempts, exported by the replica (needs the
    ``otel`` extra). Trace context travels on the wire (W3C ``traceparent``) whether or
    not spans are exported."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        default=False,
        description="OpenTelemetry spans of runs and steps (needs the `otel` extra).",
    )
    exporter: Literal["otlp", "console"] = Field(
        default="otlp",
        description='"otlp": OTLP over HTTP to `endpoint` (else the standard OTEL_EXPORTER_OTLP_* '
        'variables, default http://localhost:4318); "console": one JSON span per line '
        "on stdout.",
    )
    endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP endpoint (default: the exporter's, from "
        "OTEL_EXPORTER_OTLP_ENDPOINT).",
    )
    service_name: str = Field(
        default="mediator",
        description="The service.name of the spans.",
    )


class GcSettings(BaseModel):
    """The replica's garbage collector. Python collects its youngest generation every 700
    allocations by default and walks everything older now and then; a replica holding
    thousands of runs' states spent a fifth of its CPU there at saturation. Tuned, it
    collects far less often (the engine's objects are freed by reference counting; only
    cycles wait for a collection)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tune: bool = Field(
        default=True,
        description="Tune the garbage collector for a long-lived replica (fewer, larger "
        "collections).",
    )
    threshold: tuple[int, int, int] = Field(
        default=(50_000, 20, 100),
        description="gc.set_threshold(gen0, gen1, gen2): allocations between young collections, "
        "then how many of each before the next older one.",
    )


class HttpSettings(BaseModel):
    """The replica's HTTP endpoints: ``/metrics`` (Prometheus), ``/healthz``, ``/readyz``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        default=True,
        description="Serve /metrics, /healthz and /readyz over HTTP.",
    )
    host: str = Field(
        default="127.0.0.1",
        description="The address the HTTP endpoints listen on.",
    )
    port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description="0: any free port (logged at start).",
    )


class DashboardSettings(BaseModel):
    """Who may use the dashboard (`mediator dashboard`, and `mediator dev`'s)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token: SecretStr | None = Field(
        default=None,
        description="The operator token every page and API call needs (HTTP Basic password, any "
        "user name, or ``Authorization: Bearer``), as is or as ``sha256:<hex>`` of "
        "it. Without one the dashboard listens on loopback only.",
    )
    token_file: Path | None = Field(
        default=None,
        description="A file holding the token (a Docker or Kubernetes secret), instead of it.",
    )
    hosts: Annotated[list[str], NoDecode, BeforeValidator(comma_separated)] = Field(
        description="Host names the dashboard answers to (the ``Host`` header; a DNS-rebinding "
        "page names its own): loopback names, and the address it listens on, are "
        "always allowed.",
        default_factory=list,
    )

    def secret(self) -> str | None:
        """The token (or its hash), from the setting or its file; None without one."""
        if self.token is not None and self.token_file is not None:
            msg = "give dashboard.token or dashboard.token_file, not both"
            raise ConfigurationError(msg)
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is None:
            return None
        try:
            return self.token_file.read_text().strip() or None
        except OSError as exc:
            msg = f"dashboard.token_file: {exc}"
            raise ConfigurationError(msg) from exc
