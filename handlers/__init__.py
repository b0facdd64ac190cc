"""Thin FastStream subscribers (requests and replies together, control, health): hand the
records to the runtime, mark their offsets after it returns."""

from __future__ import annotations

from handlers._batch import Offsets, handle_batch
from handlers.control import register as register_control
from handlers.groups import adopt_offsets, inbound_group, previous_groups
from handlers.health import register as register_health
from handlers.inbound import register as register_inbound
from handlers.outbound import declare as declare_outbound

__all__ = [
    "Offsets",
    "adopt_offsets",
    "declare_outbound",
    "handle_batch",
    "inbound_group",
    "previous_groups",
    "register_control",
    "register_health",
    "register_inbound",
]
