"""The demo page in real headless Chromium: upload, generate, progress, gallery (images, video and audio
players), cancel, polling, API key.

The bridge runs on the test's event loop, so every browser step runs in a worker thread
(``asyncio.to_thread``) while the loop keeps serving. Set COMFY_BRIDGE_SCREENSHOT=static/screenshot.png
to also write the README's screenshot (the page after a finished invert-image run).
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip("the browser test needs Chromium: apt-get install chromium chromium-driver "
                "(.ci/run installs them; in CI this test never skips)", allow_module_level=True)

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from comfy.demo import demo_info

IMAGE = ROOT / "workflows" / "example.png"
SAVED_NAME = re.compile(r"^[0-9a-f]{32}\.png$")
UNAUTHORIZED = "the server responded with a status of 401"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    # without these the browser keeps trying to reach Google's services and logs every failure
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1366,768",  # a common laptop screen
)

# the fake runs invert-image's 5 nodes in this many seconds: long enough to see 20%, 40%, ... by polling
RUN_SECONDS = 2.0
RECORD_PROGRESS = """
window.__seen = [];
const text = document.getElementById("progress-text");
new MutationObserver(() => window.__seen.push(text.textContent))
  .observe(text, {childList: true, characterData: true, subtree: true});
"""


def start_chromium(profile: Path) -> WebDriver:
    """Headless Chromium with a fresh profile, its console log kept for the test."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


def wait(driver: WebDriver, what: str, condition: Callable[[WebDriver], Any], timeout: float = 10) -> Any:
    """Wait for a condition; the failure says what was awaited and what the page said."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except Exception as exc:
        message = driver.find_element(By.ID, "message").text
        raise AssertionError(f"timed out waiting for {what}; the page says {message!r}") from exc


def text(driver: WebDriver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def percent(driver: WebDriver) -> float:
    return float(text(driver, "progress-text").rstrip("%"))


def choose_workflow(driver: WebDriver, alias: str, first_input: str) -> None:
    """Pick a workflow and wait for its generated form."""
    Select(driver.find_element(By.ID, "workflow")).select_by_value(alias)
    wait(driver, f"the form of {alias}", lambda d: d.find_elements(By.ID, first_input)
         and d.find_element(By.ID, "inputs").find_element(By.TAG_NAME, "legend").text.endswith(alias))


def set_value(driver: WebDriver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def occupy_backend(base: str, client_id: str) -> None:
    """Start another caller's job and wait until it runs, so the page's next job has to queue."""
    request = urllib.request.Request(f"{base}/generate-based-workflow?clientId={client_id}", method="POST",
                                     data=b'{"workflow": "blank-canvas"}',
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5):
        pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base}/execution-info?clientId={client_id}", timeout=5) as resp:
            if json.load(resp)["status"] == "progress":
                return
        time.sleep(0.05)
    raise AssertionError("the other caller's job never started")


def generate_and_finish(driver: WebDriver, queued_behind: str = "") -> list[str]:
    """Press Generate from the keyboard, wait for the run to end well; return the progress texts shown.

    With queued_behind (a base URL), another caller's job holds the only backend first, and the page
    must show its job's place in the queue."""
    driver.execute_script(RECORD_PROGRESS)
    if queued_behind:
        occupy_backend(queued_behind, f"other-caller-{time.monotonic_ns()}")
    driver.find_element(By.ID, "generate").send_keys(Keys.ENTER)
    check_in_view(driver, "progress")
    check_in_view(driver, "message")
    if queued_behind:
        wait(driver, "the queue position", lambda d: text(d, "message") == "Queued: position 1 in the bridge's queue.")
    wait(driver, "the run to finish", lambda d: text(d, "message").startswith("Done in"), timeout=15)
    return driver.execute_script("return window.__seen")


def check_in_view(driver: WebDriver, element_id: str) -> None:
    """The element is wholly inside the window, without the user scrolling."""
    box = driver.execute_script(f"""const r = document.getElementById('{element_id}').getBoundingClientRect();
        return [r.top, r.bottom, r.left, r.right, innerHeight, innerWidth]""")
    top, bottom, left, right, height, width = box
    assert 0 <= top and bottom <= height and 0 <= left and right <= width, f"#{element_id} is out of view: {box}"


