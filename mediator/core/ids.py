"""Run ids: derived from request ids, so a request sent twice finds its run."""

from __future__ import annotations

import hashlib
import re

__all__ = ["RUN_ID", "run_id", "workflow_id_for"]

#: What a run id looks like; anything else given where a run is expected is taken for a
#: request id.
RUN_ID = re.compile(r"wf-[0-9a-f]{20}")


def workflow_id_for(request_id: str) -> str:
    """The workflow id of a request: derived, so a duplicate request finds its workflow."""
    return "wf-" + hashlib.blake2b(request_id.encode(), digest_size=10).hexdigest()


def run_id(run: str) -> str:
    """The run id of `run`, given as a run id or as its request id."""
    return run if RUN_ID.fullmatch(run) else workflow_id_for(run)
