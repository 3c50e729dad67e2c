"""pyramid.json, formatted a column at a time, is the document json.dumps(to_dict()) gives."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from cfp_onnx import jsonrows
from cfp_onnx.api import Explainer
from tests import nets


def pairs(text: str) -> object:
    """The document with every object as its list of (key, value) pairs: order counts."""
    return json.loads(text, object_pairs_hook=list)


@pytest.mark.parametrize(("name", "theta", "chunk"), [("residual", 0.3, 7), ("x3d", 0.6, 65536)])
def test_written_json_equals_json_dumps(exported, name, theta, chunk):
    _, path = exported(name)
    clip = np.random.default_rng(2).standard_normal(nets.CLIP).astype(np.float32)
    p = Explainer(path, clip_shape=clip.shape).explain(clip, theta=theta, depth=4)
    out = io.BytesIO()
    size = p.write_json(out, chunk=chunk)
    text = out.getvalue().decode()
    assert size == len(out.getvalue())
    assert pairs(text) == pairs(json.dumps(p.to_dict(), allow_nan=False))
    assert p.to_json() == text
    doc = json.loads(text)
    assert len(doc["links"]) == p.n_links > chunk or name == "x3d"
    assert [n["relevance"] for n in doc["nodes"]] == p.node_relevance.tolist()  # exact floats


def test_rows_hold_exact_numbers_and_escaped_names():
    values = np.array([0.0, 1.0, 1e-5, 5e-324, 1 / 3, 0.1, 1e300, -2.5])
    names = ['a"b', "</script>", "ü\\n"]
    index = np.array([0, 1, 2, 1, 0, 2, 1, 0])
    out = io.BytesIO()
    cols = [jsonrows.numbers(np.arange(8) * 1000), jsonrows.strings(names, index)]
    cols.append(jsonrows.numbers(values))
    jsonrows.write_rows(out, [b'{"i": ', b', "n": ', b', "v": ', b"}"], cols, chunk=3)
    rows = json.loads(b"[" + out.getvalue() + b"]")
    assert [r["i"] for r in rows] == list(range(0, 8000, 1000))
    assert [r["n"] for r in rows] == [names[i] for i in index]
    assert [r["v"] for r in rows] == values.tolist()  # the same floats, bit for bit


def test_empty_columns_and_non_finite_values():
    out = io.BytesIO()
    assert jsonrows.write_rows(out, [b"{", b"}"], [jsonrows.numbers(np.zeros(0))]) == 0
    with pytest.raises(ValueError, match="finite"):
        jsonrows.numbers(np.array([1.0, np.nan]))
