"""The stage profile's attribution of sampled stacks (benchmarks/stages.py): the innermost
frame naming a stage decides, the event loop only when nothing else does."""

from __future__ import annotations

from benchmarks.stages import STAGES, attribute, classify

RUN = "run (mediator/loops.py:40)"
LOOP = "run (asyncio/runners.py:118)"


def test_the_innermost_named_frame_decides() -> None:
    commit = [LOOP, RUN, "commit_many (mediator/storage/store.py:90)",
              "dumps_step (mediator/core/state.py:300)"]  # fmt: skip
    assert classify(commit) == "commit build and Redis"
    signed = [LOOP, RUN, "apply_reply (mediator/core/engine.py:10)", "digest (hmac.py:5)"]
    assert classify(signed) == "signature"


def test_library_frames_take_the_stage_of_their_caller() -> None:
    # pydantic names no stage: its time belongs to whoever built the model.
    decode = [LOOP, "frame (mediator/runtime/messages.py:20)",
              "model_validate_json (pydantic/main.py:700)"]  # fmt: skip
    assert classify(decode) == "consume and decode"
    # A Redis write goes through asyncio's streams: Redis's, not the event loop's.
    write = [LOOP, "execute (redis/asyncio/client.py:1)", "writelines (asyncio/streams.py:3)"]
    assert classify(write) == "commit build and Redis"


def test_the_event_loop_only_when_nothing_else_names_the_sample() -> None:
    assert classify([LOOP]) == "event loop"
    assert classify(["<module> (somewhere.py:1)"]) == "other"


def test_raw_output_is_counted_per_stage_and_per_innermost_frame() -> None:
    raw = "\n".join([
        f"process 1:python;thread (0x1);{LOOP};{RUN};send (mediator/runtime/outbox.py:9) 7",
        f"{LOOP} 3",
        "not a sample line",
    ])  # fmt: skip
    per_stage, leaves = attribute(raw)
    assert set(per_stage) == set(STAGES)
    assert per_stage["outbox encode and produce"] == 7
    assert per_stage["event loop"] == 3
    assert sum(per_stage.values()) == 10
    assert leaves["mediator/runtime/outbox.py:send"] == 7
