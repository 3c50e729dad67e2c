"""Pyramids of tiny models of every structure, checked against autograd and a slow NumPy
re-implementation of SPEC §3-5 written from the PyTorch weights and activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfp_onnx.api import Explainer
from tests import nets
from tests.dependency_check import analyzer_sets, autograd_truth, kernel_children, reference_pyramid

ALL = list(nets.MODELS)


def _setup(exported, name: str, dynamo: bool = False, seed: int = 1):
    model, path = exported(name, dynamo)
    clip = np.random.default_rng(seed).standard_normal(nets.CLIP).astype(np.float32)
    ex = Explainer(path, clip_shape=clip.shape)
    return model, ex, clip


@pytest.mark.parametrize("name", ALL)
def test_provenance_equals_autograd(exported, name):
    """Every conv input channel carries exactly the kernels autograd says it depends on."""
    model, ex, clip = _setup(exported, name)
    truth = autograd_truth(model, ex, clip)
    for i, layer in enumerate(ex.layers):
        csr = ex.input_csr(i)
        got = analyzer_sets(ex, csr.indptr, csr.kernels)
        assert got == truth.prov[layer.node], f"{name}: input provenance of {layer.node}"
    head = analyzer_sets(ex, ex.head_csr.indptr, ex.head_csr.kernels)
    assert head == truth.head_prov


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("theta", [0.3, 0.6])
def test_pyramid_equals_slow_reference(exported, name, theta):
    """Nodes, depths and link relevances equal a one-kernel-at-a-time computation."""
    model, ex, clip = _setup(exported, name)
    truth = autograd_truth(model, ex, clip)
    label = int(np.argmax(truth.logits))
    p = ex.explain(clip, depth=3, theta=theta)
    assert p.label == label
    assert p.score == pytest.approx(truth.logits[label], rel=1e-4, abs=1e-5)
    groups = {lay.node: lay.group for lay in ex.layers}
    want_depth, want_links = reference_pyramid(
        truth, label=label, depth=3, theta=theta, group=groups
    )
    got_depth = {
        (p.layers[la], ch): d
        for la, ch, d in zip(p.node_layer.tolist(), p.node_channel.tolist(), p.node_depth.tolist())
    }
    assert got_depth == want_depth
    got_links = {(s, t): r for s, kids in kernel_children(p).items() for t, r in kids.items()}
    assert got_links.keys() == want_links.keys()
    for k, r in want_links.items():
        assert got_links[k] == pytest.approx(r, abs=1e-6), k
    assert np.all(np.isfinite(p.node_relevance)) and np.all(np.isfinite(p.link_relevance))


@pytest.mark.parametrize("name", ["resnext", "x3d", "mfnet", "shuffle"])
def test_grouped_links_stay_in_their_group(exported, name):
    model, ex, clip = _setup(exported, name)
    p = ex.explain(clip, depth=3, theta=0.2)
    by_name = {lay.node: lay for lay in ex.layers}
    for k in np.unique(p.kept_node).tolist():
        lay = by_name[p.layers[p.node_layer[k]]]
        if lay.group == 1:
            continue
        j = int(p.node_channel[k])
        per_in, per_out = lay.c_in // lay.group, lay.c_out // lay.group
        chans = p.kept_channel[p.kept_node == k]
        assert np.all(chans // per_in == j // per_out), (lay.node, j, chans)


def test_links_are_real_dependencies_dynamo(exported):
    """The dynamo exporter's graph (different node names) gives the same true links."""
    model, ex, clip = _setup(exported, "residual", dynamo=True)
    truth = autograd_truth(model, ex, clip)
    p = ex.explain(clip, depth=3, theta=0.5)
    for parent, kids in kernel_children(p).items():
        layer, j = parent
        kept = p.kept_channel[p.kept_node == _node_id(p, layer, j)].tolist()
        real = set().union(*(truth.prov[layer][c] for c in kept))
        assert set(kids) == real


def test_both_exporters_give_the_same_pyramid(exported):
    _, a, clip = _setup(exported, "inception")
    _, b, _ = _setup(exported, "inception", dynamo=True)
    pa, pb = a.explain(clip, theta=0.5), b.explain(clip, theta=0.5)
    assert pa.score == pytest.approx(pb.score, rel=1e-5)
    np.testing.assert_array_equal(pa.node_channel, pb.node_channel)
    np.testing.assert_array_equal(pa.node_depth, pb.node_depth)
    np.testing.assert_array_equal(pa.link_source, pb.link_source)
    np.testing.assert_array_equal(pa.link_target, pb.link_target)
    np.testing.assert_allclose(pa.link_relevance, pb.link_relevance, atol=1e-6)


def test_instrumented_logits_equal_plain(exported):
    import onnxruntime as ort

    for name in ALL:
        model, ex, clip = _setup(exported, name)
        plain = ort.InferenceSession(str(ex.loaded.path)).run(None, {"video": clip})[0]
        run = ex.run(clip, depth=3)
        np.testing.assert_array_equal(run.logits, plain.reshape(-1).astype(np.float64))
        with torch.no_grad():
            np.testing.assert_allclose(
                run.logits, model(torch.from_numpy(clip)).numpy()[0], atol=1e-4
            )


def _node_id(p, layer: str, channel: int) -> int:
    li = p.layers.index(layer)
    hit = np.flatnonzero((p.node_layer == li) & (p.node_channel == channel))
    assert len(hit) == 1
    return int(hit[0])
