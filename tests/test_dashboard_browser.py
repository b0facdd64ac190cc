"""The dashboard in a real browser (headless Chromium from the distribution) against a
running system: each page shows what Redis holds, and its actions take effect.

Set ``MEDIATOR_SCREENSHOTS=<dir>`` to keep a screenshot of each page (the README's)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from mediator.cli.workflows import serve_dashboard
from mediator.core.tasks import cancel_and_wait
from mediator.ops.status import collect_status
from mediator.sdk.worker import ActionError
from mediator.storage.keys import workflow_id_for
from tests.helpers import cli, wait_for
from tests.system import CHAIN3, echo
from topics.events import WorkflowStatus

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)",
)


class Browser:
    """A headless Chromium, driven from a thread (the dashboard serves on this loop)."""

    def __init__(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--window-size=1400,1000",
            "--disable-gpu",
        ):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        self.shots = os.environ.get("MEDIATOR_SCREENSHOTS")
        if self.shots:
            Path(self.shots).mkdir(parents=True, exist_ok=True)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def open(self, url: str) -> None:
        await self.call(self.driver.get, url)

    async def text(self, css: str) -> str:
        """The text of the first element matching `css` ("" while there is none)."""
        from selenium.webdriver.common.by import By

        def read() -> str:
            found = self.driver.find_elements(By.CSS_SELECTOR, css)
            try:
                return found[0].text if found else ""
            except Exception:  # replaced by a refresh while read
                return ""

        return str(await self.call(read))

    async def count(self, css: str) -> int:
        from selenium.webdriver.common.by import By

        return len(await self.call(self.driver.find_elements, By.CSS_SELECTOR, css))

    async def attribute(self, css: str, name: str) -> str | None:
        from selenium.webdriver.common.by import By

        def read() -> str | None:
            found = self.driver.find_elements(By.CSS_SELECTOR, css)
            try:
                return found[0].get_attribute(name) if found else None
            except Exception:
                return None

        return await self.call(read)

    async def attributes(self, css: str, name: str) -> list[str]:
        """Attribute `name` of every element matching `css`, in document order."""
        from selenium.webdriver.common.by import By

        def read() -> list[str]:
            found = self.driver.find_elements(By.CSS_SELECTOR, css)
            return [str(element.get_attribute(name)) for element in found]

        return list(await self.call(read))

    async def confirm(self) -> str:
        """Accept the page's confirmation dialog; its text."""
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        def accept() -> str:
            dialog = WebDriverWait(self.driver, 10).until(expected_conditions.alert_is_present())
            text = str(dialog.text)
            dialog.accept()
            return text

        return str(await self.call(accept))

    async def click(self, css: str) -> None:
        from selenium.webdriver.common.by import By

        await self.call(lambda: self.driver.find_element(By.CSS_SELECTOR, css).click())

    async def shot(self, name: str) -> None:
        if self.shots:
            await self.call(self.driver.save_screenshot, str(Path(self.shots) / f"{name}.png"))

    async def close(self) -> None:
        await self.call(self.driver.quit)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    b = await asyncio.to_thread(Browser)
    try:
        yield b
    finally:
        await b.close()


@asynccontextmanager
async def _dashboard(system: Any) -> AsyncIterator[str]:
    """The dashboard of `system`, served on a free port while the block runs: its URL."""
    urls: list[str] = []
    serving = asyncio.create_task(
        serve_dashboard(system.settings, "127.0.0.1", 0, ready=urls.append)
    )
    try:
        await wait_for(lambda: urls, what="the dashboard to listen")
        yield urls[0]
    finally:
        await cancel_and_wait(serving)


class Flaky:
    """Step ``b`` fails for good while `broken`."""

    def __init__(self) -> None:
        self.broken = True

    async def work(self, data: Any, command: Any) -> dict[str, Any]:
        if self.broken and command.step == "b":
            msg = "card declined"
            raise ActionError(msg, code="declined", retryable=False)
        await asyncio.sleep(0.02)
        return await echo(data, command)


