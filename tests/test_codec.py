"""The fast encoder writes what the models would, or declines."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import uuid
from typing import Any

import orjson
import pytest

from mediator import codec
from topics.events import ReplyEvent, ReplyStatus


class Colour(enum.Enum):
    RED = "red"


class Name(str):
    pass


@dataclasses.dataclass
class Point:
    x: int


PLAIN = [
    {"n": 1},
    [1, 2.5, "x", True, None, {"deep": [{"a": None}]}],
    'text with ünïcode and "quotes"',
    0,
    -(2**63),
    1.0e300,
    float("nan"),
    {"": ""},
    (1, 2),
    uuid.UUID(int=7),
    Colour.RED,
]
NOT_PLAIN = [
    dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    dt.date(2026, 1, 2),
    Point(1),
    Name("subclass"),
    {1: "int key"},
    2**70,
    decimal.Decimal("1.5"),
    {"set"},
    b"bytes",
]


def _fields(output: Any) -> dict[str, Any]:
    return {"schema_version": 1, "type": "reply", "command_id": "c1", "workflow_id": "w1",
            "step": "s", "attempt": 1, "status": "ok", "output": output, "service": "svc",
            "instance": "i", "replied_ms": 5}  # fmt: skip


def _model(output: Any) -> bytes:
    reply = ReplyEvent(
        command_id="c1", workflow_id="w1", step="s", attempt=1, status=ReplyStatus.OK,
        output=output, service="svc", instance="i", replied_ms=5,
    )  # fmt: skip
    return codec.encode(reply)


@pytest.mark.parametrize("output", PLAIN, ids=repr)
def test_plain_outputs_are_written_as_the_model_writes_them(output: Any) -> None:
    fast = codec.encode_plain(_fields(output))
    assert fast is not None
    assert orjson.loads(fast) == orjson.loads(_model(output))
    assert ReplyEvent.model_validate_json(fast) == ReplyEvent.model_validate_json(_model(output))


@pytest.mark.parametrize("output", NOT_PLAIN, ids=repr)
def test_other_outputs_are_left_to_the_model(output: Any) -> None:
    assert codec.encode_plain(_fields(output)) is None
