"""Generate the reference pages under ``docs/reference/`` from their sources.

Each page is a pure function of the code it documents, so it cannot drift:
``tests/test_docs.py`` renders every page in memory and compares it with the file.

- ``settings.md``: the settings schema (`mediator.settings.Settings`): every field's path,
  type, default and description;
- ``cli.md``: the ``mediator`` command tree, read from the Typer application as Click sees it;
- ``events.md``: the wire contract, from the event models' JSON Schemas (`topics.events`).

Run ``python docs/gen.py`` to rewrite the pages, ``python docs/gen.py --check`` to list the
stale ones (exit code 1).
"""

from __future__ import annotations

import json
import re
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
REFERENCE = DOCS / "reference"
COMMAND = "python docs/gen.py"

Link = Callable[[str], str]


def _banner(source: str) -> str:
    return f"<!-- Generated from {source} by docs/gen.py. Do not edit: run `{COMMAND}`. -->\n"


def _cell(text: str) -> str:
    """Text fit for one cell of a Markdown table: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(value: Any) -> str:
    return f"`{json.dumps(value, ensure_ascii=False)}`"


# -- JSON Schema, read as a reader of the docs wants it -------------------------------------


class Schema:
    """One model's JSON Schema, with its ``$defs`` resolved on demand."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.defs: dict[str, dict[str, Any]] = root.get("$defs", {})

    def target(self, node: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """The definition `node` refers to (its name), or `node` itself."""
        name = None
        while "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            node = self.defs[name]
        return name, node

    def model(self, node: dict[str, Any]) -> str | None:
        """The name of the model `node` is (or refers to); None for anything else."""
        name, target = self.target(node)
        return name if name is not None and "properties" in target else None

    def type_of(self, node: dict[str, Any], link: Link) -> str:
        """`node`'s type in words, with its constraints."""
        if "anyOf" in node:
            parts = [self.type_of(part, link) for part in node["anyOf"]]
            return " or ".join(dict.fromkeys(parts))
        name, target = self.target(node)
        if name is not None and "properties" in target:
            return link(name)
        if "const" in target:
            return _code(target["const"])
        if "enum" in target:
            return " or ".join(_code(value) for value in target["enum"])
        return _with_limits(self._plain(target, link), target)

    def _plain(self, node: dict[str, Any], link: Link) -> str:
        kind = node.get("type")
        if kind == "array":
            if "prefixItems" in node:
                inner = ", ".join(self.type_of(item, link) for item in node["prefixItems"])
                return f"[{inner}]"
            inner = self.type_of(node.get("items", {}), link)
            return f"list of ({inner})" if " or " in inner else f"list of {inner}"
        if kind == "object":
            values = node.get("additionalProperties")
            if isinstance(values, dict) and values:
                inner = self.type_of(values, link)
                return (
                    f"map of string to ({inner})"
                    if " or " in inner
                    else f"map of string to {inner}"
                )
            return "object"
        if kind is None:
            return "any JSON"
        formats = {"path": "path", "password": "secret"}
        return formats.get(node.get("format", ""), str(kind))


def _with_limits(text: str, node: dict[str, Any]) -> str:
    limits = []
    for key, sign in (
        ("minimum", "≥"),
        ("exclusiveMinimum", ">"),
        ("maximum", "≤"),
        ("exclusiveMaximum", "<"),
    ):
        if key in node:
            limits.append(f"{sign} {_number(node[key])}")
    low, high = node.get("minLength"), node.get("maxLength")
    if low is not None and high is not None:
        limits.append(f"{low} to {high} characters")
    elif high is not None:
        limits.append(f"at most {high} characters")
    elif low == 1:
        limits.append("non-empty")
    elif low is not None:
        limits.append(f"at least {low} characters")
    if "maxItems" in node and "prefixItems" not in node:
        limits.append(f"at most {node['maxItems']} items")
    if "pattern" in node:
        limits.append(f"matching `{node['pattern']}`")
    return f"{text} ({', '.join(limits)})" if limits else text


def _number(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,}".replace(",", " ") if abs(value) >= 10_000 else str(value)


def _paragraphs(text: str) -> str:
    """Docstring text as Markdown paragraphs (each on one line)."""
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n") if p.strip()) + "\n"


def _description(node: dict[str, Any]) -> str:
    return _cell(node.get("description", ""))


# -- settings ---------------------------------------------------------------------------------


def _python_models(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model class reachable from `model`'s fields, by name (as ``$defs`` names them)."""
    found: dict[str, type[BaseModel]] = {}

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation.__name__ not in found:
                found[annotation.__name__] = annotation
                for field in annotation.model_fields.values():
                    visit(field.annotation)
            return
        for arg in typing.get_args(annotation):
            visit(arg)

    visit(model)
    return found


def _settings_rows(
    schema: Schema,
    classes: dict[str, type[BaseModel]],
    name: str,
    path: str,
    defaults: dict[str, Any] | None,
    only: Callable[[dict[str, Any]], bool] = lambda prop: True,
) -> Iterator[tuple[str, str, str, str]]:
    """Rows (path, type, default, description) of model `name`'s fields under `path`;
    nested settings models are walked into, maps and lists of models too."""
    node = schema.defs[name]
    fields = classes[name].model_fields
    for key, prop in node["properties"].items():
        if not only(prop):
            continue
        where = f"{path}.{key}" if path else key
        nested = schema.model(prop)
        if nested is not None:
            given = prop.get("default", defaults.get(key) if defaults else None)
            yield from _settings_rows(schema, classes, nested, where, given)
            continue
        if "default" in prop:
            default = _code(prop["default"])
        elif defaults is not None and key in defaults:
            default = _code(defaults[key])
        elif key in node.get("required", ()):
            default = "required"
        else:
            value = fields[key].get_default(call_default_factory=True)
            default = _code(to_jsonable_python(value))
        yield where, schema.type_of(prop, _plain_link), default, _description(prop)
        _, target = schema.target(prop)
        values, items = target.get("additionalProperties"), target.get("items")
        if isinstance(values, dict) and (inner := schema.model(values)) is not None:
            yield from _settings_rows(schema, classes, inner, f"{where}.<name>", None)
        elif isinstance(items, dict) and (inner := schema.model(items)) is not None:
            yield from _settings_rows(schema, classes, inner, f"{where}[]", None)


def _plain_link(name: str) -> str:
    return f"`{name}`"


def settings_page() -> str:
    """The configuration reference: one table per settings group."""
    from mediator.settings import Settings

    root = Settings.model_json_schema()
    schema = Schema(root)
    schema.defs.setdefault("Settings", root)
    classes = _python_models(Settings)
    lines = [
        _banner("`mediator.settings.Settings`"),
        "# Settings reference\n",
        "Every setting, as the settings schema defines it. Paths are written as in a YAML "
        "file (`kafka.bootstrap_servers`); in the environment they take the `MEDIATOR_` "
        "prefix and `__` between levels (`MEDIATOR_KAFKA__BOOTSTRAP_SERVERS`). "
        "`<name>` stands for a key of your choosing (a service, an operator, a client), "
        "`[]` for each item of a list. How settings are loaded, and what the important "
        "ones are for: [Configuration](../configuration.md).\n",
        "## Top level\n",
    ]
    if root.get("description"):
        lines.append(_paragraphs(root["description"]))
    lines += _table(
        list(_settings_rows(schema, classes, "Settings", "", None, lambda p: not schema.model(p)))
    )
    for key, prop in root["properties"].items():
        nested = schema.model(prop)
        if nested is None:
            continue
        lines.append(f"## {key}\n")
        if description := schema.defs[nested].get("description", ""):
            lines.append(_paragraphs(description))
        lines += _table(list(_settings_rows(schema, classes, nested, key, prop.get("default"))))
    return "\n".join(lines)


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    out = ["| Setting | Type | Default | Description |", "|---|---|---|---|"]
    out += [f"| `{path}` | {kind} | {default} | {text} |" for path, kind, default, text in rows]
    out.append("")
    return out


# -- the wire contract -----------------------------------------------------------------------


def _model_sections(models: list[type[BaseModel]], heading: str = "##") -> list[str]:
    """One section per model (and per model they use), fields in a table."""
    lines: list[str] = []
    seen: list[str] = []
    queue = [model.__name__ for model in models]
    schemas: dict[str, Schema] = {}
    for model in models:
        schema = Schema(model.model_json_schema())
        schemas[model.__name__] = schema
        for name, node in schema.defs.items():
            if "properties" in node:
                schemas.setdefault(name, schema)
    while queue:
        name = queue.pop(0)
        if name in seen:
            continue
        seen.append(name)
        schema = schemas[name]
        node = schema.root if schema.root.get("title") == name else schema.defs[name]
        lines.append(f"{heading} {name}\n")
        if node.get("description"):
            lines.append(_paragraphs(node["description"]))
        lines.append("| Field | Type | Required | Default | Description |")
        lines.append("|---|---|---|---|---|")
        required = set(node.get("required", ()))
        for key, prop in node["properties"].items():
            kind = schema.type_of(prop, _anchor)
            default = _code(prop["default"]) if "default" in prop else ""
            if not default and key not in required:
                default = _code(_factory_default(models, name, key))
            need = "yes" if key in required else "no"
            lines.append(f"| `{key}` | {kind} | {need} | {default} | {_description(prop)} |")
            queue += [n for n in _models_in(schema, prop) if n not in seen]
        lines.append("")
    return lines


def _models_in(schema: Schema, node: dict[str, Any]) -> list[str]:
    names = []
    for match in re.finditer(r"#/\$defs/(\w+)", json.dumps(node)):
        name = match.group(1)
        if "properties" in schema.defs[name]:
            names.append(name)
    return names


def _factory_default(models: list[type[BaseModel]], name: str, key: str) -> Any:
    for model in models:
        classes = _python_models(model)
        if name in classes:
            value = classes[name].model_fields[key].get_default(call_default_factory=True)
            return to_jsonable_python(value)
    msg = f"model {name!r} is not reachable from the documented models"
    raise LookupError(msg)


def _anchor(name: str) -> str:
    return f"[{name}](#{name.lower()})"


def events_page() -> str:
    """The wire contract: every event model's fields."""
    from topics import events

    order = [
        events.RequestEvent,
        events.CommandEvent,
        events.ReplyEvent,
        events.ResultEvent,
        events.HealthEvent,
        events.MarkEvent,
        events.ControlEvent,
        events.DeadLetter,
        events.AlertEvent,
        events.TransitionEvent,
    ]
    missing = set(events.EVENT_MODELS.values()) - set(order)
    if missing:
        msg = f"events_page does not list {sorted(m.__name__ for m in missing)}; add them"
        raise LookupError(msg)
    lines = [
        _banner("the event models in `topics/events.py`"),
        "# Event reference\n",
        f"Every event on the wire, schema version {events.SCHEMA_VERSION}, as its pydantic "
        "model defines it (`mediator schemas` prints the same as JSON Schema). Every event is "
        "a JSON object; fields that are `null` are left out when published. Unknown fields "
        "are rejected. Topics, keys, headers, signatures and what each field means in "
        "practice: [Wire contract](../wire-contract.md).\n",
    ]
    return "\n".join(lines + _model_sections(order))


# -- the command line -------------------------------------------------------------------------


def cli_page() -> str:
    """The command reference: every command of the ``mediator`` Typer application."""
    import typer

    from mediator.cli import app

    root = typer.main.get_command(app)
    lines = [
        _banner("the Typer application in `mediator/cli/`"),
        "# Command reference\n",
        "Every command of `mediator`, with its arguments and options, as `--help` shows "
        "them. Expected failures print one line, `error: ...`, on stderr and exit with "
        "code 2. What the commands are for: [Command line](../cli.md).\n",
    ]
    lines += _command(root, "mediator", None)
    return "\n".join(lines)


def _command(command: Any, path: str, parent: Any) -> list[str]:
    ctx = type(command).context_class(command, info_name=path.rsplit(" ", 1)[-1], parent=parent)
    level = "#" * (2 + max(path.count(" ") - 1, 0))
    usage = " ".join([path, *command.collect_usage_pieces(ctx)])
    lines = [f"{level} `{path}`\n"]
    lines += [f"```text\n{usage}\n```\n"]
    for paragraph in (command.help or "").split("\n\n"):
        if paragraph.strip():
            lines.append(" ".join(paragraph.split()) + "\n")
    rows = [record for param in command.params if (record := param.get_help_record(ctx))]
    if rows:
        lines += ["| Parameter | Description |", "|---|---|"]
        lines += [f"| `{_cell(names)}` | {_cell(text)} |" for names, text in rows]
        lines.append("")
    if hasattr(command, "list_commands"):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                lines += _command(sub, f"{path} {name}", ctx)
    return lines


# -- all pages --------------------------------------------------------------------------------

PAGES: dict[str, Callable[[], str]] = {
    "settings.md": settings_page,
    "cli.md": cli_page,
    "events.md": events_page,
}


def render() -> dict[Path, str]:
    """Every generated page, by path, as it should be on disk."""
    return {REFERENCE / name: page().rstrip("\n") + "\n" for name, page in PAGES.items()}


def main(argv: list[str]) -> int:
    """Write the pages (or, with ``--check``, list the stale ones)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    check = "--check" in argv
    stale = []
    for path, text in render().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    verb = "stale" if check else "rewritten"
    for path in stale:
        print(f"{verb}: {path}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
