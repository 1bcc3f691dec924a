"""The request inspector's page in a real headless browser (Debian's chromium and chromium-driver,
through selenium): load the page, send requests through the tunnel, see the rows appear, open one
to see its heads (fetched from its own endpoint: the list has none), see the polls answered 304
while nothing changes, click replay, see the local app receive the request again, and open a row
that has left the log meanwhile.

Without selenium, chromium or chromedriver the test is skipped, or fails under ``CI=true`` (CI
installs them). With FERROTUNNEL_SCREENSHOT=PATH a screenshot of the page is saved there."""

from __future__ import annotations

import asyncio
import http.client
import os
import shutil
import threading
from typing import Any, Optional

import pytest
import uvloop

from test_inspector import inspected


def _require(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(why)
    pytest.skip(why)


class World(threading.Thread):
    """The tunnel world of test_inspector (server, HTTP ingress, client with an Inspector, app) on
    its own event loop in a thread, while the browser is driven from the test's thread."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.ready = threading.Event()
        self.error: Optional[BaseException] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.stop_event: Optional[asyncio.Event] = None
        self.ing: Any = None
        self.app: Any = None
        self.insp: Any = None
        self.answers: list = []  # (target, status, If-None-Match values) of each inspector answer
        self.frozen = False  # list polls answered 304 (the page keeps a list the log no longer has)

    def run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self.main())
        except BaseException as exc:  # reported by the test
            self.error = exc
            self.ready.set()

    async def main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        async with inspected() as (self.ing, self.app, self.insp):
            answer = self.insp._answer

            async def watched(head: Any) -> Any:
                if self.frozen and head.target == "/api/requests":
                    return 304, None, ()
                out = await answer(head)
                self.answers.append((head.target, out[0], head.values("if-none-match")))
                return out

            self.insp._answer = watched
            self.ready.set()
            await self.stop_event.wait()

    def stop(self) -> None:
        if self.loop is not None and self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.join(30)


def visit(world: World, method: str, path: str, body: Optional[bytes] = None) -> bytes:
    """One visitor request through the HTTP ingress to tunnel "web"."""
    conn = http.client.HTTPConnection(*world.ing.address, timeout=20)
    try:
        conn.request(method, path, body=body, headers={"Host": "web"})
        return conn.getresponse().read()
    finally:
        conn.close()


@pytest.fixture
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _require("selenium is not installed (the test extra has it)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        _require("chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_rows_appear_and_replay_reaches_the_app_again(browser):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    world = World()
    world.start()
    try:
        assert world.ready.wait(30), "the tunnel world did not start"
        if world.error is not None:
            raise world.error
        wait = WebDriverWait(browser, 20)
        browser.get(world.insp.url)
        assert browser.title == "ferrotunnel inspector"
        wait.until(lambda d: d.find_element(By.ID, "status").text == "live")
        assert browser.find_element(By.ID, "empty").is_displayed()

        assert visit(world, "GET", "/hello?from=browser") == b"app GET /hello?from=browser "
        assert visit(world, "POST", "/form", b"name=ferro") == b"app POST /form name=ferro"
        assert visit(world, "GET", "/chunked").startswith(b"app GET /chunked ")

        def table(d: Any) -> list:
            """The rows' cell texts, read in one go (the page redraws rows as they change)."""
            return d.execute_script("return [...document.querySelectorAll('#rows tr')]"
                                    ".map(tr => [tr.dataset.id, ...[...tr.cells].map(td => td.textContent)])")

        def row_paths(d: Any) -> list:
            return [row[4] for row in table(d)]

        def click(css: str) -> None:
            WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,)).until(
                lambda d: d.find_element(By.CSS_SELECTOR, css).click() or True)

        wait.until(lambda d: row_paths(d) == ["/chunked", "/form", "/hello?from=browser"])
        assert not browser.find_element(By.ID, "empty").is_displayed()
        hello_id, *cells = table(browser)[2]
        assert cells[1:5] == ["web", "GET", "/hello?from=browser", "200"], cells
        assert cells[5].endswith(" ms") and cells[8] == "127.0.0.1", cells

        # nothing changes: the polls name the list's ETag and get 304, and the rows stay
        wait.until(lambda d: [a[:2] for a in world.answers].count(("/api/requests", 304)) >= 2)
        assert all(a[2] for a in world.answers if a[:2] == ("/api/requests", 304))
        assert browser.find_element(By.ID, "status").text == "live"  # a 304 is no error to the page
        assert row_paths(browser) == ["/chunked", "/form", "/hello?from=browser"]

        # open the POST: its heads and body are shown, fetched from its own endpoint
        post_id = table(browser)[1][0]
        click(f'#rows tr[data-id="{post_id}"]')
        wait.until(lambda d: d.find_element(By.ID, "request-body").text == "name=ferro")
        assert browser.find_element(By.ID, "request-head").text.startswith("POST /form HTTP/1.1")
        assert "Content-Length: 10" in browser.find_element(By.ID, "request-head").text
        assert browser.find_element(By.ID, "response-head").text.startswith("HTTP/1.1 200 OK")
        assert (f"/api/requests/{post_id}", 200, []) in world.answers

        # replay the first GET: the app receives it again and a new row names what it replays
        assert world.app.paths().count(b"/hello?from=browser") == 1
        click(f'button.replay[data-id="{hello_id}"]')
        wait.until(lambda d: world.app.paths().count(b"/hello?from=browser") == 2)
        wait.until(lambda d: row_paths(d)[0] == "/hello?from=browser" and len(row_paths(d)) == 4)
        wait.until(lambda d: "replayed" in d.find_element(By.ID, "message").text)
        assert browser.find_element(By.ID, "detail-note").text.startswith(f"replay of #{hello_id}")
        assert table(browser)[0][9] == "replay"  # the visitor column
        heads = [h for h in world.app.heads if h.startswith(b"GET /hello")]
        assert heads[0] == heads[1]  # the same head, byte for byte
        wait.until(lambda d: d.find_element(By.ID, "request-head").text.startswith("GET /hello?from=browser "))

        # a row that left the log while the page still lists it: opening it says so (the 404's error)
        world.frozen = True
        assert world.loop is not None
        world.loop.call_soon_threadsafe(world.insp.log.clear)
        wait.until(lambda d: len(world.insp.log) == 0)
        click(f'#rows tr[data-id="{hello_id}"]')
        wait.until(lambda d: "is no longer kept" in d.find_element(By.ID, "detail-note").text)
        assert f"no request {hello_id} (it may have left the last 200)" in \
            browser.find_element(By.ID, "detail-note").text
        assert browser.find_element(By.ID, "request-head").text == ""
        assert (f"/api/requests/{hello_id}", 404, []) in world.answers

        shot = os.environ.get("FERROTUNNEL_SCREENSHOT")
        if shot:
            browser.save_screenshot(shot)
    finally:
        world.stop()