async def test_dashboard_pages_show_redis_and_retry_fixes_failed_runs(
    make_system: Any, browser: Browser
) -> None:
    system = await make_system(CHAIN3)
    flaky = Flaky()
    await system.worker("svc", {"work": flaky.work})
    mediator = await system.mediator()
    client = await system.client()
    failed = [
        await client.submit("chain3", {"n": i}, request_id=f"bad-{i}", timeout=30) for i in range(3)
    ]
    assert all(r.status is WorkflowStatus.FAILED for r in failed)
    flaky.broken = False
    ok = await client.submit("chain3", {"n": 9}, request_id="good", timeout=30)
    assert ok.status is WorkflowStatus.COMPLETED
    await mediator.flusher.flush()

    async with _dashboard(system) as base:
        keys = mediator.store.keys
        status = await collect_status(mediator.redis, keys)
        assert status["counts"]["failed"] == 3

        # Overview: counts as Redis has them.
        await browser.open(base + "#/overview")
        await wait_for(lambda: browser.text("[data-testid=card-failed] .n"), what="overview")
        assert await browser.text("[data-testid=card-failed] .n") == "3"
        assert await browser.text("[data-testid=card-completed] .n") == "1"
        # Failures are not hidden: the recent runs say why each failed, dead letters are
        # counted, and rates are over the seconds that have data, not five minutes.
        assert "card declined" in await browser.text("table[data-testid=runs]")
        assert await browser.text("[data-testid=card-dead-letters] .n") == "0"
        rates = await browser.text("p.muted")
        assert rates.startswith("Rates over the last ") and rates.endswith(" s."), rates
        await browser.shot("overview")

        # Workflows, filtered to the failed ones, with a human time filter and paging.
        await browser.open(base + "#/runs?status=failed&since=1h&limit=2")
        await wait_for(lambda: browser.count("[data-testid=older]"), what="a page of two")
        assert "bad-" in await browser.text("table[data-testid=runs]")  # the request ids
        await browser.click("[data-testid=older]")
        await wait_for(
            lambda: _contains(browser.text("[data-testid=runs-shown]"), "1 run shown"),
            what="the older page",
        )
        await browser.open(base + "#/runs?status=failed")
        await wait_for(
            lambda: _equals(browser.count("table[data-testid=runs] tr[data-wid]"), 3),
            what="three failed runs listed",
        )
        await browser.shot("workflows")

        # One run: its steps and its DAG drawn with their states, its audit log.
        wid = failed[0].workflow_id
        assert wid is not None
        await browser.open(base + f"#/run/{wid}")
        await wait_for(lambda: browser.text("[data-testid=run-id]"), what="the run page")
        assert await browser.attribute("[data-testid=dag-a]", "data-status") == "completed"
        assert await browser.attribute("[data-testid=dag-b]", "data-status") == "failed"
        assert await browser.attribute("[data-testid=dag-c]", "data-status") == "pending"
        assert "card declined" in await browser.text("table[data-testid=steps]")
        audit = await browser.text("table[data-testid=audit]")
        assert "request" in audit and "reply" in audit
        # The timeline: a time axis, every attempt a bar with its duration, and why the
        # failed one failed in its tooltip.
        assert await browser.count("[data-testid=timeline] [data-testid=bar]") == 2
        tip = await browser.attribute("[data-testid=bar][data-label='b #1'] title", "textContent")
        assert tip is not None and "card declined" in tip, tip
        assert "+0 ms" in await browser.attribute("[data-testid=timeline]", "textContent") or ""

        # Retry it: the control goes through Kafka, the run completes, the page follows.
        await browser.click("[data-testid=retry]")
        # The page says what became of the control, as the replica recorded it.
        applied = f"retry {wid}: applied"
        await wait_for(
            lambda: _contains(browser.text("#toast"), applied),
            timeout=15,
            what="the retry's outcome on the page",
        )
        await wait_for(
            lambda: _run_status(mediator, wid, "completed"),
            timeout=30,
            what="the retried run to complete",
        )
        await wait_for(
            lambda: _contains(browser.text("h2"), "completed"),
            timeout=10,
            what="the page to show it completed",
        )
        assert await browser.attribute("[data-testid=dag-c]", "data-status") == "completed"
        assert await browser.count("[data-testid=timeline] [data-testid=mark]") == 1  # retry
        await browser.shot("run")

        # Bulk retry of every failed run left.
        await browser.open(base + "#/runs?status=failed")
        await wait_for(
            lambda: _equals(browser.count("table[data-testid=runs] tr[data-wid]"), 2),
            what="two failed runs left",
        )
        await browser.click("[data-testid=retry-all-failed]")
        assert await browser.confirm() == "Retry 2 failed runs?"  # the count, first
        for other in failed[1:]:
            await wait_for(
                lambda o=other: _run_status(mediator, o.workflow_id, "completed"),
                timeout=30,
                what="bulk-retried runs to complete",
            )
        await wait_for(
            lambda: browser.count("[data-testid=no-runs]"),
            timeout=10,
            what="the failed list to empty",
        )

        # Services: the breaker as Redis holds it, the service's figures.
        await browser.open(base + "#/services")
        await wait_for(lambda: browser.text("[data-testid=breaker-svc]"), what="services")
        assert await browser.text("[data-testid=breaker-svc]") == "closed"
        assert "svc" in await browser.text("table[data-testid=services]")
        await browser.shot("services")

        await browser.open(base + "#/alerts")
        await wait_for(lambda: browser.count("table[data-testid=alerts-history]"), what="alerts")
        await browser.open(base + "#/dlq")
        await wait_for(lambda: browser.count("table[data-testid=dlq]"), what="dead letters")


