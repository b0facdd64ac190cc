"""Every Redis key the mediator uses, in one place (the ops dashboard contract, v1).

Workflows are sharded by a stable hash of their id into ``shards`` hash tags, so each
commit script touches keys of one hash slot only and the same code runs on a single
Redis and on Redis Cluster. With the default prefix ``med`` and shard 3::

    med:meta                          hash   schema, shards (written once, checked at start)
    med:stats                         hash   deployment-wide counters not tied to a workflow:
                                             dead_letters, dead_letters:<reason code>,
                                             replies:unknown_workflow, outbox:retried, ...
    med:def:<name>@<version>          string JSON {content_hash, format, spec} of a definition,
                                             written once (SET NX) by each replica at start
    med:{s3}:wf:<workflow_id>         hash   rev, stamp, status, workflow, updated_ms, state (JSON);
                                             live: layout, s:<step id> per step, order
    med:{s3}:st:<status>              zset   workflow ids by last update (running/completed/failed)
    med:{s3}:name:<workflow name>     zset   workflow ids by start time
    med:{s3}:recent                   zset   finished workflow ids by finish time (capped)
    med:{s3}:counters                 hash   wf:<name>:<started|completed|failed>,
                                             svc:<service>:<sent|ok|error|rejected>, ...
    med:{s3}:outbox                   hash   message id -> framed Kafka message
    med:{s3}:outbox:due               zset   message id -> lease deadline (ms)
    med:{s3}:timers                   zset   timer name -> due time (ms, Redis clock)
    med:{s3}:timers:dead              hash   timer name -> JSON {reason, parked_ms}: timers
                                             that could not be applied (a poison timer)
    med:{s3}:done:<workflow_id>       hash   tombstone of a finished run: request fingerprint
                                             and status, kept past the run's retention
    med:{s3}:audit:<workflow_id>      stream the run's audit log: one entry per transition
                                             (field ``e``: JSON), capped, expires with the run
    med:{s3}:parked:<service>         zset   the shard's steps parked for <service> while its
                                             breaker is open (``unpark`` timer names), by
                                             when parked
    med:{s3}:released:<service>       hash   the shard's steps released from that queue and
                                             not gone out yet -> their score there, so
                                             one queued again keeps its place
    med:{s3}:routed                   zset   the shard's attempts in flight on a registered
                                             instance (every score 0; one instance's are one
                                             lex range)
    med:m:<kind>:<name>:<bucket>      hash   metrics of a service (svc), an instance
                                             (inst, ``service/instance``) or a workflow (wf)
                                             in the time bucket starting at <bucket> (epoch s)
    med:m:series:<kind>               zset   the series names of one kind, by when last
                                             written (kept while their buckets live)
    med:parked:services               set    every service that ever had a step parked
    med:drain:{<service>}             string the replica draining <service>'s parked queues,
                                             with a TTL
    med:breaker:{<service>}           hash   the circuit breaker of <service>: version, state,
                                             counter, success, opened_ms, probe_until_ms
    med:reg:{<service>}:docs          hash   instance -> its last heartbeat (JSON)
    med:reg:{<service>}:status        hash   instance -> up, draining or down
    med:reg:{<service>}:due           zset   instance -> when it is down unless heard from
    med:reg:{<service>}:seen          zset   instance -> when last heard from
    med:reg:{<service>}:drained       set    instances an operator drained
    med:reg:{<service>}:dead          set    instances marked down because they fell silent
    med:reg:services                  set    every service that has heartbeated
    med:reg:watermark                 hash   health-topic partition -> time (ms, Redis clock) of
                                             the last marker read from it; ``partitions``
    med:reg:marker                    string the replica writing markers, with a TTL
    med:{schedules}                   hash   per schedule: <name>:last (last tick seen, ms),
                                             <name>:fired, <name>:paused, <name>:spec (JSON)
    med:limit:{<service>}:inflight    zset   commands to <service> holding a flow-control
                                             permit -> when it lapses (ms)
    med:limit:{<service>}:state       hash   the limit's token bucket (tokens, at) and
                                             queue length (queued)
    med:limit:{<service>@<instance>}:inflight
                                      zset   the same per instance (`per_instance` limits)
    med:limit:{<service>@<instance>}:state
                                      hash   its state (as a service's)
    med:flow:{<service>}              string the replica releasing <service>'s queued
                                             commands, with a TTL
    med:sig:{<digest>}:run            string the run whose `wait` step waits for one
                                             correlation key of a signal (BLAKE2b-64 of
                                             event and key), with a TTL
    med:sig:{<digest>}:pending        list   signals sent for that key before a run waited
                                             on it (JSON controls), capped, with a TTL
    med:cc:{<digest>}:held            zset   runs holding a slot of one concurrency key of a
                                             workflow (BLAKE2b-64 of workflow and key value),
                                             ``<run id>|<round>`` -> when granted (ms)
    med:cc:{<digest>}:queue           zset   runs waiting for one of its slots -> priority
                                             rank and when queued (`slots.slot_score`)
    med:cc:keys                       hash   digest -> JSON [workflow, key, limit] of every
                                             concurrency key with runs holding or waiting
    med:cc:lease                      string the replica repairing concurrency keys' slots,
                                             with a TTL
    med:ctl:<control_id>              string JSON {applied, detail, at_ms}: what became of an
                                             operator's control, kept for a day
    med:{alerts}:active               hash   alert key -> JSON of each alert now firing
    med:{alerts}:history              list   JSON of alerts fired and resolved, newest first
    med:{alerts}:lease                string the replica evaluating alerts, with a TTL
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

from mediator.core.ids import workflow_id_for

__all__ = [
    "KEY_SCHEMA_VERSION",
    "Keys",
    "concurrency_digest",
    "correlation_digest",
    "workflow_id_for",
]

KEY_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builders for one key prefix and shard count."""

    prefix: str = "med"
    shards: int = 16

    def shard_of(self, workflow_id: str) -> int:
        """The shard a workflow lives in (CRC32: stable across processes and languages)."""
        return zlib.crc32(workflow_id.encode()) % self.shards

    def tag(self, shard: int) -> str:
        """The hash-tagged prefix of one shard."""
        return f"{self.prefix}:{{s{shard}}}"

    @property
    def meta(self) -> str:
        """Deployment-wide facts: key schema version and shard count."""
        return f"{self.prefix}:meta"

    @property
    def stats(self) -> str:
        """Deployment-wide counters that belong to no workflow (dead letters, unknown replies)."""
        return f"{self.prefix}:stats"

    def definition(self, name: str, version: int) -> str:
        """The stored definition of workflow `name` at `version`."""
        return f"{self.prefix}:def:{name}@{version}"

    def tombstone(self, workflow_id: str) -> str:
        """What is left of a finished run once its state expired."""
        return f"{self.tag(self.shard_of(workflow_id))}:done:{workflow_id}"

    def workflow(self, workflow_id: str) -> str:
        """The hash of one workflow run."""
        return f"{self.tag(self.shard_of(workflow_id))}:wf:{workflow_id}"

    def status_index(self, shard: int, status: str) -> str:
        """Workflow ids with `status`, scored by last update."""
        return f"{self.tag(shard)}:st:{status}"

    def name_index(self, shard: int, name: str) -> str:
        """Workflow ids of workflow `name`, scored by start time."""
        return f"{self.tag(shard)}:name:{name}"

    def recent(self, shard: int) -> str:
        """Recently finished workflow ids, scored by finish time."""
        return f"{self.tag(shard)}:recent"

    def counters(self, shard: int) -> str:
        """Counters per workflow name and per service."""
        return f"{self.tag(shard)}:counters"

    def outbox(self, shard: int) -> str:
        """Pending outbound messages by id."""
        return f"{self.tag(shard)}:outbox"

    def timers(self, shard: int) -> str:
        """Timers of the shard's runs (`kind|workflow_id|step|attempt`) by due time (ms,
        Redis clock); a claimed timer's score is its claim's lease deadline."""
        return f"{self.tag(shard)}:timers"

    def dead_timers(self, shard: int) -> str:
        """Hash: the shard's timers that could not be applied, with the reason."""
        return f"{self.tag(shard)}:timers:dead"

    def outbox_due(self, shard: int) -> str:
        """Pending outbound message ids by lease deadline."""
        return f"{self.tag(shard)}:outbox:due"

    def parked(self, shard: int, service: str) -> str:
        """Sorted set: the parked steps of one service in one shard (``unpark`` timer
        names), scored by when they were parked, so the queue drains oldest first."""
        return f"{self.tag(shard)}:parked:{service}"

    def released(self, shard: int, service: str) -> str:
        """Hash: the parked steps of one service in one shard released from its queue and
        not yet gone out (``unpark`` timer name -> its score in the queue): one queued
        again (flow control refused it a permit, or the breaker opened again) goes back in
        its place, not at the end."""
        return f"{self.tag(shard)}:released:{service}"

    def drain(self, service: str) -> str:
        """String: the replica draining one service's parked queues now, with a TTL."""
        return f"{self.prefix}:drain:{{{service}}}"

    @property
    def parked_services(self) -> str:
        """Set: every service that ever had a step parked, so its parked queues are
        drained even when no loaded definition names it (runs on an older plan)."""
        return f"{self.prefix}:parked:services"

    def routed(self, shard: int) -> str:
        """Sorted set, every score 0: the shard's step attempts in flight on a registered
        instance (`mediator.core.routing` members), so one instance's are one lex range."""
        return f"{self.tag(shard)}:routed"

    def audit(self, workflow_id: str) -> str:
        """Stream: the audit log of one run (same hash slot as its state)."""
        return f"{self.tag(self.shard_of(workflow_id))}:audit:{workflow_id}"

    def metric(self, kind: str, name: str, bucket: int) -> str:
        """Hash: one time bucket of one metrics series (`mediator.core.metrics`)."""
        return f"{self.prefix}:m:{kind}:{name}:{bucket}"

    def metric_names(self, kind: str) -> str:
        """Sorted set: the names of the metrics series of one kind, scored by when each was
        last written (epoch s); names whose buckets all expired are trimmed."""
        return f"{self.prefix}:m:series:{kind}"

    def alerts(self, what: str) -> str:
        """The alerts' ``active`` hash, ``history`` list or evaluation ``lease``."""
        return f"{self.prefix}:{{alerts}}:{what}"

    @property
    def schedules(self) -> str:
        """Hash: every schedule's state, ``<name>:last`` (the last tick seen, ms),
        ``<name>:fired`` (the last tick fired), ``<name>:paused`` and ``<name>:spec`` (as
        loaded, JSON)."""
        return f"{self.prefix}:{{schedules}}"

    def limit(self, service: str) -> tuple[str, str]:
        """Zset and hash of one service's flow-control limit (one hash slot): the commands
        in flight (command id -> when its permit lapses) and the limit's state (tokens,
        at, queued)."""
        base = f"{self.prefix}:limit:{{{service}}}"
        return f"{base}:inflight", f"{base}:state"

    def instance_limit(self, service: str, instance: str) -> tuple[str, str]:
        """`limit` for one instance of a service with a per-instance limit: its scope is
        ``<service>@<instance>``."""
        return self.limit(f"{service}@{instance}")

    def flow_lease(self, service: str) -> str:
        """String: the replica releasing `service`'s queued commands, with a TTL."""
        return f"{self.prefix}:flow:{{{service}}}"

    def correlation(self, digest: str) -> tuple[str, str]:
        """String and list of one correlation key of a signal (`correlation_digest`, one
        hash slot): the run whose `wait` step waits for it (with a TTL), and the signals
        sent for it before any did (JSON controls, oldest first, capped, with a TTL)."""
        base = f"{self.prefix}:sig:{{{digest}}}"
        return f"{base}:run", f"{base}:pending"

    def concurrency(self, digest: str) -> tuple[str, str]:
        """Sorted sets of one concurrency key of a workflow (`concurrency_digest`, one
        hash slot): the runs holding its slots (run id -> when granted, ms) and the runs
        waiting for one (run id -> priority rank and when queued, `slot_score`)."""
        base = f"{self.prefix}:cc:{{{digest}}}"
        return f"{base}:held", f"{base}:queue"

    @property
    def concurrency_keys(self) -> str:
        """Hash: every concurrency key with runs holding or waiting for its slots, by
        digest -> JSON ``[workflow, key, limit]``, for the upkeep and the ops views."""
        return f"{self.prefix}:cc:keys"

    @property
    def concurrency_lease(self) -> str:
        """String: the replica passing concurrency keys' free slots on, with a TTL."""
        return f"{self.prefix}:cc:lease"

    def control(self, control_id: str) -> str:
        """String: what became of one operator's control (JSON), kept for a day."""
        return f"{self.prefix}:ctl:{control_id}"

    def breaker(self, service: str) -> str:
        """Hash: the circuit breaker of one service, shared by every replica."""
        return f"{self.prefix}:breaker:{{{service}}}"

    @property
    def services(self) -> str:
        """Set: every service that has heartbeated, for listing the registry."""
        return f"{self.prefix}:reg:services"

    @property
    def health_watermark(self) -> str:
        """Hash: per partition of the health topic, the time of the last marker read from
        it (`mediator.runtime.liveness`), and ``partitions``: how many it has."""
        return f"{self.prefix}:reg:watermark"

    @property
    def marker_lease(self) -> str:
        """String: the replica writing the health topic's markers, with a TTL."""
        return f"{self.prefix}:reg:marker"

    def registry(self, service: str) -> tuple[str, str, str, str, str, str]:
        """The registry of one service, one hash slot: its instances' last heartbeats
        (hash), their status (hash), when each is down unless heard from again (sorted
        set), when each was last heard from (sorted set), those an operator drained (set)
        and those marked down because their heartbeats stopped (set: dead, not left)."""
        base = f"{self.prefix}:reg:{{{service}}}"
        return (
            f"{base}:docs",
            f"{base}:status",
            f"{base}:due",
            f"{base}:seen",
            f"{base}:drained",
            f"{base}:dead",
        )


def concurrency_digest(workflow: str, key: str) -> str:
    """The digest naming the keys of workflow `workflow`'s concurrency key value `key`."""
    return hashlib.blake2b(f"{workflow}\0{key}".encode(), digest_size=8).hexdigest()


def correlation_digest(event: str, key: str) -> str:
    """The digest naming the keys of the signal `event`'s correlation key `key`."""
    return hashlib.blake2b(f"{event}\0{key}".encode(), digest_size=8).hexdigest()
