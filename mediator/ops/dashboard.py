"""The web dashboard: a JSON API over the Redis state (runs, services, metrics, alerts)
and the dead-letter topic, actions sent as controls through the control topic, and the
page that shows them (served from the package: no CDN, no internet needed)."""

from __future__ import annotations

import logging
import time
from importlib import resources
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from redis.asyncio import Redis

from mediator.codec import record
from mediator.core.metrics import summarize
from mediator.errors import ConfigurationError, MediatorError
from mediator.ops.control import (
    ControlSender,
    control_event,
    control_signer,
    read_control_outcome,
)
from mediator.ops.dlq import (
    parse_coordinates,
    read_dead_letters,
    replay,
    replayable_topics,
    select,
)
from mediator.ops.guard import Guard, is_loopback
from mediator.ops.runs import APPLIES_TO, RunFilter, list_runs, runs_for, show_run
from mediator.ops.schedules import compiled as compiled_schedule
from mediator.ops.schedules import find as find_schedule
from mediator.ops.schedules import manual_request, schedule_rows
from mediator.ops.services import collect_keys, collect_services
from mediator.ops.status import collect_status
from mediator.ops.window import parse_moment
from mediator.settings import Settings
from mediator.storage.alerts import active_alerts, alert_history
from mediator.storage.keys import Keys
from mediator.storage.metrics import MetricsStore
from mediator.storage.schedules import ScheduleStates
from topics.events import ControlAction, RequestEvent

__all__ = ["Dashboard"]

log = logging.getLogger("mediator.dashboard")

#: What the page reads its live figures over (seconds).
RECENT_S = 300
#: A bulk action logs its progress every this many controls sent.
BULK_BATCH = 100
#: Files the page is made of, served from ``mediator/ops/static``.
ASSETS = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}


