"""The page in a real browser: Debian's Chromium, headless, driven by Playwright (never its own download).

Skipped, saying how to install it, when Chromium or the playwright package is missing; .ci/run
installs Chromium so CI runs it for real. Screenshots land in results/screenshots/.
"""
import base64
import os
import shutil

import pytest

from tests.conftest import ROOT, copy_gallery
from tests.test_serve import start_server

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the Python driver only)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found: apt-get install chromium "
                                "(Debian/Ubuntu), or set CHROMIUM=/path/to/chrome; never `playwright install`")

DROP = """([name, type, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, {type}));
  document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
}"""


@pytest.fixture(scope="module")
def page(model_path, test_images, tiny_run, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("browser")
    gallery = copy_gallery(test_images[:12], tmp_path / "gallery")
    process, url = start_server(model_path, gallery, tiny_run, tmp_path)
    try:  # a browser that fails to start or load must not leave the server running
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            tab = browser.new_page(viewport={"width": 1200, "height": 900})
            tab.goto(url + "/")
            tab.wait_for_function("document.querySelectorAll('#gallery img').length === 12")
            yield tab, gallery
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)


def screenshot(tab, name):
    folder = ROOT / "results" / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    tab.wait_for_function("[...document.images].every((img) => img.complete)")
    tab.screenshot(path=str(folder / name))


def test_upload_through_the_page_shows_the_top_hit_and_scores(page):
    tab, gallery = page
    assert "resnet18" in tab.inner_text("#meta") and "test P@1" in tab.inner_text("#meta")
    query = sorted(gallery.rglob("*.jpg"))[6]
    tab.set_input_files("#picker", str(query))
    tab.wait_for_selector(".result")
    cards = tab.query_selector_all(".result")
    assert len(cards) == 4
    assert cards[0].query_selector(".path").inner_text() == query.relative_to(gallery).as_posix()
    scores = [float(card.query_selector(".score").inner_text().split()[1]) for card in cards]
    assert scores[0] == pytest.approx(1.0, abs=1e-3) and scores == sorted(scores, reverse=True)
    assert "top match" in tab.inner_text("#message")
    screenshot(tab, "search.png")


def test_dropping_a_non_image_shows_the_servers_message(page):
    tab, gallery = page
    tab.evaluate(DROP, ["notes.jpg", "image/jpeg", base64.b64encode(b"not an image").decode()])
    tab.wait_for_selector("#message.error")
    assert "not an image" in tab.inner_text("#message")
    dropped = sorted(gallery.rglob("*.jpg"))[2]  # and the page still searches afterwards
    tab.evaluate(DROP, [dropped.name, "image/jpeg", base64.b64encode(dropped.read_bytes()).decode()])
    tab.wait_for_function("document.getElementById('message').textContent.startsWith('top match')")
    assert tab.query_selector(".result .path").inner_text() == dropped.relative_to(gallery).as_posix()


def test_clicking_a_gallery_image_queries_it(page):
    tab, gallery = page
    tab.click("#gallery img:nth-child(3)")
    tab.wait_for_function("document.querySelector('#query .card .path')?.textContent === "
                          f"{sorted(gallery.rglob('*.jpg'))[2].relative_to(gallery).as_posix()!r}")
    paths = [card.query_selector(".path").inner_text() for card in tab.query_selector_all(".result")]
    assert len(paths) == 4 and sorted(gallery.rglob("*.jpg"))[2].relative_to(gallery).as_posix() not in paths


def test_browse_view_marks_neighbours(page):
    tab, _ = page
    tab.click("#tab-browse")
    tab.wait_for_selector(".browse-result")
    cards = tab.query_selector_all(".browse-result")
    assert len(cards) == 4
    marks = [card.get_attribute("class") for card in cards]
    right = sum("correct" in m.split() for m in marks)
    assert all(("correct" in m.split()) != ("incorrect" in m.split()) for m in marks)
    assert tab.inner_text("#browse-summary").startswith(f"{right} of 4 neighbours share the class")
    screenshot(tab, "browse.png")
