"""A real headless Chromium (Debian's chromium and chromium-driver) driven by Selenium, for
the web page's tests and bench/web.py.

Each browser gets a fresh profile (no cookie or cache carried over) and is quit at the end.
It accepts the test server's self-signed certificate (serveworld.make_tls) and nothing is
fetched from anywhere but that server.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WEB_MARKS = [
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="Debian's chromium and chromium-driver (setup.sh --test)"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage"]


@contextmanager
def browser(width: int = 1280, height: int = 800) -> Iterator[Any]:
    """A Chromium window of this size (the page's target is 1280x800)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="pv-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        opts.add_argument(flag)
    opts.accept_insecure_certs = True  # the test's own self-signed certificate
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(what: Callable[[], Any], timeout: float = 30, message: str = "") -> Any:
    """What `what` returns once it is truthy; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = what()
        except Exception:  # noqa: BLE001 - an element not there yet, or going stale
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting: {message}"
        time.sleep(0.05)


def text(driver: Any, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def login(driver: Any, url: str, user: str, password: str) -> None:
    """Open the page, fill the login form and wait for the first view to be filled."""
    driver.get(url + "/")
    wait_for(lambda: driver.find_element("id", "user").is_displayed(), message="login form")
    driver.find_element("id", "user").send_keys(user)
    pw = driver.find_element("id", "password")
    pw.send_keys(password)
    pw.submit()
    filled(driver)


def filled(driver: Any) -> dict:
    """Wait until the chart and the table are drawn for the current state; their numbers."""
    return wait_for(lambda: driver.execute_script(
        "const c = document.getElementById('chart'), i = document.getElementById('table-info');"
        "return document.body.dataset.busy === '0' && c.dataset.points && i.textContent"
        " && !document.getElementById('main').hidden"
        " ? {points: +c.dataset.points, total: +c.dataset.total, info: i.textContent} : null"),
        message="chart and table")


def rows(driver: Any, table_id: str = "table") -> list[list[str]]:
    """A table's rows (by default the conversations, endpoints or ports) as the cells' text."""
    return driver.execute_script(
        "return [...document.getElementById(arguments[0]).tBodies[0].rows]"
        ".map(r => [...r.cells].map(c => c.textContent))", table_id)
