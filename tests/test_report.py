"""The HTML report: model-supplied strings escaped, long names shortened, offline, truncated."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from cfp_onnx.cli.main import main
from cfp_onnx.report import MAX_NAME, script_json, shorten
from tests.handmade import color_model, moving_square, to_tensor

EVIL_CONV = "<script>window.__pwned=1</script>conv1"
EVIL_CONV2 = 'conv2"><img src=x onerror="window.__pwned=2">'
EVIL_CLASSES = ("<script>window.__pwned=3</script>", "green & </script>", "moving")


def evil_report(root: Path, **kw: object) -> Path:
    """A report of a model whose node and class names try to inject script."""
    model = color_model(
        root / "evil.onnx", conv_names=(EVIL_CONV, EVIL_CONV2), class_names=EVIL_CLASSES
    )
    frames, _ = moving_square()
    np.save(root / "clip.npy", to_tensor(frames))
    out = root / "out"
    args = [str(model), "--clip", str(root / "clip.npy"), "--out", str(out), "--depth", "2"]
    args += [str(a) for pair in kw.items() for a in pair]
    assert main(["explain", *args, "--theta", "0.3"]) == 0
    return out / "report.html"


@pytest.fixture(scope="module")
def evil(tmp_path_factory: pytest.TempPathFactory) -> str:
    return evil_report(tmp_path_factory.mktemp("evil")).read_text()


def test_names_are_escaped_in_html_and_json(evil: str) -> None:
    assert "window.__pwned" in evil  # the names are there ...
    assert "<script>window.__pwned" not in evil  # ... but never as markup
    assert "<img src=x" not in evil
    assert "&lt;script&gt;window.__pwned=3&lt;/script&gt;" in evil  # class name, as text
    assert len(re.findall(r"<script\b", evil)) == 2  # our data block and our code
    data = re.search(r'<script type="application/json" id="cfp-data">(.*?)</script>', evil, re.S)
    assert data is not None
    assert "<" not in data.group(1) and ">" not in data.group(1) and "&" not in data.group(1)
    layers = set(json.loads(data.group(1))["views"][0]["layers"])
    assert {EVIL_CONV, EVIL_CONV2} <= layers  # JSON.parse gives the exact names back


def test_report_is_offline(evil: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", evil)
    assert "default-src 'none'" in evil  # no fetch of any kind is allowed
    nonce = re.search(r"script-src 'nonce-([^']+)'", evil)
    assert nonce and f'<script nonce="{nonce.group(1)}">' in evil


def test_script_json_round_trips_hostile_strings() -> None:
    obj = {"a": "</script><!-- & \u2028 \u2029 ' \" \\", "b": [1.5, None]}
    text = str(script_json(obj))
    assert not set("<>&") & set(text) and "\u2028" not in text
    assert json.loads(text) == obj


def test_long_names_are_shortened_with_the_full_name_in_a_tooltip(tmp_path: Path) -> None:
    long = "block/" * 60 + "conv"
    model = color_model(tmp_path / "long.onnx", conv_names=(long, "conv2"))
    frames, _ = moving_square()
    np.save(tmp_path / "clip.npy", to_tensor(frames))
    args = [str(model), "--clip", str(tmp_path / "clip.npy"), "--out", str(tmp_path / "o")]
    assert main(["explain", *args, "--depth", "2", "--theta", "0", "--no-tubes"]) == 0
    html = (tmp_path / "o" / "report.html").read_text()
    short = shorten(long)
    assert len(short) == MAX_NAME and short != long and short[-20:] == long[-20:]
    data = re.search(r'<script type="application/json" id="cfp-data">(.*?)</script>', html, re.S)
    assert data is not None and long in json.loads(data.group(1))["views"][0]["layers"]
    # the page shortens it the same way, full name in a tooltip: tests/bad_inputs/test_reports


def test_huge_pyramids_show_the_top_kernels_per_depth_and_say_so(tmp_path: Path) -> None:
    html = evil_report(tmp_path, **{"--per-depth": 1, "--tubes": "gif"}).read_text()
    assert "The graph shows the most relevant kernels of each depth (2 of" in html
    assert "the table lists all" in html
    assert len(list((tmp_path / "out" / "tubes").glob("*.gif"))) == 2
