"""fakeredis's Lua, made as quick as Redis's for the simulation's thousands of seeds.

fakeredis compiles a script's source again on every call, runs a full Lua garbage
collection after it and scans the Lua globals before and after every ``redis.call``
(Redis compiles a script once per SHA and rejects scripts that set globals when they are
loaded). Inside `compiled_scripts` each source is compiled once and the per-call sweeps
are skipped: the scripts run the same, a good deal faster. That scripts set no globals is
checked where it matters: every integration test runs them on a real Valkey.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from fakeredis.commands_mixins import scripting_mixin

__all__ = ["compiled_scripts"]

_COLLECT = {"collectgarbage()", b"collectgarbage()"}


class _CompilingRuntime:
    """A LuaRuntime that compiles each source once (and leaves collection to Lua)."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime
        self._compiled: dict[Any, Any] = {}

    def execute(self, source: Any) -> Any:
        if source in _COLLECT:
            return None
        function = self._compiled.get(source)
        if function is None:
            function = self._compiled[source] = self._runtime.compile(source)
        return function()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)


@contextlib.contextmanager
def compiled_scripts() -> Iterator[None]:
    """Within the block, fakeredis servers run their Lua as described above."""
    mixin = scripting_mixin.ScriptingCommandsMixin
    original_runtime = mixin._get_server_runtime
    original_check = scripting_mixin._check_for_lua_globals

    def runtime(self: Any, server: Any) -> Any:
        found = original_runtime(self, server)
        if not isinstance(found, _CompilingRuntime):
            found = server._lua_runtime = _CompilingRuntime(found)
        return found

    mixin._get_server_runtime = runtime  # type: ignore[method-assign]
    scripting_mixin._check_for_lua_globals = lambda *args: None
    try:
        yield
    finally:
        mixin._get_server_runtime = original_runtime  # type: ignore[method-assign]
        scripting_mixin._check_for_lua_globals = original_check
