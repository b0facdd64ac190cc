"""Kafka mediator: an event-driven service orchestrator with its state in Redis.

Clients publish request events, the mediator runs the named workflow by sending commands to
services over Kafka and consuming their replies, and publishes a result event at the end.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
