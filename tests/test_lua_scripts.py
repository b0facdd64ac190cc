"""The Lua scripts as loaded: includes expanded, Redis's clock read in one place only."""

from __future__ import annotations

import importlib.resources
import re

import pytest
from lupa import lua51

from mediator.storage.connection import lua_source

SCRIPTS = sorted(
    path.name
    for path in importlib.resources.files("mediator.storage").joinpath("lua").iterdir()
    if path.name.endswith(".lua")
)
INCLUDE = re.compile(r'^--- @include "([^"]+)"', re.MULTILINE)
READS_TIME = re.compile(r"""redis\.p?call\(\s*['"]TIME['"]""", re.IGNORECASE)


def raw(name: str) -> str:
    return importlib.resources.files("mediator.storage").joinpath(f"lua/{name}").read_text()


def test_only_the_prelude_reads_the_redis_clock() -> None:
    reading = [name for name in SCRIPTS if READS_TIME.search(raw(name))]
    assert reading == ["prelude.lua"], "read Redis's clock with server_ms() from the prelude"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_include_resolves_and_the_result_compiles(name: str) -> None:
    for included in INCLUDE.findall(raw(name)):
        assert f"{included}.lua" in SCRIPTS, f"{name} includes {included!r}, not a script"
    source = lua_source(name)
    assert not INCLUDE.search(source)
    if "= server_ms()" in source:
        assert source.index("local function server_ms()") < source.index("= server_ms()")
    lua51.LuaRuntime().compile(source)  # Redis's Lua is 5.1: a syntax error fails here


def test_the_clock_is_read_where_it_was_and_redis_runs_the_included_text() -> None:
    """`lua_source` keeps the including script's own lines in place; the SHA redis-py
    registers is that of the expanded text."""
    source = lua_source("claim.lua")
    assert source.startswith("-- Claim outbox entries")
    assert "local now = server_ms()\nlocal lease = now + tonumber(ARGV[1])" in source
