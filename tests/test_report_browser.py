"""The report in real headless Chromium: no console errors, drawn, clickable, injection-proof."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.browser import chromium, console_errors
from tests.test_report import EVIL_CLASSES, EVIL_CONV, evil_report

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    report = evil_report(tmp_path_factory.mktemp("browser"), **{"--fps": 20})
    with chromium() as driver:
        driver.get(report.as_uri())
        time.sleep(0.5)
        yield driver


def _data(driver) -> dict:  # type: ignore[no-untyped-def,type-arg]
    text = driver.execute_script("return document.getElementById('cfp-data').textContent")
    return json.loads(text)  # type: ignore[no-any-return]


def test_no_console_errors_and_no_injected_script(page) -> None:  # type: ignore[no-untyped-def]
    assert console_errors(page) == []
    assert page.execute_script("return window.__pwned === undefined")
    body = page.find_element("tag name", "body").text
    assert EVIL_CLASSES[0] in body  # shown as text, literally
    titles = {td.get_attribute("title") for td in page.find_elements("css selector", "td.name")}
    assert EVIL_CONV in titles


def test_screenshot_is_not_blank(page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shot = tmp_path / "report.png"
    page.save_screenshot(str(shot))
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[0] > 300
    assert image.std() > 20  # text, frames and graph, not one flat colour
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 100


def test_clicking_a_node_shows_its_tube(page) -> None:  # type: ignore[no-untyped-def]
    kernels = {k["node"]: k for k in _data(page)["views"][0]["kernels"]}
    tube = page.find_element("id", "tube-0")
    first = int(tube.get_attribute("data-node"))
    other = next(n for n in kernels if n != first)
    page.find_element("css selector", f"#graph-0 circle[data-node='{other}']").click()
    assert int(tube.get_attribute("data-node")) == other
    assert tube.get_attribute("src") in kernels[other]["frames"]
    caption = page.find_element("id", "tube-caption-0").text
    assert caption.endswith(f": {kernels[other]['channel']}")
    seen = {tube.get_attribute("src")}
    for _ in range(10):  # it plays: the frame changes, always one of that kernel's frames
        time.sleep(0.06)
        seen.add(tube.get_attribute("src"))
    assert len(seen) > 1 and seen <= set(kernels[other]["frames"])


def test_hover_shows_layer_channel_relevance(page) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver import ActionChains

    node = page.find_element("css selector", "#graph-0 circle")
    ActionChains(page).move_to_element(node).perform()
    tip = page.find_element("id", "tip-0")
    assert tip.is_displayed()
    assert "channel:" in tip.text and "relevance:" in tip.text and "layer:" in tip.text
    assert console_errors(page) == []
