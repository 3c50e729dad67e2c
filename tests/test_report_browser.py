"""The report in real headless Chromium: no console errors, drawn, clickable, injection-proof,
tubes drawn in the page equal to SPEC §6 (tubes.py), every kernel reachable."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cfp_onnx import tubes
from cfp_onnx.api import Explainer
from cfp_onnx.explanation import explain
from cfp_onnx.loading import load_model
from cfp_onnx.modelinput import ModelInput
from cfp_onnx.options import PyramidOptions, ViewOptions
from tests.browser import chromium, console_errors
from tests.test_report import EVIL_CLASSES, EVIL_CONV, evil_report

pytestmark = pytest.mark.browser


def wait_ready(driver) -> None:  # type: ignore[no-untyped-def]
    for _ in range(200):
        if driver.execute_script("return !!(window.cfpReport && window.cfpReport.ready)"):
            return
        time.sleep(0.05)
    raise AssertionError("the report never became ready")


@pytest.fixture(scope="module")
def report_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return evil_report(tmp_path_factory.mktemp("browser"), **{"--fps": 20})


@pytest.fixture(scope="module")
def page(report_path: Path):  # type: ignore[no-untyped-def]
    with chromium() as driver:
        driver.get(report_path.as_uri())
        wait_ready(driver)
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


def test_clicking_a_node_plays_its_tube(page) -> None:  # type: ignore[no-untyped-def]
    view = _data(page)["views"][0]
    tube = page.find_element("id", "tube-0")
    first = int(tube.get_attribute("data-node"))
    other = next(n for n in view["shown"] if n != first)
    page.find_element("css selector", f"#graph-0 circle[data-node='{other}']").click()
    assert int(tube.get_attribute("data-node")) == other
    caption = page.find_element("id", "tube-caption-0").text
    assert caption.endswith(f": {view['nodes']['channel'][other]}")
    grab = "return document.getElementById('tube-0').toDataURL()"
    seen = {page.execute_script(grab)}
    for _ in range(6):  # it plays: the canvas changes frame by frame
        time.sleep(0.06)
        seen.add(page.execute_script(grab))
    assert len(seen) > 1


def test_hover_lights_the_paths_to_the_head(page) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver import ActionChains

    view = _data(page)["views"][0]
    deep = max(view["shown"], key=lambda n: view["nodes"]["depth"][n])
    node = page.find_element("css selector", f"#graph-0 circle[data-node='{deep}']")
    ActionChains(page).move_to_element(node).perform()
    tip = page.find_element("id", "tip-0")
    assert tip.is_displayed()
    assert "channel:" in tip.text and "relevance:" in tip.text and "layer:" in tip.text
    hot = page.find_elements("css selector", "#graph-0 line.hot")
    if view["nodes"]["depth"][deep] > 0:
        assert hot and all(h.get_attribute("data-source") is not None for h in hot)
    assert console_errors(page) == []


def test_table_sorts_by_relevance_and_re_sorts(page) -> None:  # type: ignore[no-untyped-def]
    rel = [
        float(r.text) for r in page.find_elements("css selector", "#table-0 tbody td:first-child")
    ]
    assert rel == sorted(rel, reverse=True) and rel
    page.find_element("css selector", "#table-0 th[data-key='channel']").click()
    cells = page.find_elements("css selector", "#table-0 tbody td:nth-child(4)")
    chans = [int(c.text) for c in cells]
    assert chans == sorted(chans)
    page.find_element("css selector", "#table-0 th[data-key='relevance']").click()


def test_every_kernel_is_reachable_from_the_table(page) -> None:  # type: ignore[no-untyped-def]
    n = len(_data(page)["views"][0]["nodes"]["layer"])
    found = page.execute_script(
        "var ok = 0; for (var k = 0; k < arguments[0]; k++) {"
        " window.cfpReport.pageTo(0, k);"
        " if (document.querySelector('#table-0 tbody tr[data-node=\"' + k + '\"]')) { ok++; } }"
        " return ok;",
        n,
    )
    assert found == n


def test_page_tubes_equal_tubes_py(page, report_path: Path) -> None:  # type: ignore[no-untyped-def]
    """SPEC §6 drawn in the browser equals tubes.py's overlay on the same (JPEG) frames."""
    view = _data(page)["views"][0]
    root = report_path.parent.parent
    loaded = load_model(root / "evil.onnx")
    mi = ModelInput.of(loaded)
    clip = mi.clip(root / "clip.npy", loaded)
    ex = Explainer(loaded, clip_shape=tuple(clip.tensor.shape))
    e = explain(ex, clip, mi, PyramidOptions(depth=2, theta=0.3), ViewOptions(shuffle=False))
    assert e.maps is not None
    frames = np.stack([
        cv2.cvtColor(cv2.imdecode(np.frombuffer(base64.b64decode(u.split(",", 1)[1]), np.uint8),
                                  cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        for u in view["frames"]
    ])  # fmt: skip
    size = tuple(view["size"])
    nodes = np.arange(len(e.pyramid.node_layer))[:6]
    want = e.maps.tubes(nodes, size)
    for i, node in enumerate(nodes.tolist()):
        got_tube = np.array(page.execute_script(f"return window.cfpReport.tube(0, {node})"))
        np.testing.assert_allclose(got_tube.reshape(size), want[i], atol=2.5 / 255)
        blended = tubes.overlay(frames, want[i])
        for k in (0, size[0] // 2, size[0] - 1):
            rgba = np.array(page.execute_script(f"return window.cfpReport.pixels(0, {node}, {k})"))
            got = rgba.reshape(size[1], size[2], 4)[..., :3]
            diff = np.abs(got.astype(int) - blended[k].astype(int))
            assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 4, (node, k, diff.max())


@pytest.mark.parametrize("width", [1920, 800])
def test_layout_fits_the_screen_and_the_profile_shows_with_its_label(
    report_path: Path, width: int
) -> None:
    """1920 px: the viewer sits beside the graph, with the temporal profile under its label.
    800 px: nothing wider than the screen, and the profile hidden with its label (a label
    left over an empty space reads as a missing plot)."""
    with chromium() as d:
        d.set_window_size(width, 1000)
        d.get(report_path.as_uri())
        wait_ready(d)
        state = d.execute_script(
            "function shown(id) { var e = document.getElementById(id);"
            "  return !!e && e.getClientRects().length > 0 && getComputedStyle(e).display !== 'none'; }"
            "var v = document.querySelector('.viewer').getBoundingClientRect();"
            "var g = document.getElementById('graph-0').getBoundingClientRect();"
            "return {label: shown('profile-label-0'), plot: shown('profile-0'),"
            "  points: document.querySelectorAll('#profile-0 polyline').length,"
            "  beside: v.left >= g.right - 1, scroll: document.documentElement.scrollWidth,"
            "  inner: window.innerWidth};"
        )
    assert state["label"] == state["plot"] == (width == 1920)
    assert state["points"] == 1  # drawn for the selected kernel either way
    assert state["beside"] == (width == 1920)
    assert state["scroll"] <= state["inner"]
