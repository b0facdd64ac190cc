"""Garbage-collector tuning for a replica process (`GcSettings`)."""

from __future__ import annotations

import gc

from mediator.settings import GcSettings

__all__ = ["tune_gc"]


def tune_gc(settings: GcSettings) -> None:
    """Make collections rarer, as `settings` says; nothing when tuning is off."""
    if settings.tune:
        gc.set_threshold(*settings.threshold)
