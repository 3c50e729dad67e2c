"""pyramid.json streamed without a dict per link is the same text json.dumps gives."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from cfp_onnx.api import Explainer
from tests import nets


@pytest.mark.parametrize(("name", "theta", "chunk"), [("residual", 0.3, 7), ("x3d", 0.6, 65536)])
def test_streamed_json_equals_json_dumps(exported, name, theta, chunk):
    _, path = exported(name)
    clip = np.random.default_rng(2).standard_normal(nets.CLIP).astype(np.float32)
    p = Explainer(path, clip_shape=clip.shape).explain(clip, theta=theta, depth=4)
    out = io.StringIO()
    p.write_json(out, chunk=chunk)
    assert out.getvalue() == json.dumps(p.to_dict(), allow_nan=False)
    assert p.to_json() == out.getvalue()
    doc = json.loads(out.getvalue())
    assert len(doc["links"]) == p.n_links > chunk or name == "x3d"
    assert [n["relevance"] for n in doc["nodes"]] == p.node_relevance.tolist()
