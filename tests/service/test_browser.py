"""The web page (service/static) in headless Chromium against the real stack: a gateway
with API keys on, a worker with the tiny model, Redis and local-folder storage.

Needs Debian's chromium and chromium-driver (.ci/run installs them); without them
these tests fail, they do not skip."""

from __future__ import annotations

import re

import numpy as np
import pytest
import redis
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from ..helpers.browser import (
    MASK_DATA_URL_JS,
    chrome,
    data_url_image,
    face_image,
    mask_image,
    severe_console_errors,
    wait_until,
)
from ..helpers.stack import ROOT, Stack

pytestmark = pytest.mark.slow

KEY = "browser-key"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
# What a 4xx answer the test asks for leaves in the console.
EXPECTED_FAILED_LOADS = ("Failed to load resource",)
MAX_BYTES = 450_000
MAX_PIXELS = 200_000


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    r = redis.Redis.from_url(redis_server)
    r.flushdb()
    tmp = tmp_path_factory.mktemp("browser")
    s = Stack({"REDIS_URL": redis_server, "STORAGE_URL": f"file://{tmp / 'store'}",
               "API_KEYS": KEY, "MASK_FACES": "true",
               # Low, for the page's checks before upload; above every other test's
               # uploads (the largest, a 300x451 photo, is 135300 px, ~220 KB).
               "MAX_IMAGE_BYTES": str(MAX_BYTES), "MAX_IMAGE_PIXELS": str(MAX_PIXELS)},
              tmp / "logs")
    try:
        s.start_gateway()
        s.start_worker(wait=False)  # it loads its model while the first tests run
        yield s
    finally:
        s.stop()
        r.flushdb()


