"""The dashboard on the network: only the host names it answers to, only with the operator
token when it has one (and never beyond loopback without), actions only from its own page,
security headers on everything, and no exception text in error bodies. Against the real
Redis and broker; the cross-origin attack itself runs in the browser test."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from mediator.errors import ConfigurationError
from mediator.ops.dashboard import Dashboard
from mediator.ops.guard import ACTION_HEADER, hash_token
from mediator.settings import DashboardSettings, Settings
from mediator.storage.keys import Keys

TOKEN = "a-long-operator-token-0123456789"


def _with(settings: Settings, **dashboard: Any) -> Settings:
    return settings.model_copy(update={"dashboard": DashboardSettings.model_validate(dashboard)})


async def _client(settings: Settings, redis: Redis, host: str = "127.0.0.1") -> TestClient:
    keys = Keys(settings.redis.key_prefix, settings.redis.shards)
    dashboard = Dashboard(settings, redis, keys, host)
    client = TestClient(TestServer(dashboard.app, host="127.0.0.1"))
    await client.start_server()
    return client


@pytest.fixture
async def open_dashboard(settings: Settings, redis_client: Redis) -> AsyncIterator[TestClient]:
    client = await _client(settings, redis_client)
    try:
        yield client
    finally:
        await client.close()


async def test_a_host_it_does_not_answer_to_is_refused(open_dashboard: TestClient) -> None:
    """DNS rebinding: a page on attacker.example whose name now points here reads nothing."""
    response = await open_dashboard.get("/api/runs", headers={"Host": "attacker.example"})
    assert response.status == 421
    assert "dashboard.hosts" in (await response.json())["error"]
    assert (await open_dashboard.get("/api/runs")).status == 200


async def test_every_response_carries_the_security_headers(open_dashboard: TestClient) -> None:
    for path in ("/", "/api/overview", "/static/dashboard.js", "/nowhere"):
        response = await open_dashboard.get(path)
        csp = response.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, path
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Content-Type": "text/plain"}, "{}", 403),  # what a form or no-cors fetch can send
        ({"Content-Type": "application/json"}, "{}", 403),  # no action header
        ({ACTION_HEADER: "1", "Content-Type": "text/plain"}, "{}", 415),
        (
            {
                ACTION_HEADER: "1",
                "Content-Type": "application/json",
                "Origin": "http://evil.example",
            },
            "{}",
            403,
        ),
    ],
)
async def test_an_action_not_from_the_dashboards_page_is_refused(
    open_dashboard: TestClient, headers: dict[str, str], body: str, status: int
) -> None:
    response = await open_dashboard.post("/api/runs/wf-x/cancel", data=body, headers=headers)
    assert response.status == status


async def test_an_action_from_the_page_goes_through(open_dashboard: TestClient) -> None:
    origin = f"http://127.0.0.1:{open_dashboard.port}"
    response = await open_dashboard.post(
        "/api/services/svc/reset",
        json={},
        headers={ACTION_HEADER: "1", "Origin": origin},
    )
    assert response.status == 202, await response.text()


async def test_with_a_token_every_page_and_call_needs_it(
    settings: Settings, redis_client: Redis
) -> None:
    for token in (TOKEN, hash_token(TOKEN)):  # as is, or kept hashed in the settings
        client = await _client(_with(settings, token=token), redis_client)
        try:
            for path in ("/", "/api/runs", "/static/dashboard.js"):
                refused = await client.get(path)
                assert refused.status == 401, path
                assert refused.headers["WWW-Authenticate"].startswith("Basic")
            wrong = base64.b64encode(b"ops:not-the-token").decode()
            assert (await client.get("/api/runs", headers={"Authorization": f"Basic {wrong}"})
                    ).status == 401  # fmt: skip
            basic = base64.b64encode(f"ops:{TOKEN}".encode()).decode()
            assert (await client.get("/api/runs", headers={"Authorization": f"Basic {basic}"})
                    ).status == 200  # fmt: skip
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            assert (await client.get("/api/runs", headers=bearer)).status == 200
        finally:
            await client.close()


async def test_beyond_loopback_only_with_a_token(
    settings: Settings, redis_client: Redis, tmp_path: Any
) -> None:
    keys = Keys(settings.redis.key_prefix, settings.redis.shards)
    with pytest.raises(ConfigurationError, match="without an operator token"):
        Dashboard(settings, redis_client, keys, "0.0.0.0")
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    Dashboard(_with(settings, token_file=str(secret)), redis_client, keys, "0.0.0.0")


async def test_an_internal_error_says_nothing_of_its_cause(
    open_dashboard: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await open_dashboard.get("/api/dlq?limit=x")).status == 400  # a clear 400

    async def broken(*args: Any, **kwargs: Any) -> Any:
        msg = "redis://user:hunter2@10.0.0.5:6379 exploded"
        raise RuntimeError(msg)

    monkeypatch.setattr("mediator.ops.dashboard.list_runs", broken)
    response = await open_dashboard.get("/api/runs")
    assert response.status == 500
    assert "hunter2" not in await response.text()