def result_image(driver: WebDriver, index: int = 0) -> Any:
    """The newest (index 0) gallery image, as a Pillow image (read from the page's blob URL)."""
    from PIL import Image
    data = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const img = document.querySelectorAll('#gallery img')[arguments[0]];
        fetch(img.src).then(r => r.arrayBuffer()).then(b => {
          let s = ''; new Uint8Array(b).forEach(x => { s += String.fromCharCode(x); }); done(btoa(s)); });
    """, index)
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def check_inverted(result: Any) -> None:
    """invert-image's output is the shipped example, inverted (within the blur), at 384x384."""
    from PIL import Image, ImageOps
    source = Image.open(IMAGE).convert("RGB").resize(result.size)
    pixels = result.tobytes()
    diff = sum(abs(a - b) for a, b in zip(pixels, ImageOps.invert(source).tobytes())) / len(pixels)
    plain = sum(abs(a - b) for a, b in zip(pixels, source.tobytes())) / len(pixels)
    assert diff < 12, f"the result is not the inverse of the example (mean difference {diff:.1f})"
    assert plain > 60, f"the result looks like the example itself (mean difference {plain:.1f})"


def check_text_to_image(driver: WebDriver) -> None:
    """Two seeds, two pictures; the seed's 2^64-1 bound is shown exactly and reaches the backend as typed."""
    choose_workflow(driver, "text-to-image", "in-3-seed")
    assert "0 to 18446744073709551615" in text(driver, "in-3-seed-hint")
    set_value(driver, "in-5-width", "256")
    set_value(driver, "in-5-height", "256")
    set_value(driver, "in-3-steps", "4")
    set_value(driver, "in-3-seed", "18446744073709551615")
    driver.execute_script("window.scrollTo(0, 0)")
    generate_and_finish(driver)
    first = result_image(driver)
    set_value(driver, "in-3-seed", "7")
    generate_and_finish(driver)
    second = result_image(driver)
    assert first.size == second.size == (256, 256)
    assert first.tobytes() != second.tobytes(), "two seeds gave the same picture"


def check_colour_picker(driver: WebDriver) -> None:
    """blank-canvas's colour input has a picker; the picked colour is the colour of the result."""
    choose_workflow(driver, "blank-canvas", "in-1-color")
    assert "A plain image of one colour" == text(driver, "workflow-description")
    set_value(driver, "in-1-width", "64")
    set_value(driver, "in-1-height", "48")
    driver.execute_script("""const p = document.getElementById('in-1-color-picker');
        p.value = '#12ab34'; p.dispatchEvent(new Event('input', {bubbles: true}));""")
    assert driver.find_element(By.ID, "in-1-color").get_attribute("value") == str(0x12AB34)
    generate_and_finish(driver)
    image = result_image(driver)
    assert image.size == (64, 48) and image.getpixel((10, 10)) == (0x12, 0xAB, 0x34)


def check_players(driver: WebDriver) -> None:
    """video_and_audio (tests/assets): the gallery plays its WebM in a <video> and its FLAC in an <audio>, both
    with controls, and the browser reads their size and length from the bridge's answer."""
    Select(driver.find_element(By.ID, "workflow")).select_by_value("video_and_audio")
    wait(driver, "the form of video_and_audio", lambda d: d.find_element(By.ID, "inputs")
         .find_element(By.TAG_NAME, "legend").text.endswith("video_and_audio"))
    generate_and_finish(driver)
    players = """const card = document.querySelector('#gallery .card');
        const video = card.querySelector('video[controls]'), audio = card.querySelector('audio[controls]');
        return video && audio && video.readyState >= 1 && audio.readyState >= 1
          ? [video.videoWidth, video.videoHeight, audio.duration, card.querySelectorAll('figure').length] : null"""
    width, height, seconds, figures = wait(driver, "the players to load their media",
                                           lambda d: d.execute_script(players))
    assert (width, height, figures) == (64, 48, 2) and abs(seconds - 1.0) < 0.05, (width, height, seconds)


def check_progress_moved(seen: list[str]) -> None:
    values = [float(s.rstrip("%")) for s in seen]
    assert any(0 < v < 100 for v in values), f"the progress bar never moved: {seen}"
    assert values == sorted(values), f"the progress bar went backwards: {seen}"
    assert seen[-1] == "100.00%", seen


def gallery_images(driver: WebDriver) -> list[int]:
    """naturalWidth of every result image, once every one of them has loaded."""
    script = "return [...document.querySelectorAll('#gallery img')].map(i => i.complete ? i.naturalWidth : -1)"
    wait(driver, "the result images to load", lambda d: -1 not in d.execute_script(script))
    return driver.execute_script(script)


def full_page_screenshot(driver: WebDriver, path: Path) -> None:
    """A screenshot of the whole page from its top, the window grown to the page's height for the shot."""
    width, height = driver.execute_script("return [window.outerWidth, window.outerHeight]")
    driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    page = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, max(height, page + height - driver.execute_script("return innerHeight")))
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(width, height)


