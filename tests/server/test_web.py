"""The analyst's web page in a real headless Chromium, against a real npcapserve (TLS, PAM
users, group filters) serving the world's recorded dump set (pamworld.py).

The oracles are the API's own answers checked elsewhere against npcapextract and tshark
(test_serve_http.py), and npcapextract itself for the download."""

from __future__ import annotations

import ipaddress
import pwd
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from extract_helpers import build_dumpset, synthetic_traffic
from pamworld import CLIENT, NET_FILTER, PAM_MARKS
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys
from serveworld import serving
from webworld import WEB_MARKS, browser, filled, login, rows, text, wait_for

from pcapvault.index.privileges import give_tree

pytestmark = [*PAM_MARKS, *WEB_MARKS]


@pytest.fixture(scope="module")
def served(world):
    with serving(world) as s:
        yield s


@pytest.fixture(scope="module")
def page(world, served):
    """One browser logged in as the unrestricted member, for the tests that only look."""
    with browser() as driver:
        login(driver, served.url, world.member.name, world.member.password)
        yield driver


def reset(driver, url: str) -> dict:
    """The first view again (the whole dump set, no filter)."""
    driver.get(url + "/")
    return filled(driver)


def count_pcap(data: bytes) -> int:
    from extract_helpers import read_pcap_records

    return len(read_pcap_records(data))


def test_no_data_before_login(world, served):
    with browser() as driver:
        driver.get(served.url + "/")
        wait_for(lambda: driver.find_element("id", "user").is_displayed(), message="form")
        assert not driver.find_element("id", "main").is_displayed()
        assert driver.find_element("id", "table").find_elements("css selector", "tbody tr") == []
        assert driver.get_cookie("pcapvault_session") is None
    with served.client() as c:  # the page's calls are refused, without a Basic challenge
        r = c.get("/api/v1/volume", params={"begin": "-1h", "end": "now"},
                  headers={"X-Requested-With": "pcapvault"})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Session")


def test_login_shows_the_recorded_traffic(world, served, page):
    got = reset(page, served.url)
    b, e = world.window
    r = subprocess.run([*CLIENT, "-t", str(world.dumpset), "-b", b, "-e", e, "-0", "-O"],
                       capture_output=True, timeout=120)
    assert got["total"] == count_pcap(r.stdout) > 0  # every recorded packet is on the chart
    # drawn in steps, not one bar (the world's 1,500 packets are sent in a burst that may
    # last under 10 ms, and the shortest step is 1 ms: not always more than ten)
    assert got["points"] >= 5
    assert text(page, "who") == world.member.name
    assert f"{got['total']:,}" in text(page, "dl-info").replace("\u202f", ",")
    cookie = page.get_cookie("pcapvault_session")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    # Nothing refused by the Content-Security-Policy, no script error (the 401 of the
    # session check before the login is the one expected failure).
    logged = [e["message"] for e in page.get_log("browser") if e["level"] == "SEVERE"]
    assert all("/session" in m and "401" in m for m in logged), logged
    health = page.find_element("id", "health-table").text
    with served.client() as c:
        st = c.get("/api/v1/status").json()["dumpsets"][0]
    assert st["interface"] in health and f"{st['packets_received']:,}" in health
    assert f"{st['packets_dropped']} of" in health


