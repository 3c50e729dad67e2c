"""Provenance through every op family of SPEC §2, on hand-made graphs, against the
perturbation oracle (onnxruntime, graph cut at every conv output)."""

from __future__ import annotations

import numpy as np
import pytest

from cfp_onnx.api import Explainer
from cfp_onnx.errors import ModelError, UnsupportedOpError
from tests.graphs import G
from tests.perturbation_check import perturbation_truth


def _check(path, shape=(1, 3, 4, 8, 8), *, exact: bool = True, output: str | None = None):
    clip = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    ex = Explainer(path, clip_shape=clip.shape, output=output)
    truth, head_truth = perturbation_truth(ex, clip)
    for i, lay in enumerate(ex.layers):
        got = _sets(ex, ex.input_csr(i))
        for c, (g, t) in enumerate(zip(got, truth[lay.node])):
            assert g <= t, f"{lay.node} channel {c}: {g - t} are not real dependencies"
            if exact:
                assert g == t, f"{lay.node} channel {c}: missing {t - g}"
    head = _sets(ex, ex.head_csr)
    for g, t in zip(head, head_truth):
        assert g <= t and (not exact or g == t)
    return ex, clip


def _sets(ex, csr):
    offsets = ex.provenance.offsets
    layer = np.searchsorted(offsets, csr.kernels, side="right") - 1
    pairs = [(ex.layers[la].node, int(k - offsets[la])) for la, k in zip(layer, csr.kernels)]
    return [set(pairs[csr.indptr[c] : csr.indptr[c + 1]]) for c in range(len(csr.indptr) - 1)]


def test_channels_last_transposes(tmp_path):
    """TF-style graph: NDHWC input, transposes around each conv, channels-last merge and head."""
    g = G(shape=(1, 4, 8, 8, 3))
    x = g.op("Transpose", "video", perm=[0, 4, 1, 2, 3])
    a = g.op("Transpose", g.relu(g.conv(x, 3, 6)), perm=[0, 2, 3, 4, 1])
    b = g.op("Transpose", g.relu(g.conv(x, 3, 6, k=1)), perm=[0, 2, 3, 4, 1])
    s = g.op("Add", a, b)  # channels-last residual merge
    y = g.relu(g.conv(g.op("Transpose", s, perm=[0, 4, 1, 2, 3]), 6, 8))
    y = g.op("Transpose", y, perm=[0, 2, 3, 4, 1])
    feats = g.op("ReduceMean", y, g.const(np.array([1, 2, 3]), np.int64), keepdims=0)
    logits = g.op(
        "Add", g.op("MatMul", feats, g.const(g.rng.standard_normal((8, 5)))), g.const(np.zeros(5))
    )
    ex, _ = _check(g.save(tmp_path / "m.onnx", [logits]), shape=(1, 4, 8, 8, 3))
    assert ex.head.feature_axis == 1 and ex.head.weight.shape == (5, 8)


def test_channel_select_ops(tmp_path):
    """Slice with steps (forward and backward), Gather, Split, Pad and Concat on channels."""
    g = G()
    y = g.relu(g.conv("video", 3, 8))
    s1 = g.op(
        "Slice",
        y,
        g.const([1], np.int64),
        g.const([8], np.int64),
        g.const([1], np.int64),
        g.const([2], np.int64),
    )
    s2 = g.op(
        "Slice",
        y,
        g.const([-1], np.int64),
        g.const([-9], np.int64),
        g.const([1], np.int64),
        g.const([-3], np.int64),
    )
    ga = g.op("Gather", y, g.const([5, 0, 0, 7], np.int64), axis=1)
    sp = g.op("Split", y, g.const([3, 5], np.int64), axis=1, n_out=2)
    pd = g.op("Pad", sp[1], g.const([0, 2, 0, 0, 0, 0, 1, 0, 0, 0], np.int64))
    cat = g.op("Concat", s1, s2, ga, pd, g.const(np.ones((1, 2, 4, 8, 8))), axis=1)
    z = g.relu(g.conv(cat, 4 + 3 + 4 + 8 + 2, 6))
    logits = g.gemm(g.pool_flatten(z), 6, 4)
    ex, _ = _check(g.save(tmp_path / "m.onnx", [logits]))
    first = ex.layers[0].node
    got = _sets(ex, ex.input_csr(1))
    assert got[:4] == [{(first, c)} for c in (1, 3, 5, 7)]
    assert got[4:7] == [{(first, c)} for c in (7, 4, 1)]
    assert got[7:11] == [{(first, c)} for c in (5, 0, 0, 7)]
    assert got[11:13] == [set(), set()]  # padded channels carry nothing
    assert got[13:18] == [{(first, c)} for c in range(3, 8)]
    assert got[18:] == [set(), set(), set()]  # padding after, then the constant's channels
    # Channel 0 of the first conv feeds three input channels of the second (Gather
    # repeats it, Slice and Split keep it): one link each, carrying the largest r'.
    clip = np.random.default_rng(3).standard_normal((1, 3, 4, 8, 8)).astype(np.float32)
    p = ex.explain(clip, depth=2, theta=0.0)
    pairs = list(zip(p.link_source.tolist(), p.link_target.tolist()))
    assert len(pairs) == len(set(pairs))
    for k in np.unique(p.kept_node).tolist():
        chans = p.kept_channel[p.kept_node == k]
        score = p.kept_score[p.kept_node == k]
        carried = [c for c in chans.tolist() if (first, 0) in got[c]]
        link = [
            r
            for s, t, r in zip(p.link_source, p.link_target, p.link_relevance)
            if s == k and p.layers[p.node_layer[t]] == first and p.node_channel[t] == 0
        ]
        assert len(carried) >= 2 and link == [max(score[np.isin(chans, carried)])]


