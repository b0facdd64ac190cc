"""The "Your first workflow" page (docs/first-workflow.md), followed to the letter: its
files written as it shows them, its commands run as it says, in three processes, against
`mediator dev`."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import orjson
import pytest

from tests.helpers import wait_for

PAGE = Path(__file__).parent.parent / "docs" / "first-workflow.md"
BLOCK = re.compile(r'```\w+ title="([^"]+)"\n(.*?)```', re.S)


def blocks() -> dict[str, str]:
    return {title: body for title, body in BLOCK.findall(PAGE.read_text())}


def command(line: str) -> list[str]:
    """A command of the page, as this interpreter runs it (``mediator`` and ``python``
    are the ones the virtualenv puts first on the PATH)."""
    words = shlex.split(line)
    if words[0] == "mediator":
        return [sys.executable, "-m", "mediator", *words[1:]]
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    return words


@pytest.mark.slow
async def test_the_first_workflow_page_works_as_written(tmp_path: Path) -> None:
    page = blocks()
    (tmp_path / "signup.yaml").write_text(page["signup.yaml"])
    (tmp_path / "service.py").write_text(page["service.py"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIATOR_")}
    env["PYTHONPATH"] = str(Path(__file__).parent.parent)
    log = (tmp_path / "dev.log").open("wb")

    async def start(line: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *command(line), cwd=tmp_path, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
        )

    dev = await start(page["terminal 1"].strip())
    service = None
    try:

        def up() -> bool:
            return b"mediator up" in (tmp_path / "dev.log").read_bytes()

        await wait_for(up, timeout=120, what="mediator dev to start")
        assert (tmp_path / ".mediator" / "dev.yaml").is_file()
        service = await start(page["terminal 2"].strip())
        submit = await asyncio.create_subprocess_exec(
            *command(page["terminal 3"].strip()),
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(submit.communicate(), 120)
        assert submit.returncode == 0, (err.decode(), (tmp_path / "dev.log").read_text()[-3000:])
        result = orjson.loads(out)
        assert result["status"] == "completed"
        assert result["output"] == {"account": "acc-ada"}
        assert "mediator dev" in err.decode()  # the command says whose settings it used
    finally:
        for process in (service, dev):
            if process is not None and process.returncode is None:
                process.send_signal(signal.SIGINT if process is dev else signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()
                    await process.wait()
        log.close()
    assert not (tmp_path / ".mediator" / "dev.yaml").exists()  # removed when dev stops
