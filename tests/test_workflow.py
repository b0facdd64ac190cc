"""Workflow definitions: validation messages, durations, the compiled plan and the CLI."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mediator.cli.commands import app
from mediator.core.durations import parse_duration_ms
from mediator.core.workflow import (
    StepSpec,
    WorkflowSpec,
    compile_workflow,
    parse_workflows,
    workflow_from_json,
)
from mediator.definitions import Definitions, load_file, load_paths
from mediator.errors import (
    BadDuration,
    BadExpression,
    CyclicDependency,
    DefinitionError,
    DuplicateStep,
    MediatorError,
    UnknownDependency,
    UnknownWorkflow,
)

ORDER_YAML = Path(__file__).resolve().parent.parent / "mediator" / "workflows" / "order.yaml"


def step(step_id: str, *deps: str, **fields: Any) -> dict[str, Any]:
    """A step mapping as written in YAML."""
    return {"id": step_id, "service": "svc", "action": "act", "depends_on": list(deps), **fields}


def workflow(*steps: dict[str, Any], name: str = "wf", **fields: Any) -> dict[str, Any]:
    """A workflow mapping as written in YAML."""
    return {"name": name, "steps": list(steps), **fields}


def compile_one(*steps: dict[str, Any], **fields: Any) -> Any:
    [compiled] = parse_workflows(workflow(*steps, **fields))
    return compiled


# -- graph errors -------------------------------------------------------------------------


def test_unknown_dependency_names_step_dependency_and_known_steps() -> None:
    with pytest.raises(UnknownDependency) as info:
        compile_one(step("pay"), step("ship", "pack"))
    err = info.value
    assert (err.step, err.dependency, err.known) == ("ship", "pack", ["pay", "ship"])
    assert err.workflow == "wf"
    assert str(err) == (
        "<memory>: workflow 'wf': step 'ship' depends on unknown step 'pack'; "
        "known steps: pay, ship"
    )


def test_duplicate_step_id() -> None:
    with pytest.raises(DuplicateStep) as info:
        compile_one(step("pay"), step("ship"), step("pay"))
    assert info.value.step == "pay"
    assert "workflow 'wf'" in str(info.value)
    assert "step id 'pay' is used more than once" in str(info.value)


def test_two_step_cycle_is_printed_as_a_path() -> None:
    with pytest.raises(CyclicDependency) as info:
        compile_one(step("charge", "ship"), step("ship", "charge"))
    assert info.value.cycle == ["charge", "ship", "charge"]
    assert "dependency cycle charge -> ship -> charge;" in str(info.value)
    assert "workflow 'wf'" in str(info.value)


def test_three_step_cycle_follows_depends_on_edges() -> None:
    deps = {"a": ["c"], "b": ["a"], "c": ["b"]}
    with pytest.raises(CyclicDependency) as info:
        compile_one(step("start"), *(step(s, *d) for s, d in deps.items()))
    cycle = info.value.cycle
    assert len(cycle) == 4
    assert cycle[0] == cycle[-1]
    assert set(cycle) == {"a", "b", "c"}
    # Each arrow reads "depends on": the path can be checked against the definition.
    for node, dep in pairwise(cycle):
        assert dep in deps[node]
    assert f"dependency cycle {' -> '.join(cycle)};" in str(info.value)


def test_self_dependency_is_a_cycle() -> None:
    with pytest.raises(CyclicDependency) as info:
        compile_one(step("a"), step("loop", "loop"))
    assert info.value.cycle == ["loop", "loop"]
    assert "dependency cycle loop -> loop;" in str(info.value)


# -- expressions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "where", "expression"),
    [
        ({"input": "payload.["}, "step 'a' input", "payload.["),
        ({"input": {"x": "payload.ok", "y": {"z": "foo[("}}}, "step 'a' input", "foo[("),
        ({"input": {"list": ["payload.ok", "a $ b"]}}, "step 'a' input", "a $ b"),
        ({"when": "payload.flag =="}, "step 'a' when", "payload.flag =="),
        (
            {"compensate": {"action": "undo", "input": {"r": "steps.a.(("}}},
            "step 'a' compensate.input",
            "steps.a.((",
        ),
    ],
)
def test_bad_step_expression_is_named(fields: dict[str, Any], where: str, expression: str) -> None:
    with pytest.raises(BadExpression) as info:
        compile_one(step("a", **fields))
    err = info.value
    assert err.step == "a"
    assert err.expression == expression
    assert f"workflow 'wf': {where}: invalid JMESPath expression {expression!r}: " in str(err)


def test_bad_output_expression_is_named() -> None:
    with pytest.raises(BadExpression) as info:
        compile_one(step("a"), output={"total": "steps.a.[x"})
    err = info.value
    assert err.step is None
    assert err.field == "output"
    assert "workflow 'wf': output: invalid JMESPath expression 'steps.a.[x': " in str(err)


def test_bad_expression_reason_is_one_line() -> None:
    with pytest.raises(BadExpression) as info:
        compile_one(step("a", input="a $ b"))
    assert "\n" not in str(info.value)
    assert "'$'" in str(info.value)
    assert "position 2" in str(info.value)


# -- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "where", "value"),
    [
        ({"timeout": "5 parsecs"}, "step 'a' timeout", "5 parsecs"),
        ({"timeout": 0}, "step 'a' timeout", 0),
        ({"retry": {"backoff": "-1s"}}, "step 'a' retry.backoff", "-1s"),
        ({"retry": {"max_backoff": "soon"}}, "step 'a' retry.max_backoff", "soon"),
    ],
)
def test_bad_step_duration_is_named(fields: dict[str, Any], where: str, value: object) -> None:
    with pytest.raises(BadDuration) as info:
        compile_one(step("a", **fields))
    assert info.value.step == "a"
    assert f"workflow 'wf': {where}: invalid duration" in str(info.value)
    assert "'250ms', '5s', '2m', '1h'" in str(info.value)


@pytest.mark.parametrize("value", ["later", 0, -3, float("inf"), float("nan"), True, "yes"])
def test_bad_workflow_timeout(value: object) -> None:
    with pytest.raises(BadDuration) as info:
        compile_one(step("a"), timeout=value)
    assert info.value.step is None
    assert "workflow 'wf': timeout: invalid duration" in str(info.value)


def test_durations_are_compiled_to_milliseconds() -> None:
    wf = compile_one(
        step("a", timeout="250ms", retry={"max_attempts": 3, "backoff": 0.5, "max_backoff": "2m"}),
        timeout="1h",
    )
    assert wf.timeout_ms == 3_600_000
    a = wf.steps["a"]
    assert a.timeout_ms == 250
    assert (a.retry.max_attempts, a.retry.backoff_ms, a.retry.max_backoff_ms) == (3, 500, 120_000)


@pytest.mark.parametrize(
    ("value", "millis"),
    [
        (1.5, 1500),
        (2, 2000),
        ("250ms", 250),
        ("5s", 5000),
        ("5", 5000),
        (" 1.5 s ", 1500),
        ("2m", 120_000),
        ("1h", 3_600_000),
    ],
)
def test_parse_duration_ms(value: object, millis: int) -> None:
    assert parse_duration_ms(value) == millis


@pytest.mark.parametrize(
    "value",
    [0, -1, 0.0, "0s", "-1s", "abc", "5 days", "1e3", "", True, False, None, [5], 0.0001,
     float("inf"), float("nan"), 10**400, "9" * 400],
)  # fmt: skip
def test_parse_duration_ms_rejects(value: object) -> None:
    assert parse_duration_ms(value) is None


# -- schema errors ------------------------------------------------------------------------


def test_missing_action_names_the_step() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_workflows(workflow({"id": "pay", "service": "svc"}))
    assert str(info.value) == (
        "<memory>: workflow 'wf': step 'pay': `action` required: a step calls a service "
        "(`service` and `action`), runs a workflow (`workflow`) or waits for a signal (`wait`)"
    )


def test_missing_field_of_step_without_id_names_its_index() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_workflows(workflow(step("a"), {"service": "svc", "action": "x"}))
    assert "steps[1] id: Field required" in str(info.value)


def test_unknown_step_field_is_rejected() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_workflows(workflow(step("pay", retries=3)))
    assert "step 'pay' retries: Extra inputs are not permitted" in str(info.value)


def test_unknown_workflow_field_is_rejected() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_workflows(workflow(step("pay"), parallel=2))
    assert "workflow 'wf': parallel: Extra inputs are not permitted" in str(info.value)


@pytest.mark.parametrize("step_id", ["1a", "a-b", "a.b", "", "a b"])
def test_step_id_pattern(step_id: str) -> None:
    with pytest.raises(DefinitionError) as info:
        parse_workflows(workflow(step(step_id)))
    assert "id: String should match pattern" in str(info.value)


@pytest.mark.parametrize("step_id", ["a", "_x", "Step_2"])
def test_step_id_pattern_accepts_identifiers(step_id: str) -> None:
    assert list(compile_one(step(step_id)).steps) == [step_id]


def test_workflow_needs_steps() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_workflows(workflow())
    assert "steps: List should have at least 1 item" in str(info.value)


def test_definition_errors_share_the_root() -> None:
    for cls in (UnknownDependency, DuplicateStep, CyclicDependency, BadExpression, BadDuration):
        assert issubclass(cls, DefinitionError)
    assert issubclass(DefinitionError, MediatorError)
    assert issubclass(UnknownWorkflow, MediatorError)


# -- documents and files ------------------------------------------------------------------


def test_document_formats() -> None:
    one, two = workflow(step("a"), name="one"), workflow(step("b"), name="two")
    assert [w.name for w in parse_workflows(one)] == ["one"]
    assert [w.name for w in parse_workflows([one, two])] == ["one", "two"]
    assert [w.name for w in parse_workflows({"workflows": [one, two]})] == ["one", "two"]


@pytest.mark.parametrize("document", [[workflow(step("a")), 5], None, "text"])
def test_non_mapping_entry_is_an_error(document: Any) -> None:
    with pytest.raises(DefinitionError) as info:
        parse_workflows(document, source="defs.yaml")
    assert str(info.value).startswith("defs.yaml: entry ")
    assert "expected a workflow mapping" in str(info.value)


def test_load_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(workflow(step("a", "nope"))))
    with pytest.raises(UnknownDependency) as info:
        load_file(path)
    assert info.value.source == str(path)
    assert info.value.dependency == "nope"
    assert str(info.value).startswith(f"{path}: workflow 'wf': step 'a' depends on unknown step")


def test_load_file_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: [\nsteps:\n  - id: a\n")
    with pytest.raises(DefinitionError) as info:
        load_file(path)
    assert str(info.value).startswith(f"{path}: not valid YAML: ")
    assert "\n" not in str(info.value)


def test_load_file_non_mapping_document(tmp_path: Path) -> None:
    path = tmp_path / "scalar.yaml"
    path.write_text("just a string\n")
    with pytest.raises(DefinitionError) as info:
        load_file(path)
    assert str(info.value) == f"{path}: entry 0 is a str, expected a workflow mapping"


def test_load_file_missing_and_binary(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError) as info:
        load_file(tmp_path / "absent.yaml")
    assert str(info.value).startswith(f"{tmp_path / 'absent.yaml'}: cannot read: ")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DefinitionError) as info:
        load_file(binary)
    assert str(info.value).startswith(f"{binary}: not UTF-8 text: ")


def test_load_paths_reads_directories(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(workflow(step("x"), name="alpha")))
    (tmp_path / "b.yml").write_text(
        yaml.safe_dump({"workflows": [workflow(step("y"), name="beta", version=2)]})
    )
    (tmp_path / "notes.txt").write_text("not a workflow")
    definitions = load_paths([tmp_path])
    assert len(definitions) == 2
    assert sorted(definitions.names()) == ["alpha", "beta"]
    assert definitions.get("beta").version == 2


def test_shipped_order_workflow_loads() -> None:
    [order] = load_file(ORDER_YAML)
    assert order.key == "order@2"
    assert order.roots == ("screen", "reserve")
    assert order.steps["approve"].depends_on == ("screen", "reserve")
    assert order.steps["approve"].wait == "approval"
    assert order.steps["charge"].depends_on == ("approve",)
    assert order.dependants["ship"] == ("notify_sms", "notify_email")
    assert order.timeout_ms == 60_000
    assert order.max_parallel == 4
    assert order.steps["notify_sms"].when is not None
    reserve = order.steps["reserve"]
    assert reserve.retry.max_attempts == 3
    assert reserve.compensate is not None
    assert (reserve.compensate.service, reserve.compensate.action) == ("inventory", "release")


# -- definitions registry -----------------------------------------------------------------


def test_definitions_latest_version_and_exact_version() -> None:
    v1, v3, v2 = (compile_one(step("a"), name="pay", version=v) for v in (1, 3, 2))
    other = compile_one(step("a"), name="ship")
    definitions = Definitions([v1, v3, v2, other])
    assert len(definitions) == 4
    assert definitions.get("pay") is v3
    assert definitions.get("pay", 1) is v1
    assert definitions.get("pay", 2) is v2
    assert sorted(definitions.names()) == ["pay", "ship"]
    assert sorted(w.key for w in definitions) == ["pay@1", "pay@2", "pay@3", "ship@1"]


def test_definitions_duplicate_name_and_version() -> None:
    definitions = Definitions([compile_one(step("a"), name="pay", version=2)])
    with pytest.raises(DefinitionError) as info:
        definitions.add(compile_one(step("b"), name="pay", version=2), source="more.yaml")
    assert str(info.value) == (
        "more.yaml: workflow 'pay': version 2 is defined twice; bump `version` to change it"
    )
    assert definitions.get("pay").steps.keys() == {"a"}


def test_unknown_workflow_lists_loaded_workflows() -> None:
    definitions = Definitions([compile_one(step("a"), name=n) for n in ("ship", "pay")])
    with pytest.raises(UnknownWorkflow) as info:
        definitions.get("refund")
    assert str(info.value) == "unknown workflow 'refund'; loaded workflows: pay, ship"
    with pytest.raises(UnknownWorkflow) as info:
        definitions.get("pay", 7)
    assert str(info.value) == "unknown workflow 'pay' version 7; loaded workflows: pay, ship"
    with pytest.raises(UnknownWorkflow) as info:
        Definitions().get("pay")
    assert str(info.value).endswith("loaded workflows: (none)")


# -- the compiled plan --------------------------------------------------------------------


def test_fan_out_fan_in_plan() -> None:
    wf = compile_one(
        step("start"),
        step("left", "start"),
        step("right", "start"),
        step("middle", "start"),
        step("join", "left", "right", "middle"),
        step("other"),
    )
    order = wf.order
    assert sorted(order) == sorted(wf.steps)
    for step_id, compiled in wf.steps.items():
        for dep in compiled.depends_on:
            assert order.index(dep) < order.index(step_id)
    assert set(wf.roots) == {"start", "other"}
    assert set(wf.dependants["start"]) == {"left", "right", "middle"}
    assert wf.dependants["left"] == ("join",)
    assert wf.dependants["join"] == ()
    assert wf.dependants["other"] == ()
    assert wf.key == "wf@1"


def test_compile_spec_objects_and_defaults() -> None:
    spec = WorkflowSpec(
        name="py",
        version=4,
        steps=[StepSpec(id="a", service="svc", action="x")],
    )
    wf = compile_workflow(spec)
    a = wf.steps["a"]
    assert (wf.key, wf.max_parallel, wf.timeout_ms, wf.output) == ("py@4", 0, None, None)
    assert (a.timeout_ms, a.when, a.compensate) == (None, None, None)
    assert (a.retry.max_attempts, a.retry.backoff_ms, a.retry.max_backoff_ms) == (1, 200, 30_000)
    # The default input is the whole payload.
    assert a.input.render({"payload": {"k": 1}}) == {"k": 1}


def test_compensation_defaults_to_the_step_service_and_payload() -> None:
    wf = compile_one(step("a", compensate={"action": "undo"}))
    compensation = wf.steps["a"].compensate
    assert compensation is not None
    assert (compensation.service, compensation.action) == ("svc", "undo")
    assert compensation.input.render({"payload": {"p": 2}}) == {"p": 2}


# -- canonical JSON, content hash and rebuilding -----------------------------------------


def test_the_plan_keeps_its_definition_as_canonical_json() -> None:
    wf = compile_one(step("b", timeout="2s"), step("a"), description="d")
    assert wf.spec_json == (
        b'{"description":"d","name":"wf","steps":['
        b'{"action":"act","depends_on":[],"id":"b","service":"svc","timeout":"2s"},'
        b'{"action":"act","depends_on":[],"id":"a","service":"svc"}]}'
    )
    assert len(wf.content_hash) == 32
    assert "spec_json" not in repr(wf)


def test_the_hash_follows_content_not_layout() -> None:
    base = compile_one(step("a"), step("b", "a"))
    [reordered] = parse_workflows(
        {"steps": [step("a"), dict(reversed(step("b", "a").items()))], "name": "wf"}
    )
    assert reordered.content_hash == base.content_hash
    for changed in (
        compile_one(step("a"), step("b", "a", timeout="1s")),
        compile_one(step("b"), step("a")),  # order breaks ties between ready steps
        compile_one(step("a"), step("b", "a"), description="now documented"),
    ):
        assert changed.content_hash != base.content_hash


def test_workflow_from_json_rebuilds_the_plan() -> None:
    [order] = load_file(ORDER_YAML)
    rebuilt = workflow_from_json(order.spec_json)
    assert rebuilt == order
    assert (rebuilt.spec_json, rebuilt.content_hash) == (order.spec_json, order.content_hash)
    assert rebuilt.steps["reserve"].compensate == order.steps["reserve"].compensate


def test_spec_objects_round_trip_too() -> None:
    spec = WorkflowSpec(
        name="py",
        version=2,
        timeout=5,
        steps=[StepSpec(id="a", service="svc", action="x", retry={"multiplier": 3})],
    )
    wf = compile_workflow(spec)
    assert b'"version":2' in wf.spec_json and b"max_attempts" not in wf.spec_json
    rebuilt = workflow_from_json(wf.spec_json)
    assert rebuilt == wf and rebuilt.content_hash == wf.content_hash
    assert (rebuilt.timeout_ms, rebuilt.steps["a"].retry.multiplier) == (5_000, 3.0)


def test_a_1000_step_plan_hashes_once() -> None:
    steps = [step(f"s{i}", *([f"s{i - 1}"] if i else [])) for i in range(1000)]
    wf = compile_one(*steps)
    assert workflow_from_json(wf.spec_json).order == wf.order


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"{", "<json>: not valid JSON: "),
        (b"[1]", "<json>: a JSON list, expected one workflow object"),
        (b'{"name": "wf", "steps": []}', "<json>: workflow 'wf': steps: "),
        (
            b'{"name": "wf", "steps": [{"id": "a", "service": "s", "action": "x",'
            b' "depends_on": ["z"]}]}',
            "<json>: workflow 'wf': step 'a' depends on unknown step 'z'",
        ),
    ],
)
def test_workflow_from_json_rejects_bad_data(data: bytes, expected: str) -> None:
    with pytest.raises(DefinitionError) as info:
        workflow_from_json(data)
    assert str(info.value).startswith(expected)


def test_values_json_cannot_hold_are_refused() -> None:
    with pytest.raises(DefinitionError, match="cannot be stored as JSON"):
        compile_one(step("a", input={"big": 2**70}))
    # Non-string keys are written as strings, as the template compiles them.
    wf = compile_one(step("a", input={1: "payload.x"}))
    assert b'"input":{"1":"payload.x"}' in wf.spec_json


# -- the validate command -----------------------------------------------------------------


def test_cli_validate_ok(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(workflow(step("a"), step("b", "a"), name="good", version=3)))
    result = CliRunner().invoke(app, ["validate", str(path), str(ORDER_YAML)])
    assert result.exit_code == 0, result.output
    assert f"ok: {path}: good@3 (2 steps)" in result.stdout
    assert f"ok: {ORDER_YAML}: order@2 (7 steps)" in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (yaml.safe_dump(workflow(step("a", "ghost"))), "depends on unknown step 'ghost'"),
        ("name: [\n", "not valid YAML"),
        (yaml.safe_dump(workflow(step("a"), timeout=True)), "timeout: invalid duration True"),
    ],
    ids=["unknown-dependency", "bad-yaml", "bool-timeout"],
)
def test_cli_validate_invalid(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {path}:")
    assert expected in lines[0]
    assert "ok:" not in result.stdout


def test_cli_validate_reports_every_problem_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "workflows:\n"
        "  - name: one\n"
        "    steps:\n"
        "      - {id: a, service: s, action: x, timeout: soon}\n"
        "      - {id: b, service: s, action: y, depends_on: [ghost]}\n"
        "  - name: two\n"
        "    steps:\n"
        "      - id: c\n"
        "        service: s\n"
        "        action: z\n"
        "        retry: {max_attempts: 0}\n"
        "  - name: fine\n"
        "    steps: [{id: d, service: s, action: d}]\n"
    )
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: {path}:4: workflow 'one': step 'a' timeout: invalid duration 'soon'; use "
        "seconds (e.g. 1.5) or a string such as '250ms', '5s', '2m', '1h'",
        f"error: {path}:5: workflow 'one': step 'b' depends on unknown step 'ghost'; known "
        "steps: a, b",
        f"error: {path}:11: workflow 'two': step 'c' retry.max_attempts: Input should be "
        "greater than or equal to 1",
        "3 problems found",
    ]
    assert result.stdout.splitlines() == [f"ok: {path}: fine@1 (1 step)"]
