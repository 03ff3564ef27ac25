"""The web page in a real headless browser (Debian's chromium through Playwright).

Skipped, with the reason printed, only where /usr/bin/chromium is not installed; CI installs it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from chextrain.inference import Predictor
from chextrain.serve.app import create_app
from tests.conftest import demo_files, running_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def page(routed_bundle: Path) -> Iterator:
    """A chromium page on the real server (uvicorn on a free loopback port), phone-sized."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is not installed (apt-get install chromium): the browser test cannot run"
        print(reason)
        pytest.skip(reason)
    app = create_app(Predictor.from_bundle(routed_bundle))
    with running_server(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            phone = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
            context = browser.new_context(**phone)
            tab = context.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda err: errors.append(str(err)))
            tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            tab.goto(url)
            tab.errors = errors
            yield tab
        finally:
            browser.close()


def test_upload_a_phone_photo_shows_findings_and_heatmaps(page, use_demo: Path) -> None:
    photo = demo_files(use_demo, "natural", "valid")[0]
    assert page.get_attribute("#camera", "capture") == "environment"
    page.set_input_files("#file", str(photo))
    expect(page.locator("#heatmaps img")).to_have_count(5, timeout=60_000)  # the CSP forbids eval
    bars = page.locator("#bars li")
    assert bars.count() == 5
    names = [bars.nth(i).locator(".label span").first.inner_text() for i in range(5)]
    assert names == ["Pleural Effusion", "Edema", "Atelectasis", "Consolidation", "Cardiomegaly"]
    for i in range(5):
        assert re.fullmatch(r"\d{1,3}\.\d%( \(positive\))?", bars.nth(i).locator(".prob").inner_text())
        assert bars.nth(i).locator(".threshold").get_attribute("style").startswith("left:")
    assert "Head used: photo" in page.inner_text("#route")
    assert page.locator("#result").is_visible() and page.locator("#preview").is_visible()
    heatmaps = page.locator("#heatmaps img")
    for i in range(5):  # decoded images: the browser knows their size
        assert heatmaps.nth(i).evaluate("img => img.complete && img.naturalWidth") > 0
    assert page.inner_text("#status") == "Done."
    assert not page.errors


def test_a_document_raises_the_warning_and_a_text_file_an_error(page, tmp_path: Path) -> None:
    doc = np.full((160, 120), 240, np.uint8)
    doc[10:150:9, 10:110] = 20
    buf = io.BytesIO()
    Image.fromarray(doc).save(buf, format="PNG")
    page.set_input_files(
        "#file", files=[{"name": "letter.png", "mimeType": "image/png", "buffer": buf.getvalue()}]
    )
    expect(page.locator("#heatmaps img")).to_have_count(5, timeout=60_000)
    warning = page.locator("#ood")
    assert warning.is_visible() and "Warning" in warning.inner_text()
    assert "does not look like" in warning.inner_text()
    withheld = page.locator("#withheld")  # the findings greyed out under the reason
    assert withheld.is_visible() and withheld.inner_text().startswith("Not scored: out-of-distribution")
    assert "withheld" in page.get_attribute("#bars", "class")
    assert page.locator("#bars li.withheld").count() == 5 and page.locator("#bars li.positive").count() == 0
    assert "(positive)" not in page.inner_text("#bars")
    assert page.locator("#bars").evaluate("ul => getComputedStyle(ul).opacity") == "0.45"
    page.set_input_files(
        "#file", files=[{"name": "x.jpg", "mimeType": "image/jpeg", "buffer": b"plain text" * 9}]
    )
    expect(page.locator("#error")).to_be_visible(timeout=30_000)
    assert "not an image" in page.inner_text("#error")
    assert not page.locator("#result").is_visible()
