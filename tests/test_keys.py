"""The key layout drawn in `mediator.storage.keys` is the one its builders produce: every
key the mediator writes is listed there, so ops tools and dashboards can rely on it."""

from __future__ import annotations

import inspect

from mediator.storage import keys as module
from mediator.storage.keys import Keys

#: What the layout writes for each parameter of a key builder.
SAMPLES = {
    "shard": 3,
    "workflow_id": "<workflow_id>",
    "status": "<status>",
    "name": "<name>",
    "service": "<service>",
    "version": "<version>",
    "kind": "<kind>",
    "bucket": "<bucket>",
    "what": "active",
    "control_id": "<control_id>",
    "digest": "<digest>",
    "instance": "<instance>",
}

#: Builders whose output the layout writes in a more general form.
GENERAL = {
    "definition": "med:def:<name>@<version>",
    "status_index": "med:{s3}:st:<status>",
    "name_index": "med:{s3}:name:<workflow name>",
    "metric": "med:m:<kind>:<name>:<bucket>",
    "metric_names": "med:m:series:<kind>",
    "alerts": "med:{alerts}:active",
    # A run's keys are in its own shard; the layout draws them in shard 3.
    "workflow": "med:{s3}:wf:<workflow_id>",
    "tombstone": "med:{s3}:done:<workflow_id>",
    "audit": "med:{s3}:audit:<workflow_id>",
}


def built() -> dict[str, list[str]]:
    keys = Keys("med", 16)
    out: dict[str, list[str]] = {}
    for name, member in inspect.getmembers(Keys):
        if name.startswith("_") or name in ("shard_of", "tag", "prefix", "shards"):
            continue
        if isinstance(member, property):
            value = getattr(keys, name)
        else:
            params = list(inspect.signature(member).parameters)[1:]
            value = getattr(keys, name)(*(SAMPLES[p] for p in params))
        out[name] = [value] if isinstance(value, str) else list(value)
    return out


def test_every_key_the_builders_make_is_in_the_documented_layout() -> None:
    layout = module.__doc__ or ""
    missing = {
        name: key
        for name, made in built().items()
        for key in ([GENERAL[name]] if name in GENERAL else made)
        if key not in layout
    }
    assert missing == {}, "list these in mediator/storage/keys.py's docstring"