@pytest.fixture(scope="module")
def browser(stack):  # on the stack: the browser closes its connections before it stops
    driver = chrome()
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, stack):
    """The page, fresh: nothing kept from an earlier test in this tab."""
    browser.get(stack.base_url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(stack.base_url + "/")
    wait_until(lambda: browser.execute_script("return !!window.magicface"), 10,
               what="app.js to load")
    browser.get_log("browser")  # start the console log afresh
    return browser


# -- driving the page ---------------------------------------------------------------------

def _type(driver, css: str, text: str) -> None:
    el = driver.find_element(By.CSS_SELECTOR, css)
    el.clear()
    el.send_keys(text)


def _add_concept(driver):
    driver.find_element(By.ID, "add-concept").click()
    return driver.find_elements(By.CSS_SELECTOR, "#concepts .concept")[-1]


def _upload_image(driver, concept, path) -> None:
    concept.find_element(By.CSS_SELECTOR, ".concept-image-input").send_keys(str(path))
    canvas = concept.find_element(By.CSS_SELECTOR, ".mask-canvas")
    wait_until(lambda: driver.execute_script(
        "const c = arguments[0]; const img = c.parentElement.querySelector('img');"
        "return img.naturalWidth > 0 && c.width === img.naturalWidth"
        " && c.getBoundingClientRect().width > 0", canvas), 10, what="the mask editor")


def _drag(driver, canvas, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Drag across the canvas; points are fractions of its on-screen size from its
    centre (-0.5 .. 0.5)."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    w, h = canvas.size["width"], canvas.size["height"]
    x0, y0 = round(start[0] * w), round(start[1] * h)
    x1, y1 = round(end[0] * w), round(end[1] * h)
    chain = ActionChains(driver).move_to_element_with_offset(canvas, x0, y0).click_and_hold()
    steps = 6
    for i in range(1, steps + 1):
        chain.move_to_element_with_offset(canvas, x0 + (x1 - x0) * i // steps,
                                          y0 + (y1 - y0) * i // steps)
    chain.release().perform()


def _export_mask(driver, index: int = 0) -> np.ndarray:
    url = driver.execute_async_script(MASK_DATA_URL_JS, index)
    assert url.startswith("data:"), url
    img = data_url_image(url)
    return img


def _error_text(driver) -> str:
    return driver.execute_script(
        "const e = document.getElementById('error'); return e.hidden ? '' : e.textContent")


def _record_progress(driver) -> None:
    """From now on, window.progressLog lists every text #progress-text shows."""
    driver.execute_script("""
        const el = document.getElementById('progress-text');
        window.progressLog = [];
        new MutationObserver(() => {
          const t = el.textContent;
          if (t && window.progressLog.at(-1) !== t) window.progressLog.push(t);
        }).observe(el, {childList: true, characterData: true, subtree: true});""")


def _fill_job(driver, tmp_path, params: dict[str, str]):
    """Key, prompt, one concept (a face, a stroke across it, the word "man"), params."""
    _type(driver, "#api-key", KEY)
    _type(driver, "#prompt", "a photo of a man")
    concept = _add_concept(driver)
    _upload_image(driver, concept, face_image(tmp_path / "face.png", (96, 96)))
    _drag(driver, concept.find_element(By.CSS_SELECTOR, ".mask-canvas"), (-0.3, 0), (0.3, 0))
    Select(concept.find_element(By.CSS_SELECTOR, ".word-select")).select_by_visible_text("man")
    driver.find_element(By.CSS_SELECTOR, "#advanced summary").click()
    for field, value in params.items():
        _type(driver, f"#{field}", value)


def _submit_and_wait_for_error(driver) -> str:
    driver.execute_script("document.getElementById('error').hidden = true")
    driver.find_element(By.ID, "submit").click()
    return wait_until(lambda: _error_text(driver), 20, what="#error")


# Run in the page: from now on window.posts lists the URL of every POST it makes.
COUNT_POSTS_JS = """
const realFetch = window.fetch;
window.posts = [];
window.fetch = (url, opts = {}) => {
  if (String(opts.method || 'GET').toUpperCase() === 'POST') window.posts.push(String(url));
  return realFetch(url, opts);
};"""


def _noise_png(path, size: tuple[int, int]):
    """Random pixels: a PNG about as large as the raw pixels (3 bytes each)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _flat_png(path, size: tuple[int, int], color=(250, 250, 250)):
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return path


# -- tests --------------------------------------------------------------------------------

def test_mask_is_the_stroke_at_the_image_natural_size(page, tmp_path):
    driver = page
    ref = face_image(tmp_path / "face.png", (120, 80))
    _type(driver, "#prompt", "a photo of a man")
    concept = _add_concept(driver)
    _upload_image(driver, concept, ref)
    canvas = concept.find_element(By.CSS_SELECTOR, ".mask-canvas")
    shown = canvas.size
    # Shown larger than the photo: the mask must still come out at 120x80.
    assert shown["width"] > 200 and abs(shown["width"] / shown["height"] - 1.5) < 0.02, shown

    # A horizontal stroke across the middle, from 20% to 80% of the width.
    _drag(driver, canvas, (-0.3, 0.0), (0.3, 0.0))
    mask = _export_mask(driver)
    assert mask.size == (120, 80)
    a = np.asarray(mask.convert("L"))
    assert set(np.unique(a)) <= {0, 255}, np.unique(a)
    assert (a[40, 30:90] == 255).all(), a[40]
    white_rows = np.flatnonzero((a == 255).any(axis=1))
    white_cols = np.flatnonzero((a == 255).any(axis=0))
    assert 30 <= white_rows.min() and white_rows.max() <= 50, white_rows
    assert 16 <= white_cols.min() <= 26 and 94 <= white_cols.max() <= 104, white_cols
    assert (a == 255).sum() < 0.2 * a.size

    # The eraser takes paint off; "Clear mask" takes all of it.
    concept.find_element(By.CSS_SELECTOR, ".tool-eraser").click()
    _drag(driver, canvas, (0.0, -0.2), (0.0, 0.2))
    a = np.asarray(_export_mask(driver).convert("L"))
    assert (a[38:43, 58:63] == 0).all() and (a[40, 30:45] == 255).all()
    concept.find_element(By.CSS_SELECTOR, ".clear-mask").click()
    a = np.asarray(_export_mask(driver).convert("L"))
    assert a.shape == (80, 120) and (a == 0).all()

    # An uploaded mask file is the mask too (and can be painted over).
    m = mask_image(tmp_path / "mask.png", (120, 80), (10, 10, 29, 29))
    concept.find_element(By.CSS_SELECTOR, ".concept-mask-input").send_keys(str(m))
    wait_until(lambda: concept.find_element(By.CSS_SELECTOR, ".mask-note").text, 10,
               what="the mask note")
    a = np.asarray(_export_mask(driver).convert("L"))
    expected = np.zeros((80, 120), np.uint8)
    expected[10:30, 10:30] = 255
    assert (a == expected).all()
    assert severe_console_errors(driver) == []


def test_server_errors_are_shown(page, tmp_path):
    driver = page
    _type(driver, "#api-key", "wrong-key")
    _type(driver, "#prompt", "a photo of a man")
    concept = _add_concept(driver)
    Select(concept.find_element(By.CSS_SELECTOR, ".word-select")).select_by_visible_text("man")

    # A wrong key: the server's 401 message.
    assert "Authorization: Bearer" in _submit_and_wait_for_error(driver)

    # No image: the message names the missing field.
    _type(driver, "#api-key", KEY)
    msg = _submit_and_wait_for_error(driver)
    assert msg.startswith("images"), msg

    # The chosen word no longer in the prompt: kept (and marked) in the list, and the
    # server names the concept's word.
    _upload_image(driver, concept, face_image(tmp_path / "face.png"))
    _drag(driver, concept.find_element(By.CSS_SELECTOR, ".mask-canvas"), (-0.2, 0), (0.2, 0))
    _type(driver, "#prompt", "a photo of a woman")
    select = Select(concept.find_element(By.CSS_SELECTOR, ".word-select"))
    assert select.first_selected_option.text == "man (not in the prompt)"
    assert "woman" in [o.text for o in select.options]
    msg = _submit_and_wait_for_error(driver)
    assert "concepts[0].word" in msg and "does not occur in the prompt" in msg, msg
    assert driver.find_element(By.ID, "submit").is_enabled()
    assert severe_console_errors(driver, EXPECTED_FAILED_LOADS) == []


def test_auto_mask_fills_the_canvas_with_the_proposal(page, stack, tmp_path):
    """The "Auto mask" button: the worker's proposal for the chosen word lands on the
    canvas (still editable); nothing found is said in the mask note."""
    from PIL import Image
    from skimage import data as samples

    driver = page
    stack.wait_ready()
    photo = tmp_path / "woman.png"
    Image.fromarray(samples.astronaut()[::2, ::2]).save(photo)  # 256x256, a real face
    _type(driver, "#api-key", KEY)
    _type(driver, "#prompt", "a photo of a woman")
    concept = _add_concept(driver)
    _upload_image(driver, concept, photo)
    note = concept.find_element(By.CSS_SELECTOR, ".mask-note")
    concept.find_element(By.CSS_SELECTOR, ".auto-mask").click()
    assert "Choose the word first" in wait_until(lambda: note.text, 10, what="the note")
    Select(concept.find_element(By.CSS_SELECTOR, ".word-select")).select_by_visible_text(
        "woman")
    concept.find_element(By.CSS_SELECTOR, ".auto-mask").click()
    text = wait_until(lambda: note.text if "Proposed" in note.text else "", 60,
                      what="the proposal")
    assert "face+ellipse" in text, text
    mask = np.asarray(_export_mask(driver).convert("L")) > 127
    assert mask.shape == (256, 256)
    rows = np.nonzero(mask.any(axis=1))[0]
    assert 0.02 * mask.size < mask.sum() < 0.5 * mask.size and rows.mean() < 128
    # A cat is not a woman: the mask note says so.
    cat = tmp_path / "cat.png"
    Image.fromarray(samples.chelsea()).save(cat)
    _upload_image(driver, concept, cat)
    concept.find_element(By.CSS_SELECTOR, ".auto-mask").click()
    text = wait_until(lambda: note.text if "found" in note.text else "", 60,
                      what="the not-found note")
    assert "no 'woman' found" in text, text
    assert severe_console_errors(driver) == []


SMALL_JOB = {"steps": "4", "width": "64", "height": "64", "seed": "7"}


def test_auto_mask_then_edit_then_submit(page, stack, tmp_path):
    """The whole path a user takes: Auto mask, an eraser stroke across the proposal,
    submit; the job runs with the edited mask."""
    from PIL import Image
    from skimage import data as samples

    driver = page
    stack.wait_ready()
    photo = tmp_path / "woman.png"
    Image.fromarray(samples.astronaut()[::2, ::2]).save(photo)
    _type(driver, "#api-key", KEY)
    _type(driver, "#prompt", "a photo of a woman")
    concept = _add_concept(driver)
    _upload_image(driver, concept, photo)
    Select(concept.find_element(By.CSS_SELECTOR, ".word-select")).select_by_visible_text(
        "woman")
    note = concept.find_element(By.CSS_SELECTOR, ".mask-note")
    concept.find_element(By.CSS_SELECTOR, ".auto-mask").click()
    wait_until(lambda: "Proposed" in note.text, 60, what="the proposal")
    proposed = np.asarray(_export_mask(driver).convert("L")) > 127
    concept.find_element(By.CSS_SELECTOR, ".tool-eraser").click()
    # Across the upper part of the photo, where the proposal lies.
    _drag(driver, concept.find_element(By.CSS_SELECTOR, ".mask-canvas"), (-0.45, -0.3),
          (0.45, -0.3))
    edited = np.asarray(_export_mask(driver).convert("L")) > 127
    assert edited.sum() < proposed.sum() and not (edited & ~proposed).any()
    driver.find_element(By.CSS_SELECTOR, "#advanced summary").click()
    for field, value in SMALL_JOB.items():
        _type(driver, f"#{field}", value)
    driver.find_element(By.ID, "submit").click()
    wait_until(lambda: driver.execute_script(
        "const img = document.getElementById('result-image');"
        "return img.complete && img.naturalWidth === 64") or _error_text(driver), 120,
        what="the result")
    assert _error_text(driver) == ""
    assert severe_console_errors(driver) == []


# Run in the page before submitting: the first /events connection is cut (a network
# error) right after its first event; window.eventsRequests lists each connection's
# Last-Event-ID header.
DROP_FIRST_STREAM_JS = r"""
const realFetch = window.fetch;
window.eventsRequests = [];
window.fetch = async (url, opts = {}) => {
  const resp = await realFetch(url, opts);
  if (!String(url).endsWith('/events')) return resp;
  window.eventsRequests.push(new Headers(opts.headers || {}).get('Last-Event-ID'));
  if (window.eventsRequests.length > 1) return resp;
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let seen = '', cut = false;
  const body = new ReadableStream({
    async pull(ctrl) {
      if (cut) {
        reader.cancel();
        ctrl.error(new TypeError('network error (cut by the test)'));
        return;
      }
      const {value, done} = await reader.read();
      if (done) { ctrl.close(); return; }
      seen += decoder.decode(value, {stream: true});
      cut = /(^|\n)id:/.test(seen) && seen.endsWith('\n\n');
      ctrl.enqueue(value);
    },
  });
  return new Response(body, {status: resp.status, headers: resp.headers});
};"""

# Run in the page before submitting: /events answers 404 (a server without it).
NO_EVENTS_JS = """
const realFetch = window.fetch;
window.fetch = (url, opts) => String(url).endsWith('/events')
  ? Promise.resolve(new Response('{"error": {"code": "not_found", "message": "Not Found"}}',
                                 {status: 404, headers: {'content-type': 'application/json'}}))
  : realFetch(url, opts);"""


def _wait_for_result(driver, stack) -> dict:
    """Wait for the image, the semantic map and the legend; the page's state then."""
    def done():
        if err := _error_text(driver):
            raise AssertionError(f"the page shows an error: {err}\n{stack.log('gateway')}")
        return driver.execute_script("""
            const img = document.getElementById('result-image');
            const map = document.getElementById('semantic-map');
            const legend = document.getElementById('legend').textContent;
            return img.complete && img.naturalWidth > 0 && map.complete
                && map.naturalWidth > 0 && legend.includes('man');""")

    wait_until(done, 120, interval=0.25, what="the result on the page")
    return driver.execute_script("""
        const p = document.getElementById('progress');
        return {value: p.value, transport: p.dataset.transport, status: p.dataset.status,
                text: document.getElementById('progress-text').textContent,
                image: document.getElementById('result-image').naturalWidth,
                map: document.getElementById('semantic-map').naturalWidth,
                words: [...document.querySelectorAll('#legend li')].map(li => li.textContent),
                swatch: getComputedStyle(document.querySelector('#legend .swatch'))
                          .backgroundColor,
                cancel: document.getElementById('cancel').disabled,
                progressLog: window.progressLog};""")


def _assert_finished(state: dict) -> None:
    assert state["value"] == 100 and "100%" in state["text"], state
    assert state["status"] == "succeeded" and state["text"].startswith("Done"), state
    assert state["image"] == 64 and state["map"] == 64, state
    assert state["words"] == ["man"], state
    assert state["swatch"] not in ("", "rgba(0, 0, 0, 0)"), state
    assert state["cancel"] is True, state
    # The page showed the progress as it went, never going back.
    log = state["progressLog"]
    assert len(log) >= 2 and log[-1] == state["text"], log
    percents = [int(t.split("%")[0].split()[-1]) for t in log]
    assert percents == sorted(percents), log


DOWNLOAD_JS = """
const done = arguments[0];
const a = document.getElementById('download');
fetch(a.href).then((r) => r.blob()).then(
  (b) => done({href: a.href, name: a.download, hidden: a.hidden, type: b.type, size: b.size}),
  (e) => done({error: String(e)}));"""


def _assert_download_and_history(driver, stack) -> None:
    """The result's download link (a blob of the image, fetched with the key), its job
    id and seed; the key's recent jobs list it, with a thumbnail, and a click shows it."""
    import httpx

    job_id = driver.find_element(By.ID, "result-id").text
    assert re.fullmatch(r"[0-9a-f]{32}", job_id), job_id
    seed = wait_until(lambda: driver.find_element(By.ID, "result-seed").text, 10,
                      what="the seed")
    assert seed == SMALL_JOB["seed"], seed
    link = driver.execute_async_script(DOWNLOAD_JS)
    image = httpx.get(f"{stack.base_url}/v1/jobs/{job_id}/image",
                      headers={"Authorization": f"Bearer {KEY}"})
    assert link["href"].startswith("blob:") and not link["hidden"], link
    assert link["name"] == f"magicface-{job_id}.png", link
    assert link["type"] == "image/png" and link["size"] == len(image.content), link

    item_css = f'#history-list li[data-id="{job_id}"]'
    wait_until(lambda: driver.execute_script(
        "const li = document.querySelector(arguments[0]);"
        "return li && li.querySelector('img').naturalWidth === 64", item_css), 20,
        what="the job's thumbnail in the recent jobs")
    item = driver.find_element(By.CSS_SELECTOR, item_css)
    assert item.find_element(By.CSS_SELECTOR, ".history-status").text == "Done"
    assert item.find_element(By.CSS_SELECTOR, "time").text
    assert driver.find_element(By.CSS_SELECTOR, "#history-list li").get_attribute(
        "data-id") == job_id  # newest first
    before = driver.find_element(By.ID, "result-image").get_attribute("src")
    item.find_element(By.CSS_SELECTOR, "button").click()
    wait_until(lambda: driver.execute_script(
        "const img = document.getElementById('result-image');"
        "return img.src && img.src !== arguments[0] && img.complete && img.naturalWidth === 64"
        " && document.getElementById('result-id').textContent === arguments[1]",
        before, job_id), 20, what="the job shown again from the list")


def test_job_from_the_page_to_the_result(page, stack, tmp_path):
    driver = page
    _fill_job(driver, tmp_path, SMALL_JOB)
    stack.wait_ready(timeout=120)
    _record_progress(driver)
    driver.find_element(By.ID, "submit").click()
    state = _wait_for_result(driver, stack)
    _assert_finished(state)
    # The progress came over the event stream, not the polling fallback.
    assert state["transport"] == "events", state
    _assert_download_and_history(driver, stack)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "result.png"
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.save_screenshot(str(shot))
    assert shot.is_file() and shot.stat().st_size > 0
    assert severe_console_errors(driver) == []


def test_dropped_event_stream_resumes_from_the_last_event(page, stack, tmp_path):
    driver = page
    _fill_job(driver, tmp_path, SMALL_JOB | {"seed": "8"})
    stack.wait_ready(timeout=120)
    driver.execute_script(DROP_FIRST_STREAM_JS)
    _record_progress(driver)
    driver.find_element(By.ID, "submit").click()
    state = _wait_for_result(driver, stack)
    _assert_finished(state)
    assert state["transport"] == "events", state
    first, *again = driver.execute_script("return window.eventsRequests")
    assert first is None and again, [first, *again]
    assert re.fullmatch(r"\d+-\d+", again[0]), again


def test_without_an_event_stream_the_page_polls(page, stack, tmp_path):
    driver = page
    _fill_job(driver, tmp_path, SMALL_JOB | {"seed": "9"})
    stack.wait_ready(timeout=120)
    driver.execute_script(NO_EVENTS_JS)
    _record_progress(driver)
    driver.find_element(By.ID, "submit").click()
    state = _wait_for_result(driver, stack)
    _assert_finished(state)
    assert state["transport"] == "polling", state


def test_cancel_a_running_job(page, stack, tmp_path):
    driver = page
    # Long enough on a CPU to be caught mid-run.
    _fill_job(driver, tmp_path, {"steps": "100", "width": "256", "height": "256"})
    stack.wait_ready(timeout=120)
    _record_progress(driver)
    driver.find_element(By.ID, "submit").click()
    cancel = driver.find_element(By.ID, "cancel")

    def running():
        if err := _error_text(driver):
            raise AssertionError(f"the page shows an error: {err}")
        text = driver.find_element(By.ID, "progress-text").text
        return text.startswith("Running") and "step 0/" not in text

    wait_until(running, 60, what="the job to run")
    assert cancel.is_enabled()
    cancel.click()
    wait_until(lambda: driver.find_element(By.ID, "progress-text").text.startswith("Canceled"),
               60, what="the job to be canceled")
    log = driver.execute_script("return window.progressLog")
    assert any(t.startswith("Cancel requested") for t in log), log
    assert _error_text(driver) == ""
    assert not cancel.is_enabled() and driver.find_element(By.ID, "submit").is_enabled()
    assert not driver.find_element(By.ID, "result").is_displayed()
    value = driver.execute_script("return document.getElementById('progress').value")
    assert value < 100
    assert severe_console_errors(driver) == []


def test_mask_paint_is_tinted_on_a_light_photo(page, tmp_path):
    """White paint vanished on a light photo: the canvas shows it in a saturated colour,
    see-through; the exported mask stays black and white."""
    driver = page
    _type(driver, "#prompt", "a photo of a man")
    concept = _add_concept(driver)
    _upload_image(driver, concept, _flat_png(tmp_path / "light.png", (120, 80)))
    canvas = concept.find_element(By.CSS_SELECTOR, ".mask-canvas")
    _drag(driver, canvas, (-0.3, 0.0), (0.3, 0.0))
    shown = driver.execute_script("""
        const c = arguments[0];
        return {pixel: [...c.getContext('2d').getImageData(60, 40, 1, 1).data],
                blank: [...c.getContext('2d').getImageData(60, 5, 1, 1).data],
                opacity: Number(getComputedStyle(c).opacity)};""", canvas)
    r, g, b, a = shown["pixel"]
    assert a == 255 and (r, g, b) != (255, 255, 255), shown
    assert max(r, g, b) - min(r, g, b) >= 150, shown  # saturated, not a grey
    assert shown["blank"][3] == 0 and 0.3 <= shown["opacity"] < 1, shown
    mask = np.asarray(_export_mask(driver).convert("RGB"))
    assert set(np.unique(mask)) <= {0, 255} and (mask[40, 60] == 255).all()
    assert (mask[5, 60] == 0).all()
    assert severe_console_errors(driver) == []


def test_checks_before_upload_are_instant(page, stack, tmp_path):
    """What the server would refuse (after an upload, for a big photo) is said at once,
    in the server's words, naming the field both ways; nothing is posted. A server
    error about a concept's field names and marks that concept's row."""
    import httpx

    driver = page
    wait_until(lambda: driver.execute_script("return window.magicface.limitsKnown()"), 10,
               what="the server's limits")
    driver.execute_script(COUNT_POSTS_JS)
    _type(driver, "#api-key", KEY)
    _type(driver, "#prompt", "a photo of a man with a hat")
    rows = [_add_concept(driver) for _ in range(5)]
    assert _submit_and_wait_for_error(driver) == "concepts: too many concepts: at most 4, got 5"

    for row in rows[2:]:
        row.find_element(By.CSS_SELECTOR, ".remove-concept").click()
    man, hat = rows[:2]
    Select(man.find_element(By.CSS_SELECTOR, ".word-select")).select_by_visible_text("man")
    Select(hat.find_element(By.CSS_SELECTOR, ".word-select")).select_by_visible_text("hat")
    big = _noise_png(tmp_path / "big.png", (440, 440))  # under the pixels, over the bytes
    assert big.stat().st_size > MAX_BYTES and 440 * 440 < MAX_PIXELS
    _upload_image(driver, man, big)
    _upload_image(driver, hat, face_image(tmp_path / "hat.png"))
    man.find_element(By.CSS_SELECTOR, ".weight-input").send_keys("30")
    _type(driver, "#prompt", "a photo of a man")
    driver.find_element(By.CSS_SELECTOR, "#advanced summary").click()
    _type(driver, "#steps", "500")
    _type(driver, "#width", "100")
    started = driver.execute_script("return performance.now()")
    lines = _submit_and_wait_for_error(driver).split("\n")
    took = driver.execute_script("return performance.now()") - started
    word_line = "Concept 2 (concepts[1].word): concept word 'hat' does not occur in the prompt"
    assert lines == [
        "Concept 1 (concepts[0].weight) must be in (0, 20], got 30",
        word_line,
        "Steps (params.steps): Input should be less than or equal to 200",
        "Width (params.width): Input should be a multiple of 8",
        f"Concept 1 (images[0]): {big.stat().st_size} bytes exceeds the {MAX_BYTES}-byte limit",
    ], lines
    assert took < 3000, took
    marked = driver.execute_script(
        "return [...document.querySelectorAll('.has-problem')].map(e => e.id || e.className)")
    assert sum("concept" in m for m in marked) == 2 and "steps" in marked, marked
    # The server says the same of the word.
    face = face_image(tmp_path / "face.png").read_bytes()
    resp = httpx.post(stack.base_url + "/v1/jobs", headers={"Authorization": f"Bearer {KEY}"},
                      data={"prompt": "a photo of a man",
                            "concepts": '[{"word": "man"}, {"word": "hat"}]'},
                      files=[("images", ("a.png", face)), ("images", ("b.png", face))])
    server = resp.json()["error"]["message"]
    assert resp.status_code == 422 and word_line == "Concept 2 (concepts[1].word)" + server[
        len("concepts[1].word"):], server

    # Fixed but the photo has too many pixels (its bytes are few).
    man.find_element(By.CSS_SELECTOR, ".weight-input").clear()
    _type(driver, "#steps", "4")
    _type(driver, "#width", "64")
    _type(driver, "#prompt", "a photo of a man with a hat")
    _upload_image(driver, man, _flat_png(tmp_path / "wide.png", (600, 400)))
    msg = _submit_and_wait_for_error(driver)
    assert msg == f"Concept 1 (images[0]): 600x400 exceeds the {MAX_PIXELS}-pixel limit", msg
    assert driver.execute_script("return window.posts") == []

    # What only the server finds (a file the browser cannot decode either) names and
    # marks the row too; no mask is required (the server proposes them).
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    man.find_element(By.CSS_SELECTOR, ".concept-image-input").send_keys(str(broken))
    wait_until(lambda: "cannot be shown" in man.find_element(By.CSS_SELECTOR, ".mask-note").text,
               10, what="the note on the broken image")
    msg = _submit_and_wait_for_error(driver)
    assert msg.startswith("Concept 1 (images[0]): not a decodable"), msg
    assert "has-problem" in man.get_attribute("class")
    assert "has-problem" not in hat.get_attribute("class")
    assert driver.execute_script("return window.posts") == ["v1/jobs"]
    assert severe_console_errors(driver, EXPECTED_FAILED_LOADS) == []


def test_without_the_limits_the_server_checks(page, stack):
    """GET /v1/limits failing: the page checks nothing itself and the server answers."""
    driver = page
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/limits"]})
    try:
        driver.get(stack.base_url + "/")
        wait_until(lambda: driver.execute_script("return !!window.magicface"), 10,
                   what="app.js to load")
        driver.execute_script(COUNT_POSTS_JS)
        _type(driver, "#api-key", KEY)
        _type(driver, "#prompt", "a photo of a man")
        for _ in range(5):
            _add_concept(driver)
        msg = _submit_and_wait_for_error(driver)  # no images: the server's first complaint
        assert msg.startswith("images"), msg
        assert driver.execute_script("return window.posts") == ["v1/jobs"]
        assert not driver.execute_script("return window.magicface.limitsKnown()")
    finally:
        driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
    assert severe_console_errors(driver, EXPECTED_FAILED_LOADS) == []
