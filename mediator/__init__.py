"""Kafka mediator: an event-driven service orchestrator with its state in Redis.

Clients publish request events, the mediator runs the named workflow by sending commands to
services over Kafka and consuming their replies, and publishes a result event at the end.

The package is layered; each sub-package imports only those before it:

- `mediator.core`: definitions and plans, expressions, the pure engine, balancer (no I/O);
- `mediator.storage`: Redis: keys, the store and its Lua scripts, cache, stored definitions;
- `mediator.runtime`: consumer loops, the error boundary, batch processing, the outbox,
  timers, breakers, registry and routing;
- `mediator.replica`: one replica wired from those parts and `handlers` (`Mediator`,
  `create_app`);
- `mediator.sdk`: the service SDK (`Worker`) and the client SDK (`MediatorClient`);
- `mediator.ops`: status and recovery;
- `mediator.cli`: the command line, `mediator dev`, demo services, embedded servers.

The public API is importable from here; it is loaded on first use, so importing one layer
never drags in the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "ActionError",
    "ClientClosed",
    "Definitions",
    "KafkaConnection",
    "Keyring",
    "Mediator",
    "MediatorClient",
    "MediatorError",
    "Settings",
    "SubmitTimeout",
    "Worker",
    "WorkflowSpec",
    "__version__",
    "compile_workflow",
    "create_app",
    "load_paths",
    "load_settings",
    "parse_workflows",
]

__version__ = "0.1.0"

_EXPORTS = {
    "ActionError": "mediator.sdk.worker",
    "ClientClosed": "mediator.sdk.client",
    "Definitions": "mediator.definitions",
    "KafkaConnection": "mediator.kafka",
    "Keyring": "mediator.core.signing",
    "Mediator": "mediator.replica",
    "MediatorClient": "mediator.sdk.client",
    "MediatorError": "mediator.errors",
    "Settings": "mediator.settings",
    "SubmitTimeout": "mediator.sdk.client",
    "Worker": "mediator.sdk.worker",
    "WorkflowSpec": "mediator.core.workflow",
    "compile_workflow": "mediator.core.workflow",
    "create_app": "mediator.replica",
    "load_paths": "mediator.definitions",
    "load_settings": "mediator.settings",
    "parse_workflows": "mediator.core.workflow",
}

if TYPE_CHECKING:
    from mediator.core.signing import Keyring
    from mediator.core.workflow import WorkflowSpec, compile_workflow, parse_workflows
    from mediator.definitions import Definitions, load_paths
    from mediator.errors import MediatorError
    from mediator.kafka import KafkaConnection
    from mediator.replica import Mediator, create_app
    from mediator.sdk.client import ClientClosed, MediatorClient, SubmitTimeout
    from mediator.sdk.worker import ActionError, Worker
    from mediator.settings import Settings, load_settings


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        msg = f"module 'mediator' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