class Dashboard:
    """The dashboard's web application for one deployment (its settings)."""

    def __init__(
        self, settings: Settings, redis: Redis, keys: Keys, host: str = "127.0.0.1"
    ) -> None:
        """The application for a dashboard listening on `host`: one beyond loopback
        needs an operator token (`dashboard.token`)."""
        self.settings = settings
        token = settings.dashboard.secret()
        if token is None and not is_loopback(host):
            msg = (
                f"the dashboard would listen on {host} without an operator token: set "
                "dashboard.token (or dashboard.token_file), or listen on 127.0.0.1"
            )
            raise ConfigurationError(msg)
        hosts = ["localhost", "127.0.0.1", "::1", host, *settings.dashboard.hosts]
        self.guard = Guard(token, hosts)
        self.redis = redis
        self.keys = keys
        monitoring = settings.service_monitoring
        self.metrics = MetricsStore(redis, keys, monitoring.bucket_s, monitoring.window_ms)
        kafka = settings.kafka
        self.controls = ControlSender(
            kafka,
            kafka.topics,
            enable_idempotence=kafka.enable_idempotence,
            signer=control_signer(settings.signing),
        )
        app = web.Application(middlewares=[self.guard.middleware, _errors])
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._asset)
        app.router.add_get("/api/overview", self._overview)
        app.router.add_get("/api/runs", self._runs)
        app.router.add_get("/api/runs/{wid}", self._run)
        app.router.add_post("/api/runs/{wid}/signal", self._signal)
        app.router.add_post("/api/runs/{wid}/{action}", self._run_action)
        app.router.add_post("/api/retry", self._bulk_retry)
        app.router.add_post("/api/bulk/{action}", self._bulk)
        app.router.add_get("/api/keys", self._keys)
        app.router.add_get("/api/controls/{control_id}", self._control_outcome)
        app.router.add_get("/api/services", self._services)
        app.router.add_get("/api/services/{service}/series", self._series)
        app.router.add_post("/api/services/{service}/reset", self._reset)
        app.router.add_post("/api/services/{service}/{instance}/{action}", self._drain)
        app.router.add_get("/api/alerts", self._alerts)
        app.router.add_get("/api/schedules", self._schedules)
        app.router.add_post("/api/schedules/{name}/{action}", self._schedule_action)
        app.router.add_get("/api/dlq", self._dlq)
        app.router.add_post("/api/dlq/replay", self._replay)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        self.app = app

    async def _start(self, app: web.Application) -> None:
        await self.controls.start()

    async def _stop(self, app: web.Application) -> None:
        await self.controls.stop()

    # -- pages ---------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text=_asset("dashboard.html"), content_type="text/html")

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound(text=f"no asset {name!r}")
        return web.Response(text=_asset(name), content_type=ASSETS[name])

    # -- reads ---------------------------------------------------------------------------

    async def _overview(self, request: web.Request) -> web.Response:
        status = await collect_status(self.redis, self.keys, limit=10)
        until = int(time.time())
        services = await self.metrics.summaries("svc", None, until - RECENT_S, until)
        workflows = await self.metrics.summaries("wf", None, until - RECENT_S, until)
        answered = sum(s.answered for s in services.values())
        failed = sum(s.count("error") + s.count("timeout") for s in services.values())
        # Over the part of the window that has data: 50 s after a start, over 50 s.
        window = max((s.seconds for s in [*services.values(), *workflows.values()]), default=1)
        return web.json_response(
            {
                "counts": status["counts"],
                "outbox_pending": status["outbox_pending"],
                "stats": status["stats"],
                "dead_letters": int(status["stats"].get("dead_letters", 0)),
                "recent": status["recent"],
                "window_s": round(window),
                "commands_per_s": round(answered / window, 3),
                "runs_per_s": round(sum(w.answered for w in workflows.values()) / window, 3),
                "error_rate": failed / answered if answered else None,
                "alerts": len(await active_alerts(self.redis, self.keys)),
            }
        )

    async def _runs(self, request: web.Request) -> web.Response:
        query = request.query
        runs = await list_runs(
            self.redis,
            self.keys,
            status=query.get("status") or None,
            workflow=query.get("workflow") or None,
            since_ms=_moment(query, "since"),
            until_ms=_moment(query, "until"),
            request_id=query.get("request_id") or None,
            limit=min(_int(query, "limit") or 50, 500),
        )
        return web.json_response({"runs": runs})

    async def _run(self, request: web.Request) -> web.Response:
        run = await show_run(self.redis, self.keys, request.match_info["wid"])
        if run is None:
            raise web.HTTPNotFound(text="no such run (unknown, or expired)")
        return web.json_response(run)

    async def _services(self, request: web.Request) -> web.Response:
        services = await collect_services(self.redis, self.keys)
        until = int(time.time())
        names = sorted({*services, *await self.metrics.names("svc")})
        summaries = await self.metrics.summaries("svc", names, until - RECENT_S, until)
        out = {}
        for name in names:
            doc = services.get(name, {"breaker": {"state": "closed"}, "parked": 0, "instances": []})
            out[name] = {**doc, "metrics": summaries[name].doc()}
        return web.json_response({"window_s": RECENT_S, "services": out})

    async def _series(self, request: web.Request) -> web.Response:
        service = request.match_info["service"]
        minutes = min(_int(request.query, "minutes") or 15, 24 * 60)
        until = int(time.time())
        rows = (await self.metrics.buckets("svc", [service], until - minutes * 60, until))[service]
        bucket_s = self.metrics.bucket_s
        points = []
        for start, fields in rows:
            summary = summarize([fields], bucket_s)
            points.append(
                {
                    "t": start * 1000,
                    "throughput": summary.throughput,
                    "p95_ms": summary.percentile(95),
                    "error_rate": summary.error_rate,
                    "parked": fields.get("parked"),
                }
            )
        return web.json_response({"service": service, "bucket_s": bucket_s, "points": points})

    async def _alerts(self, request: web.Request) -> web.Response:
        active = await active_alerts(self.redis, self.keys)
        history = await alert_history(self.redis, self.keys, 200)
        return web.json_response(
            {
                "active": [a.model_dump(mode="json") for a in active.values()],
                "history": [a.model_dump(mode="json") for a in history],
            }
        )

    async def _dlq(self, request: web.Request) -> web.Response:
        kafka = self.settings.kafka
        letters = await read_dead_letters(
            kafka,
            kafka.topics,
            limit=(limit := min(_int(request.query, "limit") or 100, 1000)),
            tail=limit,  # the newest `limit` letters: never the whole topic
            fetch_max_wait_ms=kafka.fetch_max_wait_ms,
            timeout_s=10,
        )
        return web.json_response(
            {
                "letters": [
                    {
                        "coordinates": f"{partition}:{offset}",
                        **letter.model_dump(mode="json", exclude={"value"}),
                        "value": letter.value[:2000],
                    }
                    for partition, offset, letter in reversed(letters)
                ]
            }
        )

    # -- actions -------------------------------------------------------------------------

    async def _control(self, action: ControlAction, **target: Any) -> dict[str, Any]:
        control = control_event(action, operator="dashboard", **target)
        await self.controls.send(control)
        return {"control_id": control.control_id, "action": action.value, **target}

    async def _control_outcome(self, request: web.Request) -> web.Response:
        """What became of a control: ``{applied, detail, at_ms}``, or ``{pending: true}``
        while no replica has answered."""
        found = await read_control_outcome(self.redis, self.keys, request.match_info["control_id"])
        return web.json_response(found if found is not None else {"pending": True})

    async def _signal(self, request: web.Request) -> web.Response:
        """Send a signal to a run: ``{event, payload}`` (an approval from the run page)."""
        body = await _body(request)
        event, payload = body.get("event"), body.get("payload") or {}
        if not isinstance(event, str) or not isinstance(payload, dict):
            raise web.HTTPBadRequest(
                text="give the signal's `event` (a name) and a `payload` object"
            )
        try:
            control = control_event(
                ControlAction.SIGNAL,
                operator="dashboard",
                workflow_id=request.match_info["wid"],
                signal=event,
                payload=payload,
            )
        except ValidationError as exc:
            raise web.HTTPBadRequest(text=f"not a signal: {exc.errors()[0]['msg']}") from None
        await self.controls.send(control)
        sent = {"control_id": control.control_id, "action": "signal", "event": event}
        return web.json_response(sent, status=202)

    async def _run_action(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action not in ("cancel", "retry", "pause", "resume"):
            raise web.HTTPNotFound(text=f"no run action {action!r}")
        sent = await self._control(ControlAction(action), workflow_id=request.match_info["wid"])
        return web.json_response(sent, status=202)

    async def _bulk_retry(self, request: web.Request) -> web.Response:
        body = await _body(request)
        ids = body.get("workflow_ids")
        if not ids:
            runs = await list_runs(
                self.redis,
                self.keys,
                status=body.get("status") or "failed",
                workflow=body.get("workflow") or None,
                limit=min(int(body.get("limit") or 100), 1000),
            )
            ids = [run["workflow_id"] for run in runs]
        if body.get("dry_run"):  # how many it would retry, for the page to confirm
            return web.json_response({"count": len(ids)})
        sent = [await self._control(ControlAction.RETRY, workflow_id=str(wid)) for wid in ids]
        return web.json_response({"sent": sent}, status=202)

    async def _bulk(self, request: web.Request) -> web.Response:
        """Cancel, retry, pause or resume the runs named (`workflow_ids`) or every run the
        filters (`workflow`, `status`, `version`, `error_code`, `step`, `since`, `until`)
        choose that the action applies to; with `dry_run`, only how many (for the page
        to confirm). Sent in batches of `BULK_BATCH`, each control as this operator."""
        action = request.match_info["action"]
        if action not in APPLIES_TO:
            raise web.HTTPNotFound(text=f"no bulk action {action!r}")
        body = await _body(request)
        ids = [str(wid) for wid in body.get("workflow_ids") or ()]
        if not ids:
            where = RunFilter(_int(body, "version"), body.get("error_code") or None,
                              body.get("step") or None)  # fmt: skip
            try:
                ids = await runs_for(
                    self.redis, self.keys, action, body.get("workflow") or None,
                    body.get("status") or None, _moment(body, "since"), _moment(body, "until"),
                    where,
                )  # fmt: skip
            except ValueError as exc:
                raise web.HTTPBadRequest(text=str(exc)) from None
        if body.get("dry_run"):
            return web.json_response({"action": action, "count": len(ids)})
        sent = 0
        for start in range(0, len(ids), BULK_BATCH):
            for wid in ids[start : start + BULK_BATCH]:
                await self._control(ControlAction(action), workflow_id=wid)
                sent += 1
            log.info("bulk %s: %d of %d controls sent", action, sent, len(ids))
        return web.json_response({"action": action, "sent": sent}, status=202)

    async def _keys(self, request: web.Request) -> web.Response:
        return web.json_response(await collect_keys(self.redis, self.keys))

    async def _schedules(self, request: web.Request) -> web.Response:
        now, rows = await schedule_rows(self.redis, self.keys)
        return web.json_response({"now_ms": now, "schedules": rows})

    async def _schedule_action(self, request: web.Request) -> web.Response:
        """Pause, resume or fire now (``trigger``) one schedule."""
        name, action = request.match_info["name"], request.match_info["action"]
        if action not in ("pause", "resume", "trigger"):
            raise web.HTTPNotFound(text=f"no schedule action {action!r}")
        try:
            state, now = await find_schedule(self.redis, self.keys, name)
            if action == "trigger":
                fired = manual_request(compiled_schedule(state), now)
                await self._publish_request(fired)
                return web.json_response({"action": action, "request_id": fired.request_id})
        except MediatorError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        await ScheduleStates(self.redis, self.keys).set_paused(name, action == "pause")
        return web.json_response({"action": action, "schedule": name})

    async def _publish_request(self, fired: RequestEvent) -> None:
        """Publish a request as this process's client (signed when `signing.client` is)."""
        topic, key = self.settings.kafka.topics.requests, fired.request_id.encode()
        keys = self.settings.signing.request_signer()
        value, extra = record(fired, topic, key, keys)
        await self.controls.producer.send_and_wait(topic, value, key=key, headers=extra)

    async def _reset(self, request: web.Request) -> web.Response:
        sent = await self._control(
            ControlAction.RESET_BREAKER, service=request.match_info["service"]
        )
        return web.json_response(sent, status=202)

    async def _drain(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action not in ("drain", "undrain"):
            raise web.HTTPNotFound(text=f"no instance action {action!r}")
        sent = await self._control(
            ControlAction(action),
            service=request.match_info["service"],
            instance=request.match_info["instance"],
        )
        return web.json_response(sent, status=202)

    async def _replay(self, request: web.Request) -> web.Response:
        body = await _body(request)
        try:
            wanted = [parse_coordinates(str(c)) for c in body.get("coordinates") or []]
        except MediatorError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        if not wanted:
            raise web.HTTPBadRequest(text="name the letters to replay (coordinates)")
        kafka = self.settings.kafka
        letters = await read_dead_letters(kafka, kafka.topics, limit=None, timeout_s=10, at=wanted)
        report = await replay(
            kafka,
            select(letters, wanted),
            to=replayable_topics(kafka.topics),
            enable_idempotence=kafka.enable_idempotence,
        )
        return web.json_response(report.as_dict())


def _asset(name: str) -> str:
    return resources.files("mediator.ops").joinpath("static", name).read_text()


def _moment(query: Any, name: str) -> int | None:
    """A time filter: epoch milliseconds, an ISO-8601 time, or an age (``10m``, ``2h``)."""
    value = query.get(name)
    try:
        return parse_moment(value, now_ms=int(time.time() * 1000))
    except MediatorError:
        msg = f"{name} must be a time (2026-12-04T10:00), an age (10m, 2h) or epoch ms: {value!r}"
        raise web.HTTPBadRequest(text=msg) from None


def _int(query: Any, name: str) -> int | None:
    value = query.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer, not {value!r}") from None


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object")
    return body


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Failures as clear JSON errors: Redis or Kafka unreachable is a 503."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response({"error": exc.text or exc.reason}, status=exc.status)
    except MediatorError as exc:
        log.warning("%s %s: %s", request.method, request.path, exc)
        return web.json_response({"error": str(exc)}, status=503)
    except Exception:
        # The detail goes to the log, not to whoever asked.
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error (see the dashboard's log)"}, status=500)