def last_job(base: str) -> dict[str, Any]:
    """The newest entry of the generation log (GET /history without clientId)."""
    with urllib.request.urlopen(f"{base}/history?limit=1", timeout=5) as resp:
        return json.load(resp)["history"][0]


def start_and_cancel(driver: WebDriver, base: str) -> str:
    """Start a long sleep-progress run, cancel it once running, check it stopped; return the page's message."""
    choose_workflow(driver, "sleep-progress", "in-2-seconds")
    set_value(driver, "in-2-seconds", "20")
    driver.find_element(By.ID, "generate").click()
    wait(driver, "the long run to make progress", lambda d: percent(d) > 0)
    cancel = driver.find_element(By.ID, "cancel")
    assert cancel.is_enabled()
    cancel.click()
    wait(driver, "the cancel to take effect", lambda d: text(d, "message").startswith("Cancelled."))
    stopped_at = percent(driver)
    assert 0 < stopped_at < 100
    time.sleep(0.5)
    assert percent(driver) == stopped_at, "the progress bar kept moving after the cancel"
    job = last_job(base)
    assert (job["workflow"], job["status"]) == ("sleep-progress", "cancelled"), job
    assert driver.find_element(By.ID, "generate").is_enabled()
    assert not driver.find_element(By.ID, "cancel").is_enabled()
    return text(driver, "message")


def console_errors(driver: WebDriver, allowed: str | None = None) -> list[str]:
    """SEVERE browser-log entries (uncaught errors, failed loads), minus the expected ones."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not (allowed and allowed in e["message"])]


def check_accessible(driver: WebDriver) -> None:
    """Every control has a label; the page fits a phone's width without sideways scrolling."""
    unlabelled = driver.execute_script("""
        return [...document.querySelectorAll('input, select, textarea, button')]
          .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
          .map(e => e.outerHTML)""")
    assert not unlabelled, unlabelled
    driver.set_window_size(390, 844)
    width = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page is wider than a phone screen: {width}"


def demo_scenario(driver: WebDriver, base: str, shots: Path) -> None:
    """The whole tour of the page, WebSocket first, then polling."""
    driver.get(base + "/")
    wait(driver, "the workflow list", lambda d: d.find_element(By.ID, "workflow").is_enabled())
    wait(driver, "the status strip", lambda d: (text(d, "backends-up"), text(d, "backends-total")) == ("1", "1"))
    assert text(driver, "queue-length") == "0"

    # 1. invert-image with an uploaded image, followed over the WebSocket
    choose_workflow(driver, "invert-image", "in-1-image-file")
    driver.find_element(By.ID, "in-1-image-file").send_keys(str(IMAGE))
    wait(driver, "the saved upload name in the form",
         lambda d: SAVED_NAME.match(d.find_element(By.ID, "in-1-image").get_attribute("value") or ""))
    assert driver.execute_script("return document.querySelector('.preview').naturalWidth") > 0
    assert text(driver, "workflow-description").startswith("Invert an uploaded image")
    check_progress_moved(generate_and_finish(driver, queued_behind=base))
    assert gallery_images(driver) == [384]  # the workflow scales to 384x384
    check_inverted(result_image(driver))
    link = driver.find_element(By.CSS_SELECTOR, "#gallery figcaption a")
    assert link.get_attribute("download") == "inverted_00001_.png"
    assert link.get_attribute("href").startswith("blob:")
    wait(driver, "the generation count", lambda d: text(d, "generation-count") == "2")
    assert "computed with Pillow" in text(driver, "demo-note")
    full_page_screenshot(driver, shots / "demo-page.png")
    if target := os.environ.get("COMFY_BRIDGE_SCREENSHOT"):
        shutil.copy(shots / "demo-page.png", target)

    # 2. cancel a running job by closing the socket
    assert "client disconnected" in start_and_cancel(driver, base)

    # 3. the same two runs following the job by polling GET /execution-info
    driver.find_element(By.ID, "use-polling").send_keys(Keys.SPACE)
    assert driver.find_element(By.ID, "use-polling").is_selected()
    choose_workflow(driver, "invert-image", "in-1-image-file")
    check_progress_moved(generate_and_finish(driver, queued_behind=base))
    assert "following by polling" in text(driver, "run-details")
    assert gallery_images(driver) == [384, 384]  # the earlier result is still shown
    assert "interrupted" in start_and_cancel(driver, base)

    wait(driver, "the generation count", lambda d: text(d, "generation-count") == "6", timeout=8)
    driver.find_element(By.ID, "use-polling").send_keys(Keys.SPACE)  # back to the WebSocket

    # 4. text-to-image: the seed matters; blank-canvas: the colour picker
    check_text_to_image(driver)
    check_colour_picker(driver)
    check_players(driver)
    driver.save_screenshot(str(shots / "demo-page-end.png"))
    check_accessible(driver)

    # 5. on a phone, the run's progress is in sight after Generate under the tallest form
    choose_workflow(driver, "text-to-image", "in-3-seed")
    set_value(driver, "in-3-steps", "4")
    driver.execute_script("document.getElementById('generate').scrollIntoView({block: 'center'})")
    generate_and_finish(driver)
    driver.save_screenshot(str(shots / "demo-page-phone.png"))
    favicon = driver.execute_script("return document.querySelector('link[rel=icon]').href")
    with urllib.request.urlopen(favicon, timeout=5) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "image/svg+xml"
    assert console_errors(driver) == []


