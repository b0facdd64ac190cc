"""Logs as JSON lines, with each run's fields, from the runtime and the command line."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from mediator.logs import JsonFormatter
from mediator.sdk.worker import ActionError
from mediator.storage.keys import workflow_id_for
from tests.helpers import cli, cli_env
from tests.system import RETRIED, echo
from topics.events import WorkflowStatus


async def _work(data: Any, command: Any) -> dict[str, Any]:
    if command.step == "a" and command.attempt == 1:
        msg = "busy, try again"
        raise ActionError(msg, code="busy", retryable=True)
    if command.step == "b" and data.get("refuse"):
        msg = "refused"
        raise ActionError(msg, code="refused", retryable=False)
    return await echo(data, command)


def test_json_lines_carry_the_run_fields_and_the_traceback() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("mediator.runs", logging.INFO, __file__, 1, "step %s", ("a",), None)
    record.__dict__.update(workflow_id="wf-1", step="a", attempt=2, trace_id="t-1", other="x")
    doc = orjson.loads(formatter.format(record))
    assert (doc["message"], doc["level"], doc["logger"]) == ("step a", "INFO", "mediator.runs")
    fields = (doc["workflow_id"], doc["step"], doc["attempt"], doc["trace_id"])
    assert fields == ("wf-1", "a", 2, "t-1")
    assert "other" not in doc and doc["ts"].endswith("+00:00")
    try:
        msg = "boom"
        raise ValueError(msg)
    except ValueError:
        failed = logging.LogRecord("m", logging.ERROR, __file__, 1, "x", (), sys.exc_info())
    assert "ValueError: boom" in orjson.loads(formatter.format(failed))["exception"]


async def test_the_runtime_logs_failed_attempts_and_runs_with_their_fields(
    make_system: Any,
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    runs = logging.getLogger("mediator.runs")
    runs.addHandler(handler)
    level = runs.level
    runs.setLevel(logging.INFO)
    try:
        system = await make_system(RETRIED)
        await system.worker("svc", {"work": _work})
        await system.mediator()
        client = await system.client()
        ok = await client.submit("retried", {}, request_id="logged-ok", trace_id="trace-ok")
        bad = await client.submit("retried", {"refuse": True}, request_id="logged-bad")
    finally:
        runs.removeHandler(handler)
        runs.setLevel(level)
    assert (ok.status, bad.status) == (WorkflowStatus.COMPLETED, WorkflowStatus.FAILED)

    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    retried = [d for d in lines if d.get("workflow_id") == workflow_id_for("logged-ok")]
    assert [(d["level"], d["step"], d["attempt"], d["code"]) for d in retried] == [
        ("INFO", "a", 1, "busy")
    ]
    assert retried[0]["trace_id"] == "trace-ok" and retried[0]["service"] == "svc"
    assert "busy, try again" in retried[0]["message"]
    failed = [d for d in lines if d.get("workflow_id") == workflow_id_for("logged-bad")]
    assert [(d["level"], d.get("step"), d["code"]) for d in failed] == [
        ("INFO", "a", "busy"),
        ("INFO", "b", "refused"),
        ("WARNING", None, "refused"),
    ]
    assert failed[-1]["request_id"] == "logged-bad" and failed[-1]["trace_id"] == bad.trace_id


@pytest.mark.slow
async def test_run_with_log_format_json_writes_only_json_lines(
    settings: Any, tmp_path: Path
) -> None:
    code, out, err = await cli(settings, "run", "--log-format", "xml")
    assert code == 2, (out, err)
    assert "unknown log format 'xml'; use text or json" in err
    assert len(err.strip().splitlines()) == 1, err

    workflows = tmp_path / "retried.yaml"
    workflows.write_text(yaml.safe_dump(RETRIED))
    environment = cli_env(settings, {"MEDIATOR_HTTP__PORT": "0", "MEDIATOR_LOG_FORMAT": "json"})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mediator", "run", "--workflows", str(workflows),
        "--create-topics", env=environment, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    lines: list[bytes] = []
    try:
        async with asyncio.timeout(60):
            while not any(b"mediator started" in line for line in lines):
                line = await process.stderr.readline()
                assert line, b"".join(lines).decode()
                lines.append(line)
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    lines += (rest or b"").splitlines()
    docs = [orjson.loads(line) for line in lines if line.strip()]
    assert process.returncode == 0, docs
    started = [d["message"] for d in docs if "mediator started" in d["message"]]
    assert started and started[0].endswith("uvloop event loop"), started  # `auto`, installed
    assert all({"ts", "level", "logger", "message"} <= d.keys() for d in docs)
