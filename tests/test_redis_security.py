"""Redis over TLS with an ACL user, against a real server (Debian's redis-server with a
TLS port and a CA made in the test): a workflow runs end to end; a wrong CA and a wrong
password are refused with the reason; the URL's password is never logged."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from mediator.errors import MediatorError
from mediator.replica import Mediator
from mediator.settings import RedisSettings, Settings
from mediator.storage.connection import redacted
from tests.helpers import step
from tests.system import System, echo
from tests.tls import Authority, tls_redis
from topics import WorkflowStatus

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs Debian's redis-server (TLS build)"
)
USER, PASSWORD = "mediator", "redis-acl-password-0123"


def _on(settings: Settings, **redis: Any) -> Settings:
    merged = {**settings.redis.model_dump(), **redis}
    return settings.model_copy(update={"redis": RedisSettings.model_validate(merged)})


async def test_a_workflow_runs_on_redis_over_tls_as_an_acl_user(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")
    async with tls_redis(tmp_path, USER, PASSWORD) as (port, authority):
        secured = _on(
            settings, url=f"rediss://localhost:{port}/0", username=USER,
            password_file=str(secret), ssl_ca_certs=str(authority.cafile),
        )  # fmt: skip
        system = System(secured, [{"name": "tls", "steps": [step("a")]}])
        try:
            await system.create_topics()
            await system.worker("svc", {"a": echo})
            with caplog.at_level(logging.INFO, logger="mediator.app"):
                mediator = await system.mediator()
            client = await system.client()
            result = await client.submit("tls", {}, request_id="on-tls", timeout=30)
            assert result.status is WorkflowStatus.COMPLETED
            assert await mediator.redis.acl_whoami() == USER
        finally:
            await system.close()
    assert "mediator started" in caplog.text


async def test_a_wrong_ca_or_password_is_refused_with_the_reason(
    settings: Settings, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    stranger = Authority(other)
    async with tls_redis(tmp_path, USER, PASSWORD) as (port, authority):
        url = f"rediss://localhost:{port}/0"
        definitions = System(settings, [{"name": "x", "steps": [step("a")]}]).definitions
        wrong_ca = _on(settings, url=url, username=USER, password=PASSWORD,
                       ssl_ca_certs=str(stranger.cafile), socket_timeout_s=2)  # fmt: skip
        with pytest.raises(MediatorError, match="certificate verify failed"):
            await Mediator(wrong_ca, definitions).start()
        wrong_password = _on(settings, url=url, username=USER, password="not-it-at-all",
                             ssl_ca_certs=str(authority.cafile), socket_timeout_s=2)  # fmt: skip
        with pytest.raises(MediatorError, match=r"(?i)password|WRONGPASS|invalid"):
            await Mediator(wrong_password, definitions).start()


def test_tls_settings_need_a_tls_url_and_passwords_stay_out_of_logs() -> None:
    with pytest.raises(MediatorError, match="rediss://"):
        RedisSettings(url="redis://r:6379/0", ssl_ca_certs=Path("/etc/hosts")).client_options()
    assert redacted("rediss://u:hunter2@r:6380/0") == "rediss://u:***@r:6380/0"
    assert "hunter2" not in repr(RedisSettings(url="redis://:hunter2@r/0"))
