"""Layering rules: the engine and the contract stay free of I/O libraries."""

from __future__ import annotations

import subprocess
import sys

import pytest

IO_LIBRARIES = ("faststream", "aiokafka", "redis")


@pytest.mark.parametrize(
    "module",
    ["mediator.engine", "mediator.workflow", "mediator.state", "mediator.balancer", "topics"],
)
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