def test_squeeze_excitation_and_spatial_gates(tmp_path):
    g = G()
    y = g.relu(g.conv("video", 3, 8))
    se = g.op("Sigmoid", g.conv(g.relu(g.conv(g.op("GlobalAveragePool", y), 8, 4, k=1)), 4, 8, k=1))
    y2 = g.op("Mul", y, se)
    att = g.op("Sigmoid", g.conv(g.op("ReduceMean", y2, g.const([1], np.int64), keepdims=1), 1, 1))
    y3 = g.op("Mul", att, y2)  # gate first: operand order must not matter
    swish = g.op("Mul", y3, g.op("Sigmoid", y3))
    z = g.relu(g.conv(swish, 8, 6))
    logits = g.gemm(g.pool_flatten(z), 6, 3)
    ex, _ = _check(g.save(tmp_path / "m.onnx", [logits]), exact=False)
    first = ex.layers[0].node
    last = ex.layers[-1]
    assert _sets(ex, ex.input_csr(len(ex.layers) - 1)) == [{(first, c)} for c in range(8)], (
        last.node
    )


def test_unpooled_flatten_head_and_dense_stack(tmp_path):
    """C3D: flatten an unpooled map into fc6 -> fc7 -> fc8; the head weight is their product."""
    g = G(shape=(1, 3, 2, 4, 4))
    y = g.op("MaxPool", g.relu(g.conv("video", 3, 4)), kernel_shape=[1, 2, 2], strides=[1, 2, 2])
    flat = g.op("Flatten", y)  # 4 channels x 2 x 2 x 2 positions = 32 features
    w6, w7, w8 = (
        g.rng.standard_normal(s).astype(np.float32).astype(np.float64)
        for s in [(10, 32), (7, 10), (3, 7)]
    )
    h = g.relu(g.op("Gemm", flat, g.const(w6), g.const(np.ones(10)), transB=1))
    h = g.op("Dropout", g.relu(g.op("Gemm", h, g.const(w7), g.const(np.ones(7)), transB=1)))
    logits = g.op("Gemm", h, g.const(w8), g.const(np.ones(3)), transB=1)
    probs = g.op("Softmax", logits, axis=1)
    ex, clip = _check(g.save(tmp_path / "m.onnx", [probs]), shape=(1, 3, 2, 4, 4))
    np.testing.assert_allclose(ex.head.weight, w8 @ w7 @ w6, rtol=1e-12)
    assert [s for s in _sets(ex, ex.head_csr)] == [{(ex.layers[0].node, f // 8)} for f in range(32)]
    p = ex.explain(clip, theta=0.5)
    assert ex.head.logits == logits and p.score == pytest.approx(float(p.logits[p.label]))
    assert p.logits.max() > 1 or p.logits.min() < 0  # logits, not probabilities


def test_logits_conv_with_mean_over_time(tmp_path):
    """I3D: a 1x1x1 logits conv, then a mean over time and a squeeze."""
    g = G()
    y = g.relu(g.conv("video", 3, 6))
    y = g.op("AveragePool", y, kernel_shape=[1, 8, 8])
    lc = g.conv(y, 6, 4, k=1)
    logits = g.op(
        "Squeeze",
        g.op("ReduceMean", lc, g.const([2, 3, 4], np.int64), keepdims=1),
        g.const([2, 3, 4], np.int64),
    )
    ex, clip = _check(g.save(tmp_path / "m.onnx", [logits]))
    assert len(ex.layers) == 1 and ex.head.node == lc.removesuffix("_out")
    assert ex.head.weight.shape == (4, 6)


def test_several_candidate_outputs_need_a_choice(tmp_path):
    g = G()
    y = g.relu(g.conv("video", 3, 6))
    a = g.gemm(g.pool_flatten(y), 6, 3)
    b = g.gemm(g.pool_flatten(y), 6, 4)
    path = g.save(tmp_path / "m.onnx", [a, b])
    with pytest.raises(ModelError, match="could each be the logits; choose one with --output"):
        Explainer(path)
    assert Explainer(path, output=b).classes == 4


@pytest.mark.parametrize(
    ("op", "domain", "attrs"),
    [
        ("LpNormalization", "", {"axis": 1}),
        ("MyFancyNorm", "com.acme", {}),
        ("Hardmax", "", {"axis": 1}),
    ],
)
def test_unknown_op_on_the_path_is_named(tmp_path, op, domain, attrs):
    g = G()
    y = g.op(op, g.relu(g.conv("video", 3, 6)), domain=domain, **attrs)
    z = g.relu(g.conv(y, 6, 6))
    logits = g.gemm(g.pool_flatten(z), 6, 3)
    clip = np.zeros((1, 3, 4, 8, 8), np.float32)
    ex = Explainer(g.save(tmp_path / "m.onnx", [logits]), clip_shape=clip.shape)
    with pytest.raises(UnsupportedOpError, match=f"op {op} \\(node '{y.removesuffix('_out')}'\\)"):
        ex.input_csr(1)


def test_unknown_op_after_the_logits_is_ignored(tmp_path):
    g = G()
    z = g.relu(g.conv("video", 3, 6))
    logits = g.gemm(g.pool_flatten(z), 6, 3)
    out = g.op("Softmax", logits, axis=1)
    ex = Explainer(g.save(tmp_path / "m.onnx", [out]))
    assert ex.head.logits == logits
    assert len(ex.head_csr.kernels) == 6


def test_resize_passes_through(tmp_path):
    """Two-pathway lateral: a temporally upsampled slow path added to the fast one."""
    g = G()
    fast = g.relu(g.conv("video", 3, 4))
    slow = g.relu(
        g.op("Conv", "video", g.const(g.rng.standard_normal((4, 3, 1, 1, 1))), strides=[2, 1, 1])
    )
    up = g.op("Resize", slow, "", g.const([1, 1, 2, 1, 1]), mode="nearest")
    z = g.relu(g.conv(g.op("Concat", fast, g.op("Add", up, fast), axis=1), 8, 4))
    logits = g.gemm(g.pool_flatten(z), 4, 3)
    _check(g.save(tmp_path / "m.onnx", [logits]))


def test_a_linear_on_channels_last_carries_the_channels_its_weight_reads(tmp_path):
    """ConvNeXt's pointwise layers: MatMul by a constant W[K, M] inside the network.
    Output channel m carries exactly the kernels of the input channels k with W[k, m] != 0
    (a sparse W, so the union is checked column by column)."""
    g = G()
    y = g.relu(g.conv("video", 3, 6))
    last = g.op("Transpose", y, perm=[0, 2, 3, 4, 1])
    w = g.rng.standard_normal((6, 8))
    w[:3, :4] = 0  # columns 0-3 read only channels 3-5
    w[5, 6:] = 0
    mixed = g.op("Relu", g.op("MatMul", last, g.const(w)))
    z = g.relu(g.conv(g.op("Transpose", mixed, perm=[0, 4, 1, 2, 3]), 8, 4))
    feats = g.op("ReduceMean", z, g.const(np.array([2, 3, 4]), np.int64), keepdims=0)
    logits = g.op("MatMul", feats, g.const(g.rng.standard_normal((4, 5))))
    ex, _ = _check(g.save(tmp_path / "m.onnx", [logits]))
    second = _sets(ex, ex.input_csr(1))
    conv1 = ex.layers[0].node
    assert second[0] == {(conv1, k) for k in (3, 4, 5)}
    assert second[7] == {(conv1, k) for k in range(5)}


def test_layer_norm_over_channels_passes_provenance_through(tmp_path):
    """LayerNormalization over the channels of a channels-last tensor (ConvNeXt): like
    Group/Instance norm (SPEC §2), channel c carries its own kernels; the statistics are a
    per-position scale, not producers (the perturbation oracle sees them, so not exact)."""
    g = G()
    y = g.relu(g.conv("video", 3, 6))
    last = g.op("Transpose", y, perm=[0, 2, 3, 4, 1])
    normed = g.op("LayerNormalization", last, g.const(np.ones(6)), g.const(np.zeros(6)), axis=-1)
    z = g.relu(g.conv(g.op("Transpose", normed, perm=[0, 4, 1, 2, 3]), 6, 4))
    feats = g.op("ReduceMean", z, g.const(np.array([2, 3, 4]), np.int64), keepdims=0)
    logits = g.op("MatMul", feats, g.const(g.rng.standard_normal((4, 5))))
    ex, _ = _check(g.save(tmp_path / "m.onnx", [logits]), exact=False)
    conv1 = ex.layers[0].node
    assert _sets(ex, ex.input_csr(1)) == [{(conv1, c)} for c in range(6)]
