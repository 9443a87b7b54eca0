"""`overlay ui` in a real browser: Debian's chromium driven by Selenium (skipped where either is
missing), against a server and nodes started through the CLI."""

import json
import os
import re
import shutil
import signal
import subprocess

import pytest

from cluster import OVERLAY, Cluster

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromium-driver")


def browser():
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800",
                "--disable-gpu", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))


def screenshots(driver, folder: str) -> None:
    """The page in light and dark (README pictures): OVERLAY_UI_SCREENSHOTS=docs pytest this file."""
    driver.find_element("tag name", "body").send_keys("\ue00c")   # Escape closes the last message
    for scheme in ("light", "dark"):
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                               {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
        driver.save_screenshot(os.path.join(folder, f"ui-{scheme}.png"))
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def click(driver, css: str) -> bool:
    """Click the element (False while it is missing or being re-drawn by a live update)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        if found:
            found[0].click()
            return True
    except StaleElementReferenceException:
        pass
    return False


def row(driver, network: str, member: str):
    from selenium.webdriver.common.by import By
    found = driver.find_elements(By.CSS_SELECTOR, f'[data-network="{network}"] tr[data-member="{member}"]')
    return found[0] if found else None


def light(driver, network: str, member: str) -> str | None:
    from selenium.common.exceptions import StaleElementReferenceException
    try:
        r = row(driver, network, member)
        return r.get_attribute("data-light") if r is not None else None
    except StaleElementReferenceException:
        return None


def cell(driver, network: str, member: str, css: str, attribute: str | None = None) -> str:
    """Text (or an attribute) of an element in a member's row; "" while missing or being re-drawn."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    try:
        r = row(driver, network, member)
        found = r.find_elements(By.CSS_SELECTOR, css) if r is not None else []
        if not found:
            return ""
        return (found[0].get_attribute(attribute) if attribute else found[0].text) or ""
    except StaleElementReferenceException:
        return ""


def text(driver, css: str) -> str:
    """The text of the first element matching ``css``; "" while missing or being re-drawn."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return found[0].text if found else ""
    except StaleElementReferenceException:
        return ""


def chat_lines(driver) -> list[str]:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    try:
        return [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#chat-log li")]
    except StaleElementReferenceException:
        return []


def severe_logs(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_page_in_chromium_live_members_chat_share_approve_offline(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    with Cluster(tmp_path) as c:
        c.start_server()
        a = c.start_node("alice")
        b = c.start_node("bob")
        d = c.start_node("dave")
        a.ok("create", "games", "--password", "pw", "--approval")
        r = b.run("join", "games", "--password", "pw")
        assert r.returncode == 0, r.stderr
        c.wait(lambda: (a.network("games") or {}).get("pending"), what="bob's join request")
        driver = browser()
        try:
            driver.get(a.ok("ui", "--no-open").strip())
            assert "?s=" not in driver.current_url     # the secret left the address bar
            # the owner approves bob's join from the page
            c.wait(lambda: click(driver, '[data-key="approve:bob.games"]'), what="approve bob on the page")
            c.wait(lambda: b.network("games"), what="bob in games")
            # bob is online and direct (green), without a reload
            c.wait(lambda: light(driver, "games", "bob") == "direct", timeout=30, what="bob direct on the page")

            # ping from the page: its answer shows; the tunnel's traffic and its chart fill in
            c.wait(lambda: click(driver, '[data-key="ping:bob.games"]'), what="ping bob on the page")
            c.wait(lambda: re.search(r"bob\.games: [0-9.]+ ms", driver.find_element(By.ID, "msg").text),
                   what="ping answer on the page")
            c.wait(lambda: cell(driver, "games", "bob", ".traffic span").startswith("↓")
                   and "↓ 0 B" not in cell(driver, "games", "bob", ".traffic span"), what="bob's traffic")
            c.wait(lambda: cell(driver, "games", "bob", "svg.chart .down", "points"), what="bob's chart")

            # chat: a line from bob's CLI appears; one typed on the page reaches dave's --follow
            d.ok("join", "games", "--password", "pw")   # approval: the owner approves dave from the page too
            c.wait(lambda: click(driver, '[data-key="approve:dave.games"]'), what="approve dave on the page")
            c.wait(lambda: d.network("games"), what="dave in games")
            b.ok("chat", "games", "hello page")
            c.wait(lambda: any("hello page" in t for t in chat_lines(driver)), what="CLI chat on the page")
            follow = subprocess.Popen([*OVERLAY, "chat", "games", "--follow", "--json", "--home", str(d.home)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                assert "following chat of games" in follow.stderr.readline()
                box = driver.find_element(By.CSS_SELECTOR, "#chat-form input[name=text]")
                box.send_keys("hello from the browser", Keys.ENTER)   # keyboard only
                line = json.loads(follow.stdout.readline())
                assert line["text"] == "hello from the browser" and line["from"] == "alice"
            finally:
                follow.terminate()
                follow.wait(5)

            # a share added on the page shows in `overlay status`
            box = driver.find_element(By.CSS_SELECTOR, "#share-form input[name=port]")
            box.send_keys("27015/udp", Keys.ENTER)
            c.wait(lambda: {"port": 27015, "proto": "udp"} in a.cli_status()["shares"], what="share in status")
            if os.environ.get("OVERLAY_UI_SCREENSHOTS"):
                c.wait(lambda: light(driver, "games", "dave") == "direct", timeout=30, what="dave direct")
                c.wait(lambda: "27015/udp" in driver.find_element(By.ID, "share-list").text, what="share on the page")
                screenshots(driver, os.environ["OVERLAY_UI_SCREENSHOTS"])

            # owner actions: lock the network from the page; a forward added there shows in status
            c.wait(lambda: click(driver, '[data-key="lock:games"]'), what="lock on the page")
            c.wait(lambda: a.network("games")["locked"], what="games locked")
            driver.find_element(By.CSS_SELECTOR, "#forward-form input[name=listen]").send_keys("0")
            driver.find_element(By.CSS_SELECTOR, "#forward-form input[name=peer]").send_keys("dave")
            driver.find_element(By.CSS_SELECTOR, "#forward-form input[name=peer_port]").send_keys("8080", Keys.ENTER)
            c.wait(lambda: [f["peer"] for f in a.cli_status()["forwards"]] == ["dave"], what="forward in status")
            c.wait(lambda: "dave:8080" in driver.find_element(By.ID, "forward-list").text, what="forward on the page")
            # an error is the CLI's one line
            before = a.fails("forward", "45999", "nobody:80")
            driver.find_element(By.CSS_SELECTOR, "#forward-form input[name=listen]").send_keys("0")
            driver.find_element(By.CSS_SELECTOR, "#forward-form input[name=peer]").send_keys("nobody")
            driver.find_element(By.CSS_SELECTOR, "#forward-form input[name=peer_port]").send_keys("80", Keys.ENTER)
            c.wait(lambda: driver.find_element(By.ID, "msg").text.startswith("error: "), what="error on the page")
            assert driver.find_element(By.ID, "msg").text[len("error: "):] in before

            # a narrow window, and 125 % zoom: nothing sticks out of the page sideways (the members
            # table scrolls inside its box)
            overflow = "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
            driver.set_window_size(420, 900)
            c.wait(lambda: driver.execute_script(overflow) <= 0, timeout=5, what="narrow window fits")
            driver.set_window_size(1200, 800)
            driver.execute_script("document.documentElement.style.zoom = '1.25'")
            c.wait(lambda: driver.execute_script(overflow) <= 0, timeout=5, what="125 % zoom fits")
            driver.execute_script("document.documentElement.style.zoom = ''")

            # bob goes offline: his light turns grey once alice's daemon knows
            b.kill(signal.SIGTERM)
            c.wait(lambda: not {m["name"]: m for m in a.network("games")["members"]}["bob"]["online"],
                   what="bob offline for alice")
            c.wait(lambda: light(driver, "games", "bob") == "offline", timeout=5, what="bob grey on the page")
            assert severe_logs(driver) == []      # no script error, no CSP violation
        finally:
            driver.quit()


def test_owner_approves_a_route_from_the_page(tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    with Cluster(tmp_path) as c:
        c.start_server()
        a = c.start_node("alice")
        g = c.start_node("gw", "--advertise-routes", "192.168.77.0/24")
        a.ok("create", "lan", "--password", "pw")
        g.ok("join", "lan", "--password", "pw")
        driver = browser()
        try:
            driver.get(a.ok("ui", "--no-open").strip())
            # the route waits for approval in the network's box without a click on "routes"
            waiting = '[data-network="lan"] .waiting-routes'
            c.wait(lambda: text(driver, waiting).startswith("1 route waiting for approval"), what="route waiting")
            assert "192.168.77.0/24 through gw" in text(driver, waiting)
            assert not driver.find_elements(By.CSS_SELECTOR, '[data-network="lan"] .routes')   # full view still hidden
            c.wait(lambda: click(driver, '[data-key="approve-route:gw:192.168.77.0/24.lan"]'), what="approve the route")
            c.wait(lambda: json.loads(a.ok("admin", "routes", "lan", "--json"))["routes"][0]["approved"]
                   == ["192.168.77.0/24"], what="route approved")
            c.wait(lambda: not driver.find_elements(By.CSS_SELECTOR, waiting), what="waiting line gone")

            # keyboard: Tab reaches the "routes" button, its focus is visible, Enter and Space press it
            def tab_to(key: str) -> None:
                driver.execute_script("document.activeElement.blur(); window.focus()")
                for _ in range(80):
                    ActionChains(driver).send_keys(Keys.TAB).perform()
                    if driver.execute_script("return document.activeElement.dataset.key") == key:
                        return
                raise AssertionError(f"Tab never reached {key}")
            tab_to("routes:lan")
            outline = "const s = getComputedStyle(document.activeElement); return s.outlineStyle + ' ' + s.outlineWidth"
            assert driver.execute_script(outline) == "solid 2px"     # app.css :focus-visible, not the default ring
            ActionChains(driver).send_keys(Keys.ENTER).perform()
            c.wait(lambda: "192.168.77.0/24 through gw: approved" in text(driver, '[data-network="lan"] .routes'),
                   what="shown approved")
            assert driver.execute_script("return document.activeElement.dataset.key") == "routes:lan"
            ActionChains(driver).send_keys(Keys.SPACE).perform()
            c.wait(lambda: not driver.find_elements(By.CSS_SELECTOR, '[data-network="lan"] .routes'),
                   what="routes hidden with Space")
            assert severe_logs(driver) == []
        finally:
            driver.quit()
