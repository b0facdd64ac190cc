"""Log output: plain text for people, or one JSON object per line for log pipelines.

Log calls about one run pass its fields as ``extra`` (`run_fields`); the JSON formatter
writes them as top-level keys (``workflow_id``, ``workflow``, ``request_id``, ``step``,
``attempt``, ``service``, ``instance``, ``trace_id``), so a log search by workflow id or
trace id finds every line of a run, on every replica.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = ["FIELDS", "TEXT_FORMAT", "JsonFormatter", "configure", "level_of", "run_fields"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The fields a log record may carry about a run, written by the JSON formatter.
FIELDS = (
    "workflow_id",
    "workflow",
    "request_id",
    "step",
    "attempt",
    "service",
    "instance",
    "trace_id",
    "replica",
    "code",
)


def run_fields(state: Any, **more: Any) -> dict[str, Any]:
    """``extra`` for a log call about the run `state` (a `WorkflowState`), plus `more`
    (``step``, ``attempt``, ``service``, ...); None values are left out."""
    fields = {
        "workflow_id": state.workflow_id,
        "workflow": state.workflow,
        "request_id": state.request_id,
        "trace_id": state.trace_id,
        **more,
    }
    return {k: v for k, v in fields.items() if v is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, the run fields present, and ``exception`` (the formatted traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        return orjson.dumps(doc, default=str).decode()


def level_of(name: str) -> int | None:
    """The logging level `name` stands for (a level name in any case, or a number)."""
    name = name.strip()
    return int(name) if name.isdigit() else logging.getLevelNamesMapping().get(name.upper())


def configure(level: int, fmt: str = "text", text_format: str = TEXT_FORMAT) -> None:
    """Log to stderr at `level`, as text (`text_format`) or JSON lines (`fmt` ``json``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(text_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
