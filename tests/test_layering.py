"""Layering rules: the core and the contract stay free of I/O libraries, and each layer of
`mediator/` imports only the layers below it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
IO_LIBRARIES = ("faststream", "aiokafka", "redis")


CORE = sorted(
    f"mediator.core.{path.stem}"
    for path in (Path(__file__).parent.parent / "mediator" / "core").glob("*.py")
    if path.stem != "__init__"
)

#: What each layer may import from `mediator` (besides the top-level modules: errors,
#: settings, codec, clock, producers, definitions; but never `mediator.replica`, the
#: wiring above them all, which only the command line may start).
ALLOWED = {
    "core": {"core"},
    "storage": {"core", "storage"},
    "runtime": {"core", "storage", "runtime"},
    "sdk": {"core", "sdk"},
    "ops": {"core", "storage", "sdk", "ops"},
    "cli": {"core", "storage", "runtime", "sdk", "ops", "cli"},
}


@pytest.mark.parametrize("module", [*CORE, "mediator.core", "topics"])
def test_pure_modules_import_no_io_library(module: str) -> None:
    # A fresh interpreter, so modules imported by other tests do not hide the answer.
    code = (
        f"import sys, {module}; "
        f"print(','.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(IO_LIBRARIES)!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"


def test_topics_imports_only_pydantic_and_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules); import topics; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "third = {m for m in new if m not in sys.stdlib_module_names and not m.startswith('_')}; "
        "print(','.join(sorted(third)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert set(filter(None, out.stdout.strip().split(","))) <= {
        "topics",
        "pydantic",
        "pydantic_core",
        "typing_extensions",
        "typing_inspection",
        "annotated_types",
    }


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    folder = Path(__file__).parent.parent / "mediator" / layer
    wrong = []
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "mediator" and len(parts) > 2 and parts[1] not in ALLOWED[layer]:
                    wrong.append(f"{path.name}: {name}")
                if name == "mediator.replica" and layer != "cli":
                    wrong.append(f"{path.name}: {name}")
    assert wrong == [], f"mediator.{layer} reaches up into {wrong}"


def test_every_public_exception_is_a_mediator_error_and_in_the_tree() -> None:
    """Callers catch the family at once: every exception the package defines (private ones
    aside) derives from `MediatorError`, and `mediator.errors`' docstring draws it."""
    import importlib
    import inspect
    import pkgutil

    import mediator
    from mediator import errors

    found = {}
    for info in pkgutil.walk_packages(mediator.__path__, "mediator."):
        if info.name.startswith("mediator.cli") or info.name == "mediator.__main__":
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            defined_here = inspect.isclass(value) and value.__module__ == info.name
            if defined_here and issubclass(value, BaseException) and not name.startswith("_"):
                found[name] = value
    outside = sorted(n for n, cls in found.items() if not issubclass(cls, errors.MediatorError))
    assert outside == []
    undrawn = sorted(n for n in found if n not in (errors.__doc__ or ""))
    assert undrawn == []


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_topics_and_handlers_keep_their_places() -> None:
    """`topics` (the wire contract) imports neither `mediator` nor `handlers`; `handlers`
    (what the replica subscribes to and publishes) reaches down into `mediator` and
    `topics` but never up into the replica's wiring; and nothing in `mediator` imports
    `handlers` but that wiring (`mediator/replica.py`), which sits above both."""
    root = Path(__file__).parent.parent
    wrong = []
    for path in (root / "topics").rglob("*.py"):
        found = [m for m in _imports(path) if m.split(".")[0] in ("mediator", "handlers")]
        wrong += [f"{path.name}: {m}" for m in found]
    for path in (root / "handlers").rglob("*.py"):
        found = [m for m in _imports(path) if m in ("mediator", "mediator.replica")]
        wrong += [f"handlers/{path.name}: {m}" for m in found]
    for path in root.joinpath("mediator").rglob("*.py"):
        if path.relative_to(root).as_posix() == "mediator/replica.py":
            continue  # the wiring, above runtime and handlers
        found = [m for m in _imports(path) if m.split(".")[0] == "handlers"]
        wrong += [f"{path.relative_to(root)}: {m}" for m in found]
    assert wrong == []


def test_the_runtime_reaches_redis_only_through_storage() -> None:
    """Every Redis call is in `mediator/storage/`, where `redis_errors` sorts its failures:
    runtime modules name the client's type to pass it on, and import nothing else of
    redis-py (no scripts, no exceptions, no calls of their own)."""
    found = []
    for path in sorted((ROOT / "mediator" / "runtime").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("redis"):
                names = {alias.name for alias in node.names}
                if node.module != "redis.asyncio" or names - {"Redis"}:
                    found.append(f"{path.name}: from {node.module} import {sorted(names)}")
            elif isinstance(node, ast.Import):
                found += [f"{path.name}: import {a.name}" for a in node.names
                          if a.name.split(".")[0] == "redis"]  # fmt: skip
            elif isinstance(node, ast.Attribute) and node.attr in ("pipeline", "register_script"):
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert found == []


def test_no_test_module_imports_another() -> None:
    """Helpers live in `tests/helpers.py` and `tests/engine_harness.py`, fixtures in
    `tests/conftest.py`: a test module that imports another couples the two, and a helper
    in a test module is found by nobody looking for it."""
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                modules = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            ours = [m for m in modules if m.startswith((".", "tests."))]
            if any(m.rsplit(".", 1)[-1].startswith("test_") for m in ours):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
