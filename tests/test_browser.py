"""The web content in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven
through the DevTools protocol by the ``playwright`` Python package (no downloaded browsers).

Pages are opened from ``file://`` with no server and no network: no console errors, no request
leaves ``file://``, names in several character sets read right, markup from DICOM shows as
text, the interactive viewer steps through the images by keyboard, wheel and slider, and with
scripting off every image is still reachable by links.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat
from playwright import sync_api

from mastering import label
from mastering.webcontent import build, write_files

from .test_webcontent import CHARSET_NAMES, CREATED, HOSTILE, SITE, make_model

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CT = "IHE_PDI/PT000000/ST000000/SE000000/"
IMG = ".pdi-img"


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("medium")
    write_files(build(make_model(), volume=1, volumes=1, site=SITE, created=CREATED), root)
    (root / "LABEL.SVG").write_text(label.label_svg(make_model()[:1], volume=1, volumes=1,
                                                    site=SITE, web=True), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():  # scripts/test installs Debian's chromium: missing is a failure
        pytest.fail("no /usr/bin/chromium: run scripts/test, which installs it")
    with sync_api.sync_playwright() as pw:
        # playwright gives the browser a fresh temporary --user-data-dir of its own
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield chromium
        chromium.close()


class Watched:
    """A page in a fresh context; records console errors, page errors, dialogs and requests
    that leave file:// (which are also blocked)."""

    def __init__(self, browser, *, script: bool = True):
        self.context = browser.new_context(java_script_enabled=script, offline=True,
                                           viewport={"width": 1280, "height": 900})
        self.problems: list[str] = []
        self.context.route(lambda url: not url.startswith("file://"), self._outside)
        self.page = self.context.new_page()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        self.page.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"),
                                          d.dismiss()))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url}"))

    def _outside(self, route) -> None:
        self.problems.append(f"left file://: {route.request.url}")
        route.abort()

    def _console(self, msg) -> None:
        if msg.type in ("error", "warning"):
            self.problems.append(f"console {msg.type}: {msg.text}")

    def open(self, path: Path) -> object:
        self.page.goto(path.as_uri())
        return self.page

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watched(browser) -> Iterator[Watched]:
    w = Watched(browser)
    yield w
    w.close()


def screenshot(target) -> Image.Image:
    return Image.open(io.BytesIO(target.screenshot())).convert("RGB")


def not_blank(img: Image.Image) -> bool:
    return max(hi - lo for lo, hi in ImageStat.Stat(img).extrema) > 100 and len(
        img.getcolors(1 << 20) or ()) > 20


def wait_for_image(page, name: str) -> None:
    page.wait_for_function(
        "n => { const i = document.querySelector('.pdi-img');"
        " return i && i.src.endsWith('/' + n) && i.complete && i.naturalWidth > 0; }",
        arg=name, timeout=5000)


def test_index_page(medium, watched):
    page = watched.open(medium / "INDEX.HTM")
    text = page.inner_text("body")
    for name in CHARSET_NAMES.values():
        assert name in text, name
    assert HOSTILE in text  # shown as text, never run (a dialog would be a problem)
    assert page.locator("script").count() == 0
    thumbs = page.eval_on_selector_all("img", "els => els.map(i => i.naturalWidth)")
    assert thumbs and all(w > 0 for w in thumbs)
    assert not_blank(screenshot(page))
    assert watched.problems == []


def test_viewer_steps_through_the_images(medium, watched):
    page = watched.open(medium / CT / "SERIES.HTM")
    page.wait_for_selector("#viewer.pdi-on")
    wait_for_image(page, "A0000001.JPG")
    stage = page.locator(".pdi-stage")
    first = screenshot(stage)
    assert not_blank(first)
    assert "Äneas, Rüdiger" in stage.inner_text() and "Image 1 of 3" in stage.inner_text()

    page.keyboard.press("ArrowRight")
    wait_for_image(page, "A0000002.JPG")
    assert ImageChops.difference(first, screenshot(stage)).getbbox() is not None
    assert "Image 2 of 3" in stage.inner_text()

    stage.hover()
    page.mouse.wheel(0, 120)
    wait_for_image(page, "A0000003.JPG")
    page.keyboard.press("ArrowUp")
    wait_for_image(page, "A0000002.JPG")

    page.keyboard.press("2")  # the second window preset (Lung)
    wait_for_image(page, "B0000002.JPG")
    assert "Lung" in page.locator(".pdi-br").inner_text()
    page.keyboard.press("End")  # the last image has no lung window: its default JPEG
    wait_for_image(page, "A0000003.JPG")
    page.locator(".pdi-slider").fill("1")
    wait_for_image(page, "B0000001.JPG")
    page.locator("#images a", has_text="2").click()
    wait_for_image(page, "B0000002.JPG")
    assert watched.problems == []


def test_multiframe_series_in_the_viewer(medium, watched):
    page = watched.open(medium / "IHE_PDI/PT000000/ST000000/SE000001/SERIES.HTM")
    wait_for_image(page, "A0000001.JPG")
    page.locator(".pdi-next").click()
    wait_for_image(page, "A0000002.JPG")
    assert "Frame 2/3" in page.locator(".pdi-bl").inner_text()
    assert watched.problems == []


def test_image_pages_follow_the_arrow_keys(medium, watched):
    page = watched.open(medium / CT / "B0000001.HTM")
    page.wait_for_load_state("load")
    with page.expect_navigation():
        page.keyboard.press("ArrowRight")
    assert page.url.endswith("/B0000002.HTM")
    assert page.eval_on_selector("#view", "i => i.naturalWidth") > 0
    assert watched.problems == []


def test_names_in_every_character_set_read_right(medium, watched):
    for n, name in enumerate(CHARSET_NAMES.values()):
        page = watched.open(medium / f"IHE_PDI/PT{n:06d}/ST000000/SE000000/A0000001.HTM")
        assert page.inner_text("#ov-patient").startswith(name)
        assert page.title().startswith(name)
    assert watched.problems == []


def test_every_image_is_reachable_with_scripting_off(medium, browser):
    """Follow links only, from INDEX.HTM, in a context without JavaScript."""
    w = Watched(browser, script=False)
    try:
        seen, todo, images = set(), [medium / "INDEX.HTM"], {}
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            seen.add(path)
            page = w.open(path)
            assert page.locator(".pdi-on").count() == 0  # no viewer without script
            for src, width in page.eval_on_selector_all(
                    "img", "els => els.map(i => [i.src, i.naturalWidth])"):
                images[src] = width
            for href in page.eval_on_selector_all("a[href]", "els => els.map(a => a.href)"):
                target = Path(href.removeprefix("file://").split("#")[0])
                if target.suffix == ".HTM":
                    todo.append(target)
        on_medium = {p.as_uri() for p in (medium / "IHE_PDI").rglob("*.JPG")}
        shown = {src for src in images if not src.endswith("/THUMB.JPG")}
        assert on_medium - {u for u in on_medium if u.endswith("/THUMB.JPG")} <= shown
        assert all(width > 0 for width in images.values())
        assert w.problems == []
    finally:
        w.close()


def test_label_svg_renders(medium, watched):
    page = watched.open(medium / "LABEL.SVG")
    assert not_blank(screenshot(page))
    assert "DICOM PLUS WEB" in page.locator("text.kind").text_content()
    assert watched.problems == []
