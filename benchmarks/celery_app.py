"""The Celery peer: one trivial task, Redis as broker and result backend.

The worker is started as ``celery -A benchmarks.celery_app worker`` with the Redis URL and
queue in ``BENCH_CELERY_REDIS`` and ``BENCH_CELERY_QUEUE``; the suite builds its own client
app with `make_app`, so nothing global is configured at import time in the suite itself.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

__all__ = ["ECHO_TASK", "app", "echo", "make_app"]

ECHO_TASK = "bench.echo"


def make_app(redis_url: str, queue: str) -> Celery:
    """A Celery app using ``redis_url`` as broker and result backend, with the echo task."""
    app = Celery("benchmarks", broker=redis_url, backend=redis_url, set_as_current=False)
    # Celery defaults otherwise: what a user would run. Only warnings are silenced.
    app.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        result_expires=3600,
    )

    # Not shared: each app built here has its own registry, so there is no duplicate name.
    app.task(name=ECHO_TASK, shared=False)(echo)
    return app


def echo(value: Any) -> Any:
    """The trivial task: returns its input."""
    return value


app = make_app(
    os.environ.get("BENCH_CELERY_REDIS", "redis://127.0.0.1:6379/0"),
    os.environ.get("BENCH_CELERY_QUEUE", "bench"),
)
