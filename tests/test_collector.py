"""A replica's garbage-collector tuning."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from mediator.runtime.collector import tune_gc
from mediator.settings import GcSettings, load_settings


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)


def test_tuning_raises_the_thresholds() -> None:
    gc.set_threshold(700, 10, 10)
    tune_gc(GcSettings(threshold=(40_000, 15, 50)))
    assert gc.get_threshold() == (40_000, 15, 50)


def test_tuning_off_leaves_the_collector_alone() -> None:
    gc.set_threshold(700, 10, 10)
    tune_gc(GcSettings(tune=False))
    assert gc.get_threshold() == (700, 10, 10)


def test_thresholds_come_from_the_settings_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().gc.threshold == (50_000, 20, 100)
    monkeypatch.setenv("MEDIATOR_GC__TUNE", "false")
    assert load_settings().gc.tune is False
