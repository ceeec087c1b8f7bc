"""Headless Chromium (Debian's chromium and chromium-driver) driven by Selenium, for
the web page's tests; and the small images those tests upload."""

from __future__ import annotations

import base64
import io
import shutil
import time
from pathlib import Path

from PIL import Image, ImageDraw

INSTALL_HINT = "apt-get install -y chromium chromium-driver"


def chrome(width: int = 1280, height: int = 1000):
    """A headless Chromium. Raises (the test fails, never skips) when the browser or
    its driver is not installed: Selenium would otherwise try to download one."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_exe = shutil.which("chromedriver")
    browser_exe = next(filter(None, (shutil.which(n) for n in
                                     ("chromium", "chromium-browser", "google-chrome"))),
                       None)
    if driver_exe is None or browser_exe is None:
        raise RuntimeError(f"chromium and chromedriver are required ({INSTALL_HINT}); "
                           f"found browser={browser_exe}, driver={driver_exe}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser_exe
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--force-device-scale-factor=1",
                "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(driver_exe))


def face_image(path: Path, size: tuple[int, int] = (96, 96)) -> Path:
    """A face-like drawing (skin oval, eyes, mouth, hair) on a plain background, as PNG."""
    w, h = size
    img = Image.new("RGB", size, (120, 160, 200))
    d = ImageDraw.Draw(img)
    d.ellipse((w * 0.2, h * 0.1, w * 0.8, h * 0.95), fill=(225, 185, 150))
    d.chord((w * 0.2, h * 0.02, w * 0.8, h * 0.5), 180, 360, fill=(70, 45, 25))
    for cx in (0.38, 0.62):
        d.ellipse((w * cx - 4, h * 0.45 - 3, w * cx + 4, h * 0.45 + 3), fill=(40, 40, 60))
    d.arc((w * 0.35, h * 0.6, w * 0.65, h * 0.8), 20, 160, fill=(150, 60, 60), width=2)
    img.save(path, "PNG")
    return path


def mask_image(path: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> Path:
    """A black PNG with a white rectangle (x0, y0, x1, y1, inclusive)."""
    img = Image.new("L", size, 0)
    ImageDraw.Draw(img).rectangle(box, fill=255)
    img.save(path, "PNG")
    return path


def data_url_image(url: str) -> Image.Image:
    header, _, payload = url.partition(",")
    assert header.startswith("data:image/png;base64"), header[:60]
    img = Image.open(io.BytesIO(base64.b64decode(payload)))
    assert img.format == "PNG"
    img.load()
    return img


# Run in the page with execute_async_script: concept `index`'s exported mask as a data URL.
MASK_DATA_URL_JS = """
const [index, done] = arguments;
window.magicface.maskBlob(index).then((blob) => {
  const reader = new FileReader();
  reader.onload = () => done(reader.result);
  reader.onerror = () => done('error: ' + reader.error);
  reader.readAsDataURL(blob);
}, (e) => done('error: ' + e.message));
"""


def wait_until(check, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll `check()` until it returns a truthy value (returned); `check` may raise
    AssertionError to stop early."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def severe_console_errors(driver, ignore: tuple[str, ...] = ()) -> list[str]:
    """The page's JavaScript errors (SEVERE console entries), minus failed loads the
    test caused on purpose (the API's 4xx answers show up as 'Failed to load resource')."""
    out = []
    for entry in driver.get_log("browser"):
        msg = entry.get("message", "")
        if entry.get("level") != "SEVERE" or any(s in msg for s in ignore):
            continue
        out.append(msg)
    return out