#: A booking: the seat is reserved (and released if the run fails), then charged, with
#: one retry on a retryable error.
BOOKING: dict[str, Any] = {
    "name": "booking",
    "steps": [
        {"id": "reserve", "service": "svc", "action": "reserve",
         "compensate": {"action": "release"}},
        {"id": "charge", "service": "svc", "action": "charge", "depends_on": ["reserve"],
         "retry": {"max_attempts": 2, "backoff": "20ms"}},
    ],
}  # fmt: skip


async def test_a_failed_run_page_shows_every_attempt_why_it_failed_and_the_compensation(
    make_system: Any, browser: Browser
) -> None:
    """A run whose charge fails twice (a retryable error) and whose reservation is released:
    the page draws both attempts with their reason, the release as its own bar, and the
    reserved step as compensated, not completed."""
    system = await make_system(BOOKING)

    async def charge(data: Any, command: Any) -> dict[str, Any]:
        await asyncio.sleep(0.02)
        msg = "billing backend hiccup"
        raise ActionError(msg, code="billing_unavailable", retryable=True)

    await system.worker("svc", {"reserve": echo, "charge": charge, "release": echo})
    mediator = await system.mediator()
    client = await system.client()
    result = await client.submit("booking", {"seat": "12A"}, request_id="booking-1", timeout=30)
    assert result.status is WorkflowStatus.FAILED
    assert result.compensations["reserve"].status == "completed"
    await mediator.flusher.flush()

    async with _dashboard(system) as base:
        # Found from the list by its request id, as a user would look for it.
        await browser.open(base + "#/runs?status=failed")
        await wait_for(
            lambda: _contains(browser.text("table[data-testid=runs]"), "booking-1"),
            what="the failed run listed",
        )
        await browser.click(f"tr[data-wid='{result.workflow_id}'] a")
        await wait_for(lambda: browser.text("[data-testid=run-id]"), what="the run page")
        assert await browser.attribute("[data-testid=dag-reserve]", "data-status") == (
            "compensated"
        )
        assert await browser.attribute("[data-testid=dag-charge]", "data-status") == "failed"
        labels = await browser.attributes("[data-testid=timeline] [data-testid=bar]", "data-label")
        assert sorted(labels) == [
            "charge #1",
            "charge #2",
            "reserve #1",
            "undo reserve #1",
        ], labels
        for attempt in ("charge #1", "charge #2"):
            tip = await browser.attribute(
                f"[data-testid=bar][data-label='{attempt}'] title", "textContent"
            )
            assert tip is not None and "billing backend hiccup" in tip, tip
        steps = await browser.text("table[data-testid=steps]")
        assert "billing backend hiccup" in steps
        await browser.shot("run-failed")


