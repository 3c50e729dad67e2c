"""The faithfulness check: its masked runs equal a model whose kernels were zeroed by
editing the weights (another mechanism), with the batch axis dynamic or fixed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from cfp_onnx import faithfulness as F
from cfp_onnx.api import Explainer
from cfp_onnx.errors import OptionError
from tests import nets

CLIP = nets.CLIP


@pytest.fixture(scope="module", params=[True, False], ids=["dynamic-batch", "batch-1"])
def model(request, tmp_path_factory) -> tuple[Path, Explainer, np.ndarray]:
    path = tmp_path_factory.mktemp("faith") / "residual.onnx"
    nets.export(nets.build("residual"), str(path), dynamic_batch=request.param)
    x = np.random.default_rng(1).normal(size=CLIP).astype(np.float32)
    return path, Explainer(str(path), clip_shape=x.shape), x


def zeroed_logits(
    path: Path, ex: Explainer, x: np.ndarray, row: dict[int, np.ndarray]
) -> np.ndarray:
    """Reference: the kernels' conv weights and biases set to zero, run as a plain model."""
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    for layer, channels in row.items():
        node = next(n for n in proto.graph.node if n.name == ex.layers[layer].node)
        for name in node.input[1:]:
            value = numpy_helper.to_array(inits[name]).copy()
            value[np.asarray(channels)] = 0
            inits[name].CopyFrom(numpy_helper.from_array(value, name))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"video": x})[0], np.float64).reshape(-1)


def test_masked_runs_equal_models_with_zeroed_weights(model):
    path, ex, x = model
    rng = np.random.default_rng(0)
    layers = [len(ex.layers) - 1, len(ex.layers) - 2, 0]
    rows = [
        {},
        {layers[0]: np.array([0, 3])},
        {layers[1]: np.array([1]), layers[2]: np.array([2, 5])},
    ]
    rows += [{la: rng.choice(ex.layers[la].c_out, 3, replace=False) for la in layers}]
    before = onnx.load(str(path)).SerializeToString()
    got = F.Ablator(ex, layers).logits(x, rows)
    assert onnx.load(str(path)).SerializeToString() == before  # the user's file is untouched
    for r, row in enumerate(rows):
        np.testing.assert_allclose(got[r], zeroed_logits(path, ex, x, row), rtol=1e-4, atol=1e-5)
    assert not np.allclose(got[1], got[0])  # zeroing moves the logits: the test can fail


def test_check_reports_the_drops_of_the_pyramid_and_of_its_random_twins(model):
    path, ex, x = model
    run = ex.run(x, depth=3)
    pyr = ex.pyramid(run, depth=3, theta=0.5)
    f = F.check(ex, x, pyr, draws=5, seed=7)
    assert f is not None
    kernels = F.depth0_kernels(pyr)
    assert f.kernels == int((pyr.node_depth == 0).sum()) == sum(map(len, kernels.values()))
    base = zeroed_logits(path, ex, x, {})[pyr.label]
    assert f.score == pytest.approx(float(run.logits[pyr.label]), rel=1e-5)
    assert f.score == pytest.approx(base, rel=1e-5)
    ref = base - zeroed_logits(path, ex, x, kernels)[pyr.label]
    assert f.pyramid_drop == pytest.approx(ref, rel=1e-4, abs=1e-5)
    rng = np.random.default_rng(7)  # the same draws, made again
    c_out = {la: ex.layers[la].c_out for la in kernels}
    for drop in f.random_drops:
        row = F.random_like(kernels, c_out, rng)
        assert all(len(row[la]) == len(kernels[la]) for la in kernels)
        assert drop == pytest.approx(
            base - zeroed_logits(path, ex, x, row)[pyr.label], rel=1e-4, abs=1e-5
        )
    assert len(f.random_drops) == 5
    if f.ratio is not None:
        assert f.ratio == pytest.approx(f.pyramid_drop / np.mean(f.random_drops))
        assert f.interval is not None and f.interval[0] <= f.ratio <= f.interval[1]
    doc = json.loads(json.dumps(f.to_dict()))
    assert doc["draws"] == 5 and doc["kernels"] == f.kernels and doc["seed"] == 7


