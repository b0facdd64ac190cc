"""The `mediator` command line, `mediator dev`, the demo services and the embedded servers."""

from __future__ import annotations

from mediator.cli.commands import app, main

__all__ = ["app", "main"]
