"""Service and workflow metrics as time series: what is observed, how it is tallied into
time buckets, and how a window of buckets is summarised (rates, percentiles).

Each bucket of each series is a flat mapping of field to integer, so it adds up with
``HINCRBY`` across replicas and is read back with one ``HGETALL``:

- counts: ``sent``, ``ok``, ``error``, ``timeout``, ``retried``, ... (a service), ``started``,
  ``completed``, ``failed``, ... (a workflow), taken from the engine's counters;
- a latency histogram: ``n`` observations, ``sum`` of milliseconds, ``h:<bound>``
  observations at most ``<bound>`` ms and over the bound below (``h:inf`` above them all);
- samples taken by the alert evaluator: ``avail_n`` samples, ``avail_up`` of them with an
  instance up, ``inst_up`` instances up summed over samples, ``parked`` (the last backlog).

No I/O, no clock: the time is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mediator.core.counters import CounterKey

__all__ = [
    "BOUNDS_MS",
    "FAILED",
    "GAUGES",
    "Observation",
    "Summary",
    "Tally",
    "bucket_field",
    "counter_series",
    "percentile_ms",
    "summarize",
]

#: Upper bounds (ms) of the latency histogram's buckets, then ``inf``.
BOUNDS_MS = (5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000)

#: Outcomes that are failures: a command answered with an error or timed out, a run that
#: did not complete (`WorkflowStatus` values).
FAILED = frozenset({"error", "rejected", "timeout", "failed", "cancelled", "compensation_failed"})

#: Fields that hold the latest value (written with HSET), not a sum.
GAUGES = frozenset({"parked"})


def counter_series(key: CounterKey) -> tuple[str, str, str] | None:
    """(kind, series, field) of an engine counter that feeds a series (a service's or a
    workflow's); None for any other counter."""
    return key if key.kind else None


#: The histogram's field names, bound by bound.
_BUCKET_FIELDS = tuple((bound, f"h:{bound}") for bound in BOUNDS_MS)


def bucket_field(ms: float) -> str:
    """The histogram field an observation of `ms` milliseconds falls in."""
    for bound, field in _BUCKET_FIELDS:
        if ms <= bound:
            return field
    return "h:inf"


@dataclass(frozen=True, slots=True)
class Observation:
    """One timed outcome: a command answered or timed out (kind ``svc``, with the
    instance that answered, if known, and which step attempt it was) or a run that ended
    (kind ``wf``)."""

    kind: str
    name: str
    outcome: str
    ms: int
    instance: str | None = None
    step: str | None = None
    attempt: int = 0
    command_id: str | None = None
    undo: bool = False


Key = tuple[str, str, int]


def _add_observation(fields: dict[str, int], ms: int, field: str) -> None:
    """One observation of `ms` (histogram field `field`) added to a bucket's fields."""
    fields["n"] = fields.get("n", 0) + 1
    fields["sum"] = fields.get("sum", 0) + ms
    fields[field] = fields.get(field, 0) + 1


class Tally:
    """Counts and histograms per (kind, name, bucket start in seconds), until drained."""

    def __init__(self, bucket_s: int = 10) -> None:
        self.bucket_s = bucket_s
        self.series: dict[Key, dict[str, int]] = {}

    def bucket(self, now_ms: int) -> int:
        """The start (epoch seconds) of the bucket `now_ms` falls in."""
        seconds = now_ms // 1000
        return seconds - seconds % self.bucket_s

    def add(self, kind: str, name: str, field: str, now_ms: int, n: int = 1) -> None:
        """Add `n` to `field` of series (`kind`, `name`) in the bucket of `now_ms`."""
        fields = self.series.setdefault((kind, name, self.bucket(now_ms)), {})
        fields[field] = fields.get(field, 0) + n

    def set(self, kind: str, name: str, field: str, now_ms: int, value: int) -> None:
        """Set gauge `field` (written as the latest value, not added; see `GAUGES`)."""
        self.series.setdefault((kind, name, self.bucket(now_ms)), {})[field] = value

    def observe(self, observation: Observation, now_ms: int) -> None:
        """Add one timed outcome to its series' histogram (and its instance's)."""
        self.observe_many((observation,), now_ms)

    def observe_many(self, observations: Iterable[Observation], now_ms: int) -> None:
        """Add timed outcomes, all of the bucket of `now_ms`, to their series' histograms
        (and their instances')."""
        bucket = self.bucket(now_ms)
        series = self.series
        for observation in observations:
            ms = max(0, observation.ms)
            field = bucket_field(ms)
            kind, name = observation.kind, observation.name
            _add_observation(series.setdefault((kind, name, bucket), {}), ms, field)
            if observation.instance is not None and kind == "svc":
                key = ("inst", f"{name}/{observation.instance}", bucket)
                fields = series.setdefault(key, {})
                _add_observation(fields, ms, field)
                outcome = observation.outcome
                fields[outcome] = fields.get(outcome, 0) + 1

    def counters(self, counters: Mapping[CounterKey, int], now_ms: int) -> None:
        """Add the engine's counters of services and workflows.
        Negative deltas (a count taken back, e.g. a failed run an operator retries) are
        not events of this bucket and are left out."""
        for name, delta in counters.items():
            if delta > 0 and (found := counter_series(name)) is not None:
                self.add(*found, now_ms, delta)

    def drain(self) -> dict[Key, dict[str, int]]:
        """Everything tallied since the last drain; the tally starts empty again."""
        series, self.series = self.series, {}
        return series

    def restore(self, series: Mapping[Key, Mapping[str, int]]) -> None:
        """Put back what was drained but could not be written, to go with the next write."""
        for key, fields in series.items():
            mine = self.series.setdefault(key, {})
            for field, n in fields.items():
                if field in GAUGES:
                    mine.setdefault(field, n)  # a newer value wins
                else:
                    mine[field] = mine.get(field, 0) + n

    def __len__(self) -> int:
        return len(self.series)


def merge(buckets: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """The fields of several buckets added together."""
    total: dict[str, int] = {}
    for bucket in buckets:
        for field, n in bucket.items():
            total[field] = total.get(field, 0) + n
    return total


def percentile_ms(fields: Mapping[str, int], q: float) -> float | None:
    """The `q`-th percentile (0..100) of a histogram, interpolated linearly within the
    bucket it falls in (as Prometheus' ``histogram_quantile`` does), so a handful of 30 ms
    replies read as about 30 ms rather than as the bucket's bound of 50; the largest bound
    when it falls in the last, open bucket. None without data."""
    total = sum(fields.get(f"h:{b}", 0) for b in BOUNDS_MS) + fields.get("h:inf", 0)
    if total <= 0:
        return None
    rank = q / 100 * total
    seen = 0
    lower = 0.0
    for bound in BOUNDS_MS:
        count = fields.get(f"h:{bound}", 0)
        if count and seen + count >= rank:
            return lower + (bound - lower) * max(0.0, rank - seen) / count
        seen += count
        lower = float(bound)
    return float(BOUNDS_MS[-1])


@dataclass(frozen=True, slots=True)
class Summary:
    """A window of one series, summarised."""

    seconds: float
    fields: dict[str, int]

    def count(self, field: str) -> int:
        return self.fields.get(field, 0)

    @property
    def answered(self) -> int:
        """Commands answered or timed out (services), runs ended (workflows: ``n``)."""
        return self.count("n")

    @property
    def throughput(self) -> float:
        """Answers (or ended runs) per second over the window."""
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    def rate(self, field: str) -> float | None:
        """The share of answers that were `field` (``error``, ``timeout``); None without
        answers."""
        return self.count(field) / self.answered if self.answered else None

    @property
    def error_rate(self) -> float | None:
        """Errors and timeouts over everything answered or timed out."""
        n = self.answered
        return (self.count("error") + self.count("timeout")) / n if n else None

    @property
    def availability(self) -> float | None:
        """The share of samples in which the service had an instance up; None without
        samples (a service that does not heartbeat)."""
        n = self.count("avail_n")
        return self.count("avail_up") / n if n else None

    @property
    def mean_ms(self) -> float | None:
        n = self.answered
        return self.count("sum") / n if n else None

    def percentile(self, q: float) -> float | None:
        return percentile_ms(self.fields, q)

    def doc(self) -> dict[str, object]:
        """For JSON: counts, rates and percentiles."""
        return {
            "seconds": self.seconds,
            "counts": {k: v for k, v in sorted(self.fields.items()) if not k.startswith("h:")},
            "throughput": round(self.throughput, 3),
            "error_rate": self.error_rate,
            "timeout_rate": self.rate("timeout"),
            "availability": self.availability,
            "mean_ms": self.mean_ms,
            "p50_ms": self.percentile(50),
            "p95_ms": self.percentile(95),
            "p99_ms": self.percentile(99),
            "histogram": {k: v for k, v in self.fields.items() if k.startswith("h:") and v},
        }


def summarize(buckets: Iterable[Mapping[str, int]], seconds: float) -> Summary:
    """`buckets` of one series covering `seconds`, summarised."""
    return Summary(seconds, merge(buckets))