async def _equals(value: Any, expected: int) -> bool:
    return await value == expected


async def _contains(value: Any, expected: str) -> bool:
    return expected in await value


async def _run_status(mediator: Any, wid: str | None, expected: str) -> bool:
    assert wid is not None
    raw = await mediator.redis.hget(mediator.store.keys.workflow(wid), "status")
    return raw is not None and raw.decode() == expected


async def test_a_page_on_another_origin_cannot_act_on_the_dashboard(
    make_system: Any, browser: Browser
) -> None:
    """A page the operator happens to open elsewhere posts to the dashboard every way a
    page can (a form, a no-cors fetch, a fetch with the page's own header): nothing is sent."""
    from aiohttp import web

    from mediator.runtime.endpoints import listen

    system = await make_system(CHAIN3)
    flaky = Flaky()
    await system.worker("svc", {"work": flaky.work})
    mediator = await system.mediator()
    client = await system.client()
    failed = await client.submit("chain3", {"n": 1}, request_id="victim", timeout=30)
    assert failed.status is WorkflowStatus.FAILED
    wid = failed.workflow_id
    urls: list[str] = []
    serving = asyncio.create_task(
        serve_dashboard(system.settings, "127.0.0.1", 0, ready=urls.append)
    )
    await wait_for(lambda: urls, what="the dashboard to listen")
    target = f"{urls[0]}api/runs/{wid}/retry"
    page = f"""<!doctype html><html><body>
<form id="f" method="POST" action="{target}" enctype="text/plain" target="sink">
<input name='{{"a":"' value='"}}'></form><iframe name="sink"></iframe>
<script>
const tries = [
  fetch("{target}", {{method: "POST", mode: "no-cors",
    headers: {{"Content-Type": "text/plain"}}, body: "{{}}"}}),
  fetch("{target}", {{method: "POST", headers: {{"Content-Type": "application/json",
    "X-Mediator-Action": "1"}}, body: "{{}}"}}),
];
document.getElementById("f").submit();
Promise.allSettled(tries).then(() => {{ document.title = "done"; }});
</script></body></html>"""

    async def attacker(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", attacker)
    runner, port = await listen(app, "127.0.0.1", 0)
    try:
        await browser.open(f"http://localhost:{port}/")
        await wait_for(
            lambda: _contains(browser.call(lambda: browser.driver.title), "done"),
            what="the attacking page to have tried",
        )
        await asyncio.sleep(1.5)  # a control that got through would be applied by now
        assert mediator.runtime.stats.controls == 0
        assert await _run_status(mediator, wid, "failed")
    finally:
        await runner.cleanup()
        await cancel_and_wait(serving)


async def test_a_run_paused_and_resumed_from_its_page(make_system: Any, browser: Browser) -> None:
    """Pause on the run page: the page says the run is paused and nothing goes out; Resume
    sends what became ready, and the run completes."""
    system = await make_system(CHAIN3)
    release = asyncio.Event()
    seen: list[str] = []

    async def work(data: Any, command: Any) -> dict[str, Any]:
        seen.append(command.step)
        if command.step == "a":
            await release.wait()
        return await echo(data, command)

    await system.worker("svc", {"work": work})
    mediator = await system.mediator()
    client = await system.client()
    running = asyncio.create_task(client.submit("chain3", {}, request_id="held", timeout=60))
    await wait_for(lambda: seen, what="step a to be sent")
    wid = workflow_id_for("held")
    async with _dashboard(system) as base:
        await browser.open(base + f"#/run/{wid}")
        await wait_for(lambda: browser.count("[data-testid=pause]"), what="the Pause button")
        await browser.click("[data-testid=pause]")
        await wait_for(
            lambda: _contains(browser.text("#toast"), f"pause {wid}: applied"),
            timeout=15,
            what="the pause's outcome on the page",
        )
        await wait_for(lambda: browser.count("[data-testid=paused]"), what="the paused mark")
        release.set()  # a's reply is applied; b stays pending
        await wait_for(
            lambda: _step_status(mediator, wid, "a", "completed"), what="a's reply applied"
        )
        await asyncio.sleep(1.0)
        assert seen == ["a"]
        await wait_for(lambda: browser.count("[data-testid=resume]"), what="the Resume button")
        await browser.click("[data-testid=resume]")
        assert (await running).status is WorkflowStatus.COMPLETED
        assert seen == ["a", "b", "c"]
        await wait_for(
            lambda: _equals(browser.count("[data-testid=timeline] [data-testid=mark]"), 2),
            timeout=10,
            what="the pause and the resume on the timeline",
        )


async def _step_status(mediator: Any, wid: str, step: str, expected: str) -> bool:
    state = await mediator.store.load(wid)
    return state is not None and state.steps[step].status.value == expected


#: An approval, then a payment given what the approval said.
APPROVAL: dict[str, Any] = {
    "name": "approval",
    "steps": [
        {"id": "approve", "wait": {"event": "approval"}},
        {"id": "pay", "service": "svc", "action": "work", "depends_on": ["approve"],
         "input": "steps.approve"},
    ],
}  # fmt: skip


async def test_a_waiting_step_is_approved_from_the_run_page(
    make_system: Any, browser: Browser
) -> None:
    system = await make_system(APPROVAL)
    got: list[Any] = []

    async def work(data: Any, command: Any) -> dict[str, Any]:
        got.append(data)
        return {}

    await system.worker("svc", {"work": work})
    await system.mediator()
    client = await system.client()
    running = asyncio.create_task(client.submit("approval", {}, request_id="ask", timeout=60))
    wid = workflow_id_for("ask")
    async with _dashboard(system) as base:
        await browser.open(base + f"#/run/{wid}")
        await wait_for(
            lambda: browser.count("[data-testid=approve-approve]"), what="the Approve button"
        )
        await browser.click("[data-testid=approve-approve]")
        await wait_for(
            lambda: _contains(browser.text("#toast"), f"signal approval {wid}: applied"),
            timeout=15,
            what="the approval's outcome on the page",
        )
        assert (await running).status is WorkflowStatus.COMPLETED
        assert got == [{"approved": True, "by": "dashboard"}]


async def test_schedules_are_listed_paused_and_run_now_from_the_dashboard(
    make_system: Any, browser: Browser
) -> None:
    from mediator.core.schedules import parse_schedules
    from mediator.settings import ScheduleSettings

    system = await make_system(CHAIN3, schedules=ScheduleSettings(poll_ms=50))
    hourly = {"name": "hourly", "workflow": "chain3", "every": "1h", "payload": {"n": "`1`"}}
    for schedule in parse_schedules({"schedules": [hourly]}):
        system.definitions.add_schedule(schedule)
    ran: list[str] = []

    async def work(data: Any, command: Any) -> dict[str, Any]:
        ran.append(command.workflow_id)
        return {}

    await system.worker("svc", {"work": work})
    await system.mediator()
    async with _dashboard(system) as base:
        await browser.open(base + "#/schedules")
        await wait_for(lambda: browser.text("[data-testid=schedule-hourly]"), what="the list")
        assert await browser.text("[data-testid=schedule-hourly]") == "active"
        assert "every 1h" in await browser.text("table[data-testid=schedules]")
        await browser.click("tr[data-schedule=hourly] button[data-schedule-action=pause]")
        await wait_for(
            lambda: _contains(browser.text("[data-testid=schedule-hourly]"), "paused"),
            what="the schedule paused",
        )
        await browser.click("[data-testid=trigger-hourly]")
        await wait_for(lambda: len(ran) >= 3, timeout=15, what="the run it started")
        await browser.shot("schedules")


async def test_a_parent_and_its_child_run_link_to_each_other(
    make_system: Any, browser: Browser
) -> None:
    child = {"name": "child", "steps": [{"id": "a", "service": "svc", "action": "work"}]}
    parent = {"name": "parent", "steps": [{"id": "sub", "workflow": "child"}]}
    system = await make_system(child, parent)

    async def work(data: Any, command: Any) -> dict[str, Any]:
        return {"done": True}

    await system.worker("svc", {"work": work})
    await system.mediator()
    client = await system.client()
    assert (await client.submit("parent", {}, request_id="p", timeout=30)).status is (
        WorkflowStatus.COMPLETED
    )
    wid = workflow_id_for("p")
    async with _dashboard(system) as base:
        await browser.open(base + f"#/run/{wid}")
        await wait_for(lambda: browser.count("[data-testid=child-sub]"), what="the child link")
        await browser.click("[data-testid=child-sub]")
        await wait_for(
            lambda: _contains(browser.text("[data-testid=parent]"), f"child run of {wid}"),
            what="the child's page naming its parent",
        )
        assert "step sub, attempt 1" in await browser.text("[data-testid=parent]")


#: Runs that wait for an approval, one at a time per customer.
HELD: dict[str, Any] = {
    "name": "held",
    "concurrency": {"key": "payload.customer", "limit": 1},
    "steps": [{"id": "approve", "wait": {"event": "approval"}}],
}


async def test_concurrency_keys_are_shown_and_matching_runs_cancelled_in_bulk(
    make_system: Any, browser: Browser
) -> None:
    """The Services page shows each key's runs in progress and queued; on the Workflows
    page, a bulk cancel of every run matching the filter is counted and confirmed first,
    and cancels the queued runs as well as the running ones."""
    system = await make_system(HELD)
    mediator = await system.mediator()
    client = await system.client()
    runs = [
        asyncio.create_task(
            client.submit("held", {"customer": c}, request_id=f"{c}{n}", timeout=60)
        )
        for c in ("ann", "bob")
        for n in range(3)
    ]
    await wait_for(lambda: mediator.runtime.stats.requests >= 6, what="the requests read")
    async with _dashboard(system) as base:
        await browser.open(base + "#/services")
        await wait_for(
            lambda: _contains(browser.text("[data-testid=keys-held]"), "2 keys 2 4"),
            timeout=15,
            what="the workflow's keys: 2 running, 4 queued",
        )
        assert "1/1" in await browser.text("[data-testid=key-held-ann]")
        await browser.open(base + "#/runs?workflow=held")
        await wait_for(lambda: browser.count("[data-testid=bulk-matching]"), what="the bulk bar")
        await browser.call(_choose, browser, "[data-testid=bulk-action]", "cancel")
        await browser.click("[data-testid=bulk-matching]")
        assert await browser.confirm() == "cancel 6 runs matching these filters?"
        results = await asyncio.gather(*runs)
    assert [r.status for r in results] == [WorkflowStatus.CANCELLED] * 6
    code, out, err = await cli(system.settings, "keys")
    assert code == 0 and "no run holds or waits" in out, (out, err)


def _choose(browser: Browser, css: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(browser.driver.find_element(By.CSS_SELECTOR, css)).select_by_value(value)
