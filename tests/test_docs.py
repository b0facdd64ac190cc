"""The documentation against the code: generated reference pages are current, hand-written
pages name only what exists (and every key, event field and definition field there is),
the README stays short, and every relative link resolves. No servers: fast."""

from __future__ import annotations

import importlib.util
import inspect
import re
import unicodedata
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REGENERATE = "run `python docs/gen.py` and commit the pages it rewrites"


def _load_gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_gen", DOCS / "gen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load_gen()


# -- generated pages ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GEN.PAGES))
def test_generated_page_is_current(name: str) -> None:
    path = GEN.REFERENCE / name
    expected = GEN.render()[path]
    assert path.exists(), f"docs/reference/{name} is missing: {REGENERATE}"
    assert path.read_text() == expected, f"docs/reference/{name} is stale: {REGENERATE}"


# -- the README ---------------------------------------------------------------------------


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines < 300, f"README.md has {lines} lines; move detail to docs/ (keep it < 300)"


def test_readme_keeps_the_two_setup_commands() -> None:
    # .ci/run runs the second one verbatim.
    readme = (ROOT / "README.md").read_text()
    assert "two commands do all the setup" in " ".join(readme.split())
    assert "python -m pip install -e '.[dev]' && mediator dev --requests 40" in readme
    assert "python -m pip install -e '.[dev]' && python -m pytest -q" in readme


# -- links --------------------------------------------------------------------------------

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
_SNIPPET = re.compile(r'^--8<-- "([^"]+)"', re.M)


def _markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "compose" / "README.md", ROOT / "benchmarks" / "README.md"]
    return files + sorted(DOCS.rglob("*.md"))


def _prose(text: str) -> str:
    """`text` without fenced blocks and code spans, where a link is not a link."""
    return _CODE.sub("", _FENCE.sub("", text))


