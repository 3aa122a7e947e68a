"""A real headless browser (Debian chromium driven by Playwright) opens the demo page, starts a comparison and
checks that both videos and the latency figures appear; it saves a screenshot.

Set ``DIFFATTN_SCREENSHOT=docs/demo.png`` to write the screenshot there (docs/demo.md's picture comes from
this test); otherwise it goes to the test's temporary folder. Playwright only drives the system chromium
(``executable_path``); it never downloads a browser.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from diffusers_attn._env import env_var

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url():
    pytest.importorskip("gradio")
    from diffusers_attn.demo import DemoRunner, build_demo

    port = _free_port()
    demo = build_demo(DemoRunner(device="cpu"))
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the [dev] extra)")
    if not os.path.isfile(CHROMIUM) or not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium executable at {CHROMIUM}: install Debian's chromium (apt-get install chromium) "
                    "or set CHROMIUM_PATH; .ci/run installs it when it runs as root or with sudo")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def _set_number(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")


def test_browser_comparison_shows_both_videos_and_latency(browser, page_url, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1500})
    try:
        page.goto(page_url, wait_until="domcontentloaded")
        page.locator("#compare-btn").wait_for(timeout=60_000)
        if not env_var("SCREENSHOT"):  # the docs/demo.md picture keeps the default 16 steps
            _set_number(page, "steps", "3")
        _set_number(page, "knob-rainfusion-arm_threshold", "0")  # every head sparse, so the plot shows patterns
        page.locator("#compare-btn").click()
        for vid in ("#dense-video video", "#accel-video video"):
            page.locator(vid).wait_for(state="attached", timeout=120_000)
            assert page.locator(vid).get_attribute("src")
        dense = page.locator("#dense-latency")
        accel = page.locator("#accel-latency")
        dense.get_by_text("denoising latency").wait_for(timeout=30_000)
        assert "total latency" in dense.inner_text() and " s" in dense.inner_text()
        assert "RainFusion" in accel.inner_text() and "denoising latency" in accel.inner_text()
        summary = page.locator("#summary").inner_text()
        assert "Speedup" in summary and "PSNR" in summary and "SSIM" in summary and "Realized density" in summary
        page.locator("#pattern-plot img").wait_for(timeout=30_000)
        page.wait_for_timeout(500)  # let the video players paint their first frame
        out = Path(env_var("SCREENSHOT") or tmp_path / "demo.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        assert out.stat().st_size > 10_000

        # bad input: a readable message in the page, and the page keeps working
        page.locator("#prompt textarea").fill("")
        page.locator("#compare-btn").click()
        page.get_by_text("the prompt is empty").first.wait_for(timeout=30_000)
        assert "Traceback" not in page.content()
    finally:
        page.close()


def test_browser_litevar_shows_class_labels_and_images(browser, page_url):
    """Choosing LiteVAR turns the prompt into a class-label box, hides the video-only controls and shows two
    images and the per-scale figure."""
    page = browser.new_page(viewport={"width": 1280, "height": 1500})
    try:
        page.goto(page_url, wait_until="domcontentloaded")
        page.locator("#compare-btn").wait_for(timeout=60_000)
        page.locator("#method input").click()
        page.get_by_role("option", name="LiteVAR").click()
        page.get_by_label("Class labels (ref-var: 0-35, tiny-var: ImageNet ids)").wait_for(timeout=30_000)
        page.locator("#frames").wait_for(state="hidden", timeout=30_000)
        assert page.locator("#prompt textarea").input_value() == "1, 12, 25, 29"
        page.locator("#compare-btn").click()
        for img in ("#dense-image img", "#accel-image img"):
            page.locator(img).wait_for(state="attached", timeout=120_000)
            assert page.locator(img).get_attribute("src")
        page.locator("#summary").get_by_text("Kept attention share").wait_for(timeout=30_000)
        assert "sampling latency" in page.locator("#dense-latency").inner_text()
        assert "LiteVAR" in page.locator("#accel-latency").inner_text()
        page.locator("#pattern-plot img").wait_for(timeout=30_000)
        assert "Traceback" not in page.content()
    finally:
        page.close()