def test_drag_selects_a_window_and_the_table_follows(world, served, page):
    before = reset(page, served.url)
    table_before = rows(page)
    canvas = page.find_element("css selector", "#chart .u-over")
    width = canvas.size["width"]
    # The middle half of the chart: a narrower window than the whole set.
    ActionChains(page).move_to_element_with_offset(canvas, -width // 4, 0).click_and_hold() \
        .move_by_offset(width // 2, 0).release().perform()
    after = wait_for(lambda: (lambda f: f if f["total"] != before["total"] else None)(
        filled(page)), message="a narrower window")
    assert 0 < after["total"] < before["total"]
    assert rows(page) != table_before
    info = text(page, "table-info")
    href = page.find_element("id", "dl-pcap").get_attribute("href")
    q = parse_qs(urlsplit(href).query)
    # The window the chart now shows is the one dragged over, and the links ask for it.
    span = float(q["end"][0]) - float(q["begin"][0])
    b, e = world.window
    assert span < (int(e) - int(b)) and info


def test_bad_filter_shows_libpcaps_error(world, served, page):
    reset(page, served.url)
    box = page.find_element("id", "filter")
    box.clear()
    box.send_keys("tcp port")
    message = wait_for(lambda: text(page, "filter-error"), message="the filter's error")
    with served.client(world.member) as c:  # libpcap's message, as the API gives it
        want = c.get("/api/v1/pcap", params={"begin": "-1m", "end": "now",
                                             "filter": "tcp port"}).json()["error"]
    assert message and message in want
    box.clear()
    box.send_keys("tcp port 80")
    wait_for(lambda: text(page, "filter-error") == "", message="the error goes")


def test_row_click_narrows_the_filter_and_download_is_npcapextracts(world, served, page):
    reset(page, served.url)
    first = page.find_element("css selector", "#table tbody tr")
    expr = first.get_attribute("data-filter")
    assert expr.startswith("host ") and " and host " in expr
    first.click()
    wait_for(lambda: page.find_element("id", "filter").get_attribute("value") == expr,
             message="the filter narrowed")
    filled(page)
    shown = rows(page)
    a, b = shown[0][0], shown[0][2]
    assert all({r[0], r[2]} == {a, b} for r in shown)  # only that pair's conversations
    for fmt in ("pcap", "pcapng"):
        href = page.find_element("id", f"dl-{fmt}").get_attribute("href")
        q = {k: v[0] for k, v in parse_qs(urlsplit(href).query).items()}
        assert q["filter"] == expr
        cookie = page.get_cookie("pcapvault_session")["value"]
        with served.client() as c:
            c.cookies.set("pcapvault_session", cookie)
            got = c.get(href)
        assert got.status_code == 200, got.text
        r = subprocess.run([*CLIENT, "-t", str(world.dumpset), "-b", q["begin"], "-e", q["end"],
                            "-f", expr, "-0", "-O", *(["--pcapng"] if fmt == "pcapng" else [])],
                           capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert got.content == r.stdout and len(got.content) > 100


def test_restricted_users_page_holds_only_their_traffic(world, served):
    net = ipaddress.ip_network(NET_FILTER.split()[1])
    with browser() as driver:
        login(driver, served.url, world.restricted.name, world.restricted.password)
        assert NET_FILTER in text(driver, "restricted")
        got = filled(driver)
        b, e = world.window
        r = subprocess.run([*CLIENT, "-t", str(world.dumpset), "-b", b, "-e", e, "-0", "-O",
                            "-f", NET_FILTER], capture_output=True, timeout=120)
        assert got["total"] == count_pcap(r.stdout) > 0
        shown = rows(driver)
        assert shown
        # Every conversation has an end in the allowed net (the member's page has others).
        assert all(ipaddress.ip_address(r[0]) in net or ipaddress.ip_address(r[2]) in net
                   for r in shown), shown
        driver.find_element("css selector", "[data-by=endpoint]").click()
        wait_for(lambda: driver.find_element("css selector", "#table th").text == "Address",
                 message="the endpoints tab")
        filled(driver)
        assert any(ipaddress.ip_address(r[0]) in net for r in rows(driver))


def test_logout_ends_the_session(world, served):
    with browser() as driver:
        login(driver, served.url, world.member.name, world.member.password)
        sid = driver.get_cookie("pcapvault_session")["value"]
        driver.find_element("id", "logout").click()
        wait_for(lambda: driver.find_element("id", "user").is_displayed(), message="form")
        assert not driver.find_element("id", "main").is_displayed()
    with served.client() as c:  # the old id is worth nothing now, on the server
        c.cookies.set("pcapvault_session", sid)
        r = c.get("/api/v1/volume", params={"begin": "-1h", "end": "now"})
        assert r.status_code == 401 and "log in again" in r.json()["error"]


def test_login_is_audited_rate_limited_and_same_origin(world, served):
    before = world.audit_count()
    origin = served.url
    with served.client() as c:
        r = c.post("/login", json={"user": world.member.name, "password": "wrong"},
                   headers={"Origin": origin})
        assert r.status_code == 401 and "set-cookie" not in r.headers
        r = c.post("/login", json={"user": world.member.name,
                                   "password": world.member.password},
                   headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and "set-cookie" not in r.headers
        r = c.post("/login", json={"user": world.member.name,
                                   "password": world.member.password},
                   headers={"Origin": origin})
        assert r.status_code == 200 and r.json()["user"] == world.member.name
        assert r.cookies["pcapvault_session"] == c.cookies["pcapvault_session"]
        r = c.post("/logout", headers={"Origin": "https://evil.example"})
        assert r.status_code == 403
        r = c.get("/session")
        assert r.status_code == 200  # a forged logout did not end it
        r = c.get("/session", headers={"Authorization": "Basic eDp5"})
        assert r.status_code == 401  # a header wins over the cookie
        r = c.post("/logout", headers={"Origin": origin})
        assert r.status_code == 200
        r = c.get("/session")
        assert r.status_code == 401
    lines = world.audit_lines()[before:]
    logins = [(x["endpoint"], x["outcome"], x["pam_user"]) for x in lines
              if x["endpoint"] == "login"]
    assert logins == [("login", "denied", world.member.name),
                      ("login", "denied", None),
                      ("login", "allowed", world.member.name)]
    assert all(world.member.password not in str(x) for x in lines)


def test_outsider_cannot_log_in_and_groups_are_checked_per_request(world, served):
    with served.client() as c:
        r = c.post("/login", json={"user": world.outsider.name,
                                   "password": world.outsider.password},
                   headers={"Origin": served.url})
        assert r.status_code == 403 and "set-cookie" not in r.headers


def test_page_assets_are_served_offline(served):
    with served.client() as c:
        page = c.get("/")
        assert page.status_code == 200 and "default-src 'self'" in \
            page.headers["content-security-policy"]
        for asset in ("/static/app.js", "/static/style.css", "/static/vendor/uPlot.iife.min.js",
                      "/static/vendor/uPlot.min.css", "/static/vendor/LICENSE"):
            assert c.get(asset).status_code == 200, asset
        assert "http" not in page.text.replace("http-equiv", "")  # no CDN
        assert c.get("/static/../app.py").status_code == 404


def test_typed_times_in_npcapextracts_forms(world, served, page):
    whole = reset(page, served.url)
    for box, value in (("begin", "-2h"), ("end", "now")):
        el = page.find_element("id", box)
        el.clear()
        el.send_keys(value)
    page.find_element("css selector", "#times button[type=submit]").click()
    wait_for(lambda: page.find_element("id", "begin").get_attribute("value") != "-2h",
             message="the window typed")
    got = filled(page)
    assert got["total"] == whole["total"]  # the last two hours hold all of the recording
    shown = page.find_element("id", "begin").get_attribute("value")
    assert page.find_element("id", "begin").get_attribute("title").endswith("Z")  # UTC on hover
    page.find_element("css selector", "#times button[type=submit]").click()  # sent back as shown
    filled(page)
    assert page.find_element("id", "begin").get_attribute("value") == shown
    assert text(page, "chart-error") == ""


def test_keyboard_alone_narrows_the_filter(world, served, page):
    reset(page, served.url)
    first = page.find_element("css selector", "#table tbody tr")
    expr = first.get_attribute("data-filter")
    page.execute_script("arguments[0].focus()", first)  # as Tab would reach it
    first.send_keys(Keys.ENTER)
    wait_for(lambda: page.find_element("id", "filter").get_attribute("value") == expr,
             message="Enter on a row narrows the filter")
    filled(page)
    box = page.find_element("id", "filter")
    box.send_keys(Keys.END, " and tcp", Keys.ENTER)  # typed and applied with Enter
    want = f"{expr} and tcp"

    def applied() -> bool:
        href = page.find_element("id", "dl-pcap").get_attribute("href")
        return parse_qs(urlsplit(href).query)["filter"] == [want]

    wait_for(applied, message="the typed filter applied")


@pytest.fixture(scope="module")
def second(world) -> Path:
    """A second dump set (another interface) of the service account, in the same hour."""
    root = world.base / "ds2"
    start = int(world.window[0]) + 3600 - 30
    build_dumpset(root, synthetic_traffic(800, start * 10**9, seed=8, span_s=20),
                  per_file=200, interface="eth9")
    give_tree(root, pwd.getpwnam(world.service_account))
    return root


def test_several_dump_sets_health_and_merged_pcapng(world, second):
    with serving(world, [world.dumpset, second]) as s, browser() as driver:
        login(driver, s.url, world.member.name, world.member.password)
        health = rows(driver, "health-table")
        assert len(health) == 2 and "eth9" in [r[0] for r in health]
        href = driver.find_element("id", "dl-pcapng").get_attribute("href")
        q = {k: v[0] for k, v in parse_qs(urlsplit(href).query).items()}
        with s.client() as c:
            c.cookies.set("pcapvault_session", driver.get_cookie("pcapvault_session")["value"])
            got = c.get(href)
        r = subprocess.run([*CLIENT, "-t", str(world.dumpset), "-t", str(second), "-b",
                            q["begin"], "-e", q["end"], "-0", "-O", "--pcapng"],
                           capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert got.status_code == 200 and got.content == r.stdout
        assert filled(driver)["total"] == count_pcap(direct_pcap(world, second, q))


def test_interface_selector_narrows_everything_to_one_dump_set(world, second):
    """The selector (shown with several dump sets) asks the API for one of them
    (`dumpset=`): the chart's total and the pcap download are npcapextract's over that dump
    set alone; the API refuses a dump set it does not serve."""
    from selenium.webdriver.support.ui import Select

    with serving(world, [world.dumpset, second]) as s, browser() as driver:
        login(driver, s.url, world.member.name, world.member.password)
        filled(driver)
        Select(driver.find_element("id", "dumpsets")).select_by_visible_text("eth9")
        href = wait_for(lambda: "dumpset=" in (h := driver.find_element(
            "id", "dl-pcap").get_attribute("href")) and h, message="the link follows")
        q = {k: v[0] for k, v in parse_qs(urlsplit(href).query).items()}
        assert q["dumpset"] == str(second)
        r = subprocess.run([*CLIENT, "-t", str(second), "-b", q["begin"], "-e", q["end"],
                            "-0", "-O"], capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert wait_for(lambda: filled(driver)["total"] == count_pcap(r.stdout),
                        message="the chart counts eth9 alone")
        with s.client() as c:
            c.cookies.set("pcapvault_session", driver.get_cookie("pcapvault_session")["value"])
            got = c.get(href)
            assert got.status_code == 200 and got.content == r.stdout
            bad = c.get("/api/v1/pcap", params={**q, "dumpset": "/etc"})
            assert bad.status_code == 400 and "no dump set" in bad.json()["error"]


def direct_pcap(world, second, q: dict[str, str]) -> bytes:
    r = subprocess.run([*CLIENT, "-t", str(world.dumpset), "-t", str(second), "-b", q["begin"],
                        "-e", q["end"], "-0", "-O"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout



def test_sorting_zoom_out_and_the_table_is_the_apis(world, served, page):
    reset(page, served.url)

    def header(label: str):
        return page.find_element(
            "xpath", f"//table[@id='table']//th[starts-with(normalize-space(.), '{label}')]")

    header("Packets").click()  # the server's top N by packets
    wait_for(lambda: "▼" in header("Packets").text, message="sorted by packets")
    filled(page)
    shown = rows(page)
    packets = [int(r[5].replace(",", "")) for r in shown]
    assert packets == sorted(packets, reverse=True)
    href = page.find_element("id", "dl-pcap").get_attribute("href")
    q = {k: v[0] for k, v in parse_qs(urlsplit(href).query).items()}
    with served.client(world.member) as c:  # the same window and filter, asked directly
        want = c.get("/api/v1/conversations", params={**q, "sort": "packets", "limit": "25"}
                     ).json()["rows"]
    assert [(r[0], r[2], int(r[5].replace(",", ""))) for r in shown] == \
        [(w["address_a"], w["address_b"], w["packets"]) for w in want]
    header("Protocol").click()  # a column the server does not sort: the shown rows
    wait_for(lambda: "▲" in header("Protocol").text, message="sorted by protocol")
    protocols = [r[4] for r in rows(page)]
    assert protocols == sorted(protocols) and len(protocols) == len(shown)
    before = float(q["end"]) - float(q["begin"])
    page.find_element("id", "zoom-out").click()
    filled(page)
    href = page.find_element("id", "dl-pcap").get_attribute("href")
    q = {k: v[0] for k, v in parse_qs(urlsplit(href).query).items()}
    assert float(q["end"]) - float(q["begin"]) == pytest.approx(2 * before, rel=1e-3)


def test_filter_check_endpoint(world, served):
    with served.client(world.member) as c:
        assert c.get("/api/v1/filter", params={"expr": "tcp port 80"}).json()["valid"]
        r = c.get("/api/v1/filter", params={"expr": "tcp port"})
        assert r.status_code == 400 and "syntax error" in r.json()["error"]
    with served.client() as c:
        assert c.get("/api/v1/filter", params={"expr": "tcp"}).status_code == 401


def test_login_failures_count_as_basics_do_and_bad_bodies_are_400(world):
    with serving(world) as s, s.client() as c:  # a server of its own: its count starts at 0
        form = {"user": world.member.name, "password": world.member.password}
        origin = {"Origin": s.url}
        r = c.post("/login", content=b"{", headers=origin)
        assert r.status_code == 400 and "JSON" in r.json()["error"]
        r = c.post("/login", content=b"x" * 5000, headers=origin)
        assert r.status_code == 400 and "longer" in r.json()["error"]
        r = c.post("/login", json={"user": f"{world.member.name}:x", "password": "y"},
                   headers=origin)
        assert r.status_code == 400 and "':'" in r.json()["error"]
        for _ in range(10):
            assert c.post("/login", json={**form, "password": "wrong"},
                          headers=origin).status_code == 401
        r = c.post("/login", json=form, headers=origin)  # even the right password, now
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert "set-cookie" not in r.headers


@pytest.mark.parametrize("size", [(1280, 800), (500, 900)])
def test_readable_wide_and_narrow(world, served, size):
    with browser(*size) as driver:
        login(driver, served.url, world.member.name, world.member.password)
        # Nothing wider than the window (the tables scroll inside their own box) and the
        # chart as wide as its column.
        def fits() -> bool:
            wide, chart, column = driver.execute_script(
                "return [document.documentElement.scrollWidth"
                " - document.documentElement.clientWidth,"
                " document.querySelector('#chart canvas').getBoundingClientRect().width,"
                " document.getElementById('chart').clientWidth]")
            return wide <= 0 and column - 2 <= chart <= column

        wait_for(fits, timeout=5, message="the page and its chart fit the window")
        # A scroll bar that comes or goes changes the column's width without a resize event.
        for overflow in ("hidden", "scroll"):
            driver.execute_script(
                f"document.documentElement.style.overflowY = '{overflow}'")
            wait_for(fits, timeout=5, message=f"the chart follows its column ({overflow})")
        for element_id in ("filter", "dl-pcap", "logout"):
            assert driver.find_element("id", element_id).is_displayed()

