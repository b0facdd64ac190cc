"""Thin FastStream subscribers, one module per inbound topic: decode, call the runtime, ack."""

from __future__ import annotations

from handlers._batch import Offsets, handle_batch
from handlers.control import register as register_control
from handlers.health import register as register_health
from handlers.outbound import declare as declare_outbound
from handlers.replies import register as register_replies
from handlers.requests import register as register_requests

__all__ = [
    "Offsets",
    "declare_outbound",
    "handle_batch",
    "register_control",
    "register_health",
    "register_replies",
    "register_requests",
]
