"""Hostile names: node, class, model and clip names carrying HTML/JS are inert in the report;
names over 200 characters are shortened for display with the full name, escaped, in a tooltip."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from markupsafe import escape

from cfp_onnx.report import MAX_NAME, shorten
from tests.bad_inputs.conftest import cfp
from tests.browser import chromium
from tests.handmade import color_model, moving_square, to_tensor

XSS_NODE = '"><svg onload=alert(1)>'
XSS_CLASS = "</td><script>alert(2)</script>"
LONG_NODE = "<b>" + "x" * 300 + "</b>"
XSS_FILE = "<img src=x onerror=alert(3)>"


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("hostile")
    color_model(
        root / f"{XSS_FILE}.onnx", conv_names=(XSS_NODE, LONG_NODE),
        class_names=(XSS_CLASS, "javascript:alert(4)", "ok"),
    )  # fmt: skip
    frames, _ = moving_square()
    np.save(root / f"{XSS_FILE}.npy", to_tensor(frames))
    r = cfp(
        "explain", f"{XSS_FILE}.onnx", "--clip", f"{XSS_FILE}.npy", "--out", "out",
        "--theta", "0", "--depth", "2", "--no-tubes", "--label", "0", cwd=root,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return (root / "out" / "report.html").read_text()


def _markup(page: str) -> str:
    """The page without our JSON data block (its contents are checked separately)."""
    return re.sub(
        r'<script type="application/json" id="cfp-data">.*?</script>', "", page, flags=re.S
    )


@pytest.mark.parametrize(
    "name", [XSS_NODE, XSS_CLASS, XSS_FILE], ids=["node", "class", "model-file"]
)
def test_hostile_name_is_inert(page, name):
    markup = _markup(page)
    assert name not in markup  # never as raw markup ...
    if name == XSS_NODE:  # ... layer names travel only as JSON data, shown via textContent
        assert name in json.loads(_data(page))["views"][0]["layers"]
    else:  # ... the others as escaped text
        assert str(escape(name)) in markup or str(escape(shorten(name))) in markup
    assert len(re.findall(r"<script\b", page)) == 2  # our data block and our code
    assert "<svg onload" not in page and "<img src=x" not in page


def test_no_event_handler_or_javascript_url_reaches_the_markup(page):
    """Parsed as a browser would: no element the names could have made, no on* handler."""
    seen: list[tuple[str, list[tuple[str, str | None]]]] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
            seen.append((tag, attrs))

    Collect().feed(page)
    assert not [t for t, attrs in seen for a, _ in attrs if a.startswith("on")]
    urls = [v for _, attrs in seen for a, v in attrs if a in ("href", "src", "action") and v]
    assert not [v for v in urls if v.strip().lower().startswith("javascript:")]
    assert [t for t, _ in seen].count("script") == 2
    assert not [t for t, attrs in seen if ("src", "x") in attrs]


def _data(page: str) -> str:
    data = re.search(r'<script type="application/json" id="cfp-data">(.*?)</script>', page, re.S)
    assert data is not None
    return data.group(1)


def test_data_block_has_no_markup_characters(page):
    assert not set("<>&") & set(_data(page))


@pytest.mark.browser
def test_long_name_is_shortened_with_the_full_name_in_a_tooltip(page, tmp_path):
    short = shorten(LONG_NODE)
    assert len(short) == MAX_NAME and len(LONG_NODE) > MAX_NAME
    (tmp_path / "r.html").write_text(page)
    with chromium() as driver:
        driver.get((tmp_path / "r.html").as_uri())
        cells = driver.find_elements("css selector", "td.name")
        assert (LONG_NODE, short) in {(c.get_attribute("title"), c.text) for c in cells}
        assert driver.execute_script("return window.__pwned === undefined")