def api_key_scenario(driver: WebDriver, base: str, shots: Path) -> None:
    """The page asks once for the key, keeps it for the tab, and sends it on fetches and the socket."""
    driver.get(base + "/")
    dialog_open = "return document.getElementById('key-dialog').open"
    wait(driver, "the API-key dialog", lambda d: d.execute_script(dialog_open))
    # declined first: the page says how to give the key later, and a button in the header asks again
    driver.find_element(By.CSS_SELECTOR, "#key-form button[value=cancel]").click()
    wait(driver, "the API-key button", lambda d: d.find_element(By.ID, "key-button").is_displayed())
    assert "Enter API key" in text(driver, "message")
    driver.find_element(By.ID, "key-button").click()
    wait(driver, "the API-key dialog again", lambda d: d.execute_script(dialog_open))
    driver.find_element(By.ID, "api-key").send_keys("wrong", Keys.ENTER)
    wait(driver, "the dialog to ask again", lambda d: "not accepted" in text(d, "key-reason"))
    driver.find_element(By.ID, "api-key").send_keys("demo-secret", Keys.ENTER)
    wait(driver, "the workflow list", lambda d: d.find_element(By.ID, "workflow").is_enabled())
    assert not driver.execute_script(dialog_open)
    assert driver.execute_script("return sessionStorage.getItem('comfy-bridge.api-key')") == "demo-secret"
    choose_workflow(driver, "blank-canvas", "in-1-width")
    driver.find_element(By.ID, "use-polling").click()
    driver.find_element(By.ID, "use-polling").click()  # back to the WebSocket, which needs ?token=
    generate_and_finish(driver)
    assert "following by WebSocket" in text(driver, "run-details")
    assert gallery_images(driver)[0] > 0
    driver.save_screenshot(str(shots / "demo-page-key.png"))
    errors = console_errors(driver, allowed=UNAUTHORIZED)
    driver.refresh()  # the key is kept for the tab: no second question
    wait(driver, "the workflow list after a reload", lambda d: d.find_element(By.ID, "workflow").is_enabled())
    assert not driver.execute_script(dialog_open)
    assert errors + console_errors(driver) == []


async def run_in_browser(scenario: Callable[[WebDriver, str, Path], None], base: str, tmp_path: Path) -> None:
    """Run a scenario in Chromium from a worker thread, so the bridge keeps serving on this loop."""
    def body() -> None:
        driver = start_chromium(tmp_path / "chromium-profile")
        try:
            scenario(driver, base, tmp_path)
        finally:
            driver.quit()
    await asyncio.to_thread(body)


@pytest.mark.sqlite_only("the page's behaviour; the store engines run the same API in the other tests")
async def test_demo_page(bridge_factory, fakes, tmp_path: Path) -> None:
    fake = await fakes(duration=RUN_SECONDS, tick=0.05)
    bridge = await bridge_factory([fake])
    bridge.services.demo = demo_info()  # what --demo sets: the page says the backends are simulated
    await run_in_browser(demo_scenario, bridge.url, tmp_path)
    assert (tmp_path / "demo-page.png").stat().st_size > 10_000
    assert fake.interrupts, "neither cancel reached the backend"
    seeds = [node["inputs"]["seed"] for p in fake.prompts.values() for node in p["prompt"].values()
             if node["class_type"] == "KSampler"]
    assert 2**64 - 1 in seeds  # typed in the page, sent exactly


@pytest.mark.sqlite_only("the page's behaviour; the store engines run the same API in the other tests")
async def test_demo_page_asks_for_the_api_key(bridge_factory, fakes, tmp_path: Path) -> None:
    bridge = await bridge_factory([await fakes(duration=0.3)], api_key="demo-secret")
    await run_in_browser(api_key_scenario, bridge.url, tmp_path)
