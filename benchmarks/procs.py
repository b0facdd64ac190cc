"""Child processes of the suite (services, mediator replicas, Celery workers).

Each child runs in its own session, so stopping it reaches its whole process group (Celery's
prefork pool included), and the kernel kills it if the suite itself dies. A child may speak
a line protocol on stdin/stdout (see `benchmarks.hosts`); its stderr goes to a log file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Child", "ChildFailed"]

_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


class ChildFailed(RuntimeError):
    """A child process exited or did not answer in time; the message quotes its log."""


def _die_with_parent() -> None:
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    """One child process: ``python ARGS`` by default, or any program (``program=``)."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        workdir: Path,
        *,
        program: str = sys.executable,
        env: dict[str, str] | None = None,
        protocol: bool = True,
    ) -> None:
        self.name = name
        self.argv = [program, *args]
        self.log = workdir / f"{name}.log"
        root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(env or {})}
        self.protocol = protocol
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, ready_timeout_s: float = 30.0) -> None:
        """Launch; with the line protocol, wait until the child prints ``ready``."""
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=subprocess.PIPE if self.protocol else subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.protocol else log,
                stderr=log,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent if _LIBC is not None else None,
            )
        if self.protocol:
            try:
                line = await self._read_line(ready_timeout_s)
            except BaseException:
                await self.stop()
                raise
            if line != "ready":
                await self.stop()
                msg = f"said {line!r} instead of 'ready'"
                raise self._failed(msg)

    async def ask(self, command: str, timeout_s: float = 10.0) -> str:
        """Send one command line and return the child's one-line answer."""
        if self.process is None or self.process.stdin is None:
            msg = "is not running"
            raise self._failed(msg)
        self.process.stdin.write(command.encode() + b"\n")
        await self.process.stdin.drain()
        return await self._read_line(timeout_s)

    async def _read_line(self, timeout_s: float) -> str:
        assert self.process is not None and self.process.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                raw = await self.process.stdout.readline()
        except TimeoutError:
            msg = f"did not answer within {timeout_s}s"
            raise self._failed(msg) from None
        if not raw:
            msg = "exited"
            raise self._failed(msg)
        return raw.decode().strip()

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self.process is not None and self.process.returncode is None

    async def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the process group, then SIGKILL after ``timeout_s``; returns the exit code."""
        process = self.process
        if process is None:
            return None
        try:
            if process.returncode is None:
                self._signal_group(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), timeout_s)
                except TimeoutError:
                    self._signal_group(signal.SIGKILL)
                    await process.wait()
        except BaseException:
            self._signal_group(signal.SIGKILL)
            raise
        finally:
            # Children of the child (a prefork pool) may outlive a clean exit of the leader.
            self._signal_group(signal.SIGKILL)
            if process.stdin is not None:
                process.stdin.close()
        return process.returncode

    async def kill(self) -> None:
        """SIGKILL the process group, as a crash would, and reap it."""
        self._signal_group(signal.SIGKILL)
        if self.process is not None:
            await self.process.wait()

    def _signal_group(self, signum: signal.Signals) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signum)

    def log_tail(self, lines: int = 20) -> str:
        """The end of what the child wrote to its log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _failed(self, what: str) -> ChildFailed:
        return ChildFailed(f"{self.name} {what}; end of its log:\n{self.log_tail() or '(empty)'}")