def _slugs(text: str) -> set[str]:
    """Anchors of the headings in `text`, as MkDocs (Python-Markdown's toc) and GitHub
    make them."""
    slugs: set[str] = set()
    seen: dict[str, int] = {}
    for line in _FENCE.sub("", text).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match is None:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).replace("`", "")
        ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
        toc = re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", ascii_title).strip().lower())
        count = seen.get(toc, 0)
        seen[toc] = count + 1
        slugs.add(toc if count == 0 else f"{toc}_{count}")
        slugs.add(re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-"))
    return slugs


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    text = path.read_text()
    broken = []
    for target in _LINK.findall(_prose(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # http:, https:, mailto:
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _slugs(linked.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    for included in _SNIPPET.findall(text):
        if not (ROOT / included).exists():
            broken.append(f"snippet {included}: no such file")
    assert broken == [], f"{path.relative_to(ROOT)} has broken links: {broken}"


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(node: Any) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [page for item in node for page in pages(item)]
        if isinstance(node, dict):
            return [page for value in node.values() for page in pages(value)]
        return []

    listed = set(pages(config["nav"]))
    present = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert listed == present, (
        f"mkdocs.yml nav and docs/ differ: not in the nav {sorted(present - listed)}, "
        f"no such page {sorted(listed - present)}"
    )


# -- hand-written pages against the code --------------------------------------------------


def _sections(text: str) -> dict[str, str]:
    """Level-2 sections of a page by heading."""
    parts = re.split(r"^## (.+)$", _FENCE.sub("", text), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _first_column(section: str) -> list[str]:
    """The names in backticks in the first cell of every table row of `section`."""
    names = []
    for line in section.splitlines():
        match = re.match(r"^\| (.*?) \|", line)
        if match and not line.startswith("|---"):
            names += re.findall(r"`([^`]+)`", match.group(1))
    return names


def _first_table(section: str) -> str:
    """The first table of `section` (the one that lists a model's fields)."""
    match = re.search(r"^\|.*?(?=^[^|]|\Z)", section, flags=re.M | re.S)
    return match.group(0) if match else ""


def test_key_layout_names_every_key() -> None:
    from mediator.storage.keys import Keys

    class Patterns(Keys):
        def tag(self, shard: int) -> str:
            return f"{self.prefix}:{{sN}}"

    placeholders: dict[str, list[Any]] = {
        "what": ["active", "history", "lease"],  # `Keys.alerts`: its docstring names them
    }
    keys = Patterns("med", 16)
    patterns = []
    for name, member in inspect.getmembers(Keys):
        if name.startswith("_") or name in ("shard_of", "tag", "prefix", "shards"):
            continue
        if isinstance(member, property):
            patterns.append(getattr(keys, name))
            continue
        if not callable(member):
            continue
        params = [p for p in inspect.signature(member).parameters if p != "self"]
        calls: list[list[Any]] = [[]]
        for param in params:
            values = placeholders.get(param, [0 if param == "shard" else f"<{param}>"])
            calls = [[*call, value] for call in calls for value in values]
        for call in calls:
            built = getattr(keys, name)(*call)
            patterns += list(built) if isinstance(built, tuple) else [built]
    page = (DOCS / "redis-keys.md").read_text()
    missing = sorted(p for p in patterns if f"`{p}`" not in page)
    assert missing == [], (
        f"docs/redis-keys.md does not describe these keys of mediator/storage/keys.py: "
        f"{missing}; add a row for each"
    )


def _fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def _check_tables(page: str, models: dict[str, type[BaseModel]]) -> None:
    text = (DOCS / page).read_text()
    problems = []
    documented = set()
    for heading, section in _sections(text).items():
        names = re.findall(r"`?(\w+)`?", heading)
        model_name = next((n for n in names if n in models), None)
        if model_name is None:
            continue
        documented.add(model_name)
        listed = set(_first_column(_first_table(section)))
        fields = _fields(models[model_name])
        if listed != fields:
            problems.append(
                f"{model_name}: not described {sorted(fields - listed)}, "
                f"no such field {sorted(listed - fields)}"
            )
    missing = sorted(set(models) - documented)
    assert problems == [] and missing == [], (
        f"docs/{page} does not match the models: {problems}; no section for {missing}"
    )


def test_wire_contract_describes_every_event_field() -> None:
    from topics.events import EVENT_MODELS

    _check_tables("wire-contract.md", dict(EVENT_MODELS))


def test_workflow_language_describes_every_definition_field() -> None:
    from mediator.core import workflow

    specs = ("WorkflowSpec", "StepSpec", "RetrySpec", "CompensateSpec", "FallbackSpec")
    _check_tables("workflows.md", {name: getattr(workflow, name) for name in specs})


def test_configuration_names_only_real_settings() -> None:
    paths = set(re.findall(r"^\| `([^`]+)` \|", GEN.settings_page(), flags=re.M))
    groups = {path.split(".")[0] for path in paths}
    text = (DOCS / "configuration.md").read_text()
    named = set()
    for section in _sections(text).values():
        named.update(_first_column(section))
    unknown = sorted(name for name in named if name not in paths and name not in groups)
    assert unknown == [], f"docs/configuration.md names settings that do not exist: {unknown}"


def test_command_line_names_only_real_commands() -> None:
    import typer

    from mediator.cli import app

    root = typer.main.get_command(app)
    known = {"mediator"}

    def walk(command: Any, path: str, parent: Any) -> None:
        ctx = type(command).context_class(command, info_name=path.split()[-1], parent=parent)
        for name in getattr(command, "list_commands", lambda _: [])(ctx):
            known.add(f"{path} {name}")
            walk(command.get_command(ctx, name), f"{path} {name}", ctx)

    walk(root, "mediator", None)
    text = (DOCS / "cli.md").read_text()
    named = set()
    for cell in _first_column(text):
        words = [w for w in cell.split() if re.fullmatch(r"[a-z][a-z-]*", w)]
        for size in (3, 2):
            if len(words) >= size and " ".join(words[:size]) in known:
                named.add(" ".join(words[:size]))
                break
        else:
            if words[:1] == ["mediator"]:
                named.add(" ".join(words[:2]))
    unknown = sorted(named - known)
    assert unknown == [], f"docs/cli.md names commands that do not exist: {unknown}"
    leaves = {k for k in known if not any(o.startswith(k + " ") for o in known)} - {"mediator"}
    undescribed = sorted(leaves - named)
    assert undescribed == [], f"docs/cli.md does not list these commands: {undescribed}"
