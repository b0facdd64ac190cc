"""Alert rules over service metrics: what each measures, when it fires and resolves.

Pure: the evaluator hands in the window's summaries and the alerts now firing and gets
back the changes to publish. An alert fires once when its rule is breached and resolves
once when it no longer is (or the service went quiet: nothing left to judge), so nothing
repeats while it holds. A window with some samples but fewer than the rule's
``min_samples`` changes nothing: too little to fire on, and too little to resolve on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mediator.core.metrics import Summary
from topics.events import AlertEvent, AlertState

__all__ = ["QUEUE_WAIT", "Rule", "evaluate", "measure"]

#: The summary field the evaluator sets to how long a queue's oldest entry has waited (ms)
#: when it evaluates (`queue_wait` rules).
QUEUE_WAIT = "queue_wait_ms"


@dataclass(frozen=True, slots=True)
class Rule:
    """One alert threshold (`mediator.settings.AlertThreshold`, resolved)."""

    metric: str
    limit: float
    severity: str
    percentile: float = 95
    services: tuple[str, ...] = ()
    min_samples: int = 5

    @property
    def name(self) -> str:
        if self.metric == "response_time":
            return f"response_time_p{self.percentile:g}>{self.limit:g}ms"
        if self.metric == "queue_wait":
            return f"queue_wait>{self.limit:g}ms"
        op = "<" if self.metric == "availability" else ">"
        return f"{self.metric}{op}{self.limit:g}"

    def alert_id(self, service: str) -> str:
        return f"{service}:{self.name}"

    def applies(self, service: str) -> bool:
        return not self.services or service in self.services


def measure(rule: Rule, summary: Summary) -> float | None:
    """The rule's measure over the window, or None when there is too little to judge."""
    if rule.metric == "availability":
        return summary.availability
    if rule.metric == "queue_wait":  # sampled now, not summed over the window
        wait = summary.fields.get(QUEUE_WAIT)
        return None if wait is None else float(wait)
    if summary.answered < rule.min_samples:
        return None
    if rule.metric == "response_time":
        return summary.percentile(rule.percentile)
    if rule.metric == "error_rate":
        return summary.error_rate
    return summary.rate("timeout")


def _quiet(rule: Rule, summary: Summary) -> bool:
    """Whether the window holds nothing at all the rule could be measured on."""
    if rule.metric == "availability":
        return summary.availability is None
    if rule.metric == "queue_wait":
        return QUEUE_WAIT not in summary.fields
    return summary.answered == 0


def _breached(rule: Rule, value: float) -> bool:
    return value < rule.limit if rule.metric == "availability" else value > rule.limit


def _message(rule: Rule, service: str, value: float | None, firing: bool) -> str:
    timed = rule.metric in ("response_time", "queue_wait")
    shown = "no data" if value is None else (f"{value:g} ms" if timed else f"{value:.2%}")
    limit = f"{rule.limit:g} ms" if timed else f"{rule.limit:.2%}"
    what = rule.metric.replace("_", " ")
    if rule.metric == "response_time":
        what = f"p{rule.percentile:g} response time"
    elif rule.metric == "queue_wait":
        what = "oldest queued wait"
    if value is None and not firing:
        return f"{service}: {what} no longer measured (nothing in the window)"
    if firing:
        side = "below" if rule.metric == "availability" else "above"
        return f"{service}: {what} {shown} is {side} {limit}"
    return f"{service}: {what} back to {shown} (limit {limit})"


def evaluate(
    rules: Sequence[Rule],
    summaries: Mapping[str, Summary],
    active: Mapping[str, AlertEvent],
    now_ms: int,
    window_ms: int,
    held: list[AlertEvent] | None = None,
) -> list[AlertEvent]:
    """The alerts that start firing and those that resolve, given the window's summary
    of each service and the alerts firing now (by alert id). With `held`, the alerts that
    keep firing are added to it as they stand now (their value and message refreshed, their
    start kept): not changes to announce, but what the active alert should say."""
    changes: list[AlertEvent] = []
    judged: set[str] = set()
    for service, summary in sorted(summaries.items()):
        for rule in rules:
            if not rule.applies(service):
                continue
            alert_id = rule.alert_id(service)
            judged.add(alert_id)
            value = measure(rule, summary)
            firing = active.get(alert_id)
            if value is None:
                # Too little to judge: a firing alert holds, unless nothing was measured
                # at all (the service went quiet).
                if firing is not None and _quiet(rule, summary):
                    changes.append(
                        _event(rule, service, None, False, firing.since_ms, now_ms, window_ms)
                    )
            elif _breached(rule, value):
                if firing is None:
                    changes.append(_event(rule, service, value, True, now_ms, now_ms, window_ms))
                elif held is not None and firing.value != value:
                    now = _event(rule, service, value, True, firing.since_ms, now_ms, window_ms)
                    held.append(now)
            elif firing is not None:
                changes.append(
                    _event(rule, service, value, False, firing.since_ms, now_ms, window_ms)
                )
    for alert_id, firing in sorted(active.items()):
        if alert_id not in judged:  # the service or the rule is gone: nothing holds it
            changes.append(
                firing.model_copy(
                    update={
                        "state": AlertState.RESOLVED,
                        "value": None,
                        "message": f"{firing.service}: {firing.metric} no longer measured",
                        "ts_ms": now_ms,
                    }
                )
            )
    return changes


def _event(
    rule: Rule,
    service: str,
    value: float | None,
    firing: bool,
    since_ms: int,
    now_ms: int,
    window_ms: int,
) -> AlertEvent:
    return AlertEvent(
        alert_id=rule.alert_id(service),
        state=AlertState.FIRING if firing else AlertState.RESOLVED,
        severity=rule.severity,
        metric=rule.metric,
        service=service,
        value=value,
        threshold=rule.limit,
        message=_message(rule, service, value, firing),
        window_ms=window_ms,
        since_ms=since_ms,
        ts_ms=now_ms,
    )