def test_ratio_interval_is_a_bootstrap_over_the_draws():
    rng = np.random.default_rng(0)
    ratio, interval = F.ratio_interval(4.0, np.array([1.0, 1.0, 1.0]), rng)
    assert ratio == 4.0 and interval == (4.0, 4.0)  # no spread in the draws: no spread in the ratio
    ratio, interval = F.ratio_interval(4.0, np.array([1.0, 3.0]), rng)
    assert ratio == 2.0 and interval is not None
    assert interval[0] == pytest.approx(4.0 / 3.0) and interval[1] == pytest.approx(4.0)
    assert F.ratio_interval(1.0, np.array([-1.0, 0.5]), rng) == (None, None)


def test_empty_pyramid_and_bad_draws(model):
    _, ex, x = model
    run = ex.run(x, depth=2)
    with pytest.raises(OptionError, match="draws must be >= 1"):
        F.check(ex, x, ex.pyramid(run, depth=2, theta=0.5), draws=0)
    empty = [
        p for k in range(ex.classes) if (p := ex.pyramid(run, depth=2, theta=1.0, label=k)).empty
    ]
    assert empty  # theta 1 keeps nothing for a class whose head row is not constant
    assert F.check(ex, x, empty[0]) is None


def test_cli_writes_faithfulness_json_and_the_report_shows_it(model, tmp_path):
    path, _, x = model
    clip = tmp_path / "clip.npy"
    np.save(clip, x)
    cfp = [sys.executable, "-c", "from cfp_onnx.cli.main import console; console()"]
    out = tmp_path / "o"
    res = subprocess.run([*cfp, "explain", str(path), "--clip", str(clip), "--out", str(out),
                          "--faithfulness-draws", "4", "--no-shuffle"],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads((out / "faithfulness.json").read_text())
    assert doc["draws"] == 4 and len(doc["random_drops"]) == 4
    assert "faithfulness: zeroing the pyramid's" in res.stdout
    page = (out / "report.html").read_text()
    assert 'id="faithfulness-0"' in page and f"{doc['kernels']} depth-0 kernels" in page
    plain = tmp_path / "p"
    res = subprocess.run([*cfp, "explain", str(path), "--clip", str(clip), "--out", str(plain),
                          "--no-report"], capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0 and not (plain / "faithfulness.json").exists()
    bad = subprocess.run([*cfp, "explain", str(path), "--clip", str(clip), "--out",
                          str(tmp_path / "b"), "--faithfulness-draws", "0"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].endswith("--faithfulness-draws must be >= 1 (got 0)")
    assert not (tmp_path / "b").exists()


def test_rows_are_split_into_runs_that_fit_the_batch_budget(model, monkeypatch):
    path, ex, x = model
    ab = F.Ablator(ex, [len(ex.layers) - 1])
    rows = [{}, *({len(ex.layers) - 1: np.array([c])} for c in range(5))]
    whole = ab.logits(x, rows)
    monkeypatch.setattr(F, "BATCH_BYTES", 1)  # one row a run
    assert ab.rows_per_run == 1
    np.testing.assert_allclose(ab.logits(x, rows), whole, rtol=1e-5, atol=1e-6)


def test_masked_session_is_reused_and_freed_with_its_explainer(model):
    import gc
    import weakref

    path, _, x = model
    ex = Explainer(str(path), clip_shape=x.shape)
    pyr = ex.pyramid(ex.run(x, depth=2), depth=2, theta=0.5)
    layers = tuple(F.depth0_kernels(pyr))
    first = F._ablator(ex, layers)
    assert F._ablator(ex, layers) is first  # the next clip's check reuses the session
    other = F._ablator(ex, (0,))
    assert other is not first and F._ablator(ex, (0,)) is other  # one per explainer at most
    gone = weakref.ref(ex)
    del ex, first, other
    gc.collect()
    assert gone() is None  # the cache does not keep the explainer (nor its sessions) alive
