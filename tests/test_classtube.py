"""Class tubes: equal to a slow per-kernel computation; contrast = own minus every class's mean."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cfp_onnx.exporters.pytorch import export_torch

from cfp_onnx import classtube
from cfp_onnx.api import Explainer, Run
from cfp_onnx.errors import OptionError
from cfp_onnx.pyramid import Pyramid
from tests.nets import Plain

CLIP = (1, 3, 4, 16, 16)
SIZE = (4, 16, 16)


@pytest.fixture(scope="module")
def explained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Explainer, Run, np.ndarray]:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("classtube") / "plain.onnx"
    export_torch(Plain(), CLIP, path)
    x = np.random.default_rng(3).normal(size=CLIP).astype(np.float32)
    ex = Explainer(str(path), clip_shape=x.shape)
    return path, ex, ex.run(x, depth=3, full=ex.map_tensors(3)), x


def slow_tube(ex: Explainer, pyr: Pyramid, run: Run) -> np.ndarray:
    """SPEC §6 maps of each depth-0 kernel, one at a time, resized by torch, times relevance."""
    parents = set(pyr.link_source.tolist())
    out = np.zeros(SIZE)
    for node in np.flatnonzero(pyr.node_depth == 0).tolist():
        layer = ex.layers[int(pyr.node_layer[node])]
        if node in parents:
            kept = pyr.kept_channel[pyr.kept_node == node]
            m = run.full[layer.input][kept].astype(np.float64).sum(0)
        else:
            m = run.full[layer.output][int(pyr.node_channel[node])].astype(np.float64)
        big = F.interpolate(torch.from_numpy(m)[None, None], size=SIZE, mode="trilinear",
                            align_corners=False)[0, 0].numpy()  # fmt: skip
        out += float(pyr.node_relevance[node]) * big
    return out


@pytest.mark.parametrize(("depth", "top_n"), [(3, None), (3, 2), (1, None)])
def test_weighted_tube_is_the_relevance_weighted_sum_of_depth0_maps(explained, depth, top_n):
    _, ex, _, x = explained
    run = ex.run(x, depth=depth, full=ex.map_tensors(depth))
    pyr = ex.pyramid(run, depth=depth, theta=0.3 if top_n is None else 0.0, top_n=top_n)
    assert (pyr.node_depth == 0).sum() >= 2
    got = classtube.class_tube(ex, run, pyr, SIZE, "weighted")
    assert got.shape == SIZE and got.dtype == np.float32
    np.testing.assert_allclose(got, slow_tube(ex, pyr, run), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head_mode", ["weights", "contrastive"])
def test_contrast_is_own_tube_minus_the_mean_over_classes(explained, head_mode):
    """Every class explained at the same full depth 3, the slow way; the contrast tubes of
    all classes then sum to zero."""
    _, ex, run, _ = explained
    opts = {"depth": 3, "theta": 0.0, "top_n": 2, "head_mode": head_mode}
    pyrs = [ex.pyramid(run, label=k, **opts) for k in range(ex.classes)]  # type: ignore[arg-type]
    slow = np.stack([slow_tube(ex, p, run) for p in pyrs])
    assert not np.allclose(slow[0], slow[1])
    got = np.stack([classtube.class_tube(ex, run, p, SIZE, "contrast") for p in pyrs])
    np.testing.assert_allclose(got, slow - slow.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.sum(0), 0, atol=1e-4)


def test_unknown_kind_is_refused(explained):
    _, ex, run, _ = explained
    with pytest.raises(OptionError, match="class tube must be one of weighted, contrast, pyramid"):
        classtube.class_tube(ex, run, ex.pyramid(run), SIZE, "summed")


@pytest.mark.parametrize("kind", ["contrast", "pyramid"])
def test_cli_writes_the_class_tube_and_shows_it(explained, tmp_path, kind):
    path, ex, _, x = explained
    run = ex.run(x, depth=3, full=(*ex.map_tensors(3), *classtube.tensors(ex, kind, 3)))
    np.save(tmp_path / "clip.npy", x)
    cfp = str(Path(sys.executable).with_name("cfp"))
    args = ["explain", str(path), "--clip", "clip.npy", "--theta", "0", "--top-n", "2",
            "--class-tube", kind, "--no-shuffle", "--tubes", "gif"]  # fmt: skip
    r = subprocess.run([*(cfp, *args), "--out", "out"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    label = json.loads((out / "pyramid.json").read_text())["label"]
    want = classtube.class_tube(ex, run, ex.pyramid(run, label=label, theta=0, top_n=2), SIZE,
                                kind)  # fmt: skip
    np.testing.assert_allclose(np.load(out / "class_tube.npy"), want, rtol=1e-5, atol=1e-6)
    assert (out / "tubes" / "class_tube.gif").is_file()
    assert classtube.CAPTIONS[kind].split(":")[0] in (out / "report.html").read_text()
    assert np.load(out / "class_tube.npy").shape == SIZE
    bare = subprocess.run([*(cfp, *args), "--no-report", "--no-tubes", "--out", "bare"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bare.returncode == 0, bare.stderr
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == [
        ".cfp-output.json", "class_tube.npy", "pyramid.json",
    ]  # fmt: skip
    np.testing.assert_array_equal(np.load(tmp_path / "bare" / "class_tube.npy"),
                                  np.load(out / "class_tube.npy"))  # fmt: skip


def slow_flow(pyr: Pyramid) -> np.ndarray:
    """Relevance reaching each node, path by path: the product of link shares along every
    path from a depth-0 kernel, times its head score, summed over paths (recursion)."""
    children: dict[int, list[tuple[int, float]]] = {}
    for s, t, r in zip(pyr.link_source.tolist(), pyr.link_target.tolist(),
                       pyr.link_relevance.tolist()):  # fmt: skip
        children.setdefault(s, []).append((t, r))
    f = np.zeros(len(pyr.node_layer))

    def walk(node: int, carried: float) -> None:
        f[node] += carried
        kids = children.get(node, [])
        total = sum(r for _, r in kids)
        for child, r in kids:
            if total > 0:
                walk(child, carried * r / total)

    for node in np.flatnonzero(pyr.node_depth == 0).tolist():
        walk(node, float(pyr.node_relevance[node]))
    return f


def slow_pyramid_map(ex: Explainer, pyr: Pyramid, run: Run) -> np.ndarray:
    """P: each kernel's own output map over its largest magnitude, times its flow, resized
    by torch one kernel at a time."""
    f = slow_flow(pyr)
    out = np.zeros(SIZE)
    for node in range(len(pyr.node_layer)):
        y = run.full[ex.layers[int(pyr.node_layer[node])].output][int(pyr.node_channel[node])]
        y = y.astype(np.float64)
        if f[node] == 0 or np.abs(y).max() == 0:
            continue
        big = F.interpolate(torch.from_numpy(y / np.abs(y).max())[None, None], size=SIZE,
                            mode="trilinear", align_corners=False)[0, 0].numpy()  # fmt: skip
        out += f[node] * big
    return out


@pytest.mark.parametrize(("theta", "top_n"), [(0.3, None), (0.0, 2)])
def test_pyramid_tube_is_the_flow_weighted_response_minus_every_class_mean(explained, theta, top_n):
    _, ex, _, x = explained
    full = (*ex.map_tensors(3), *classtube.tensors(ex, "pyramid", 3))
    run = ex.run(x, depth=3, full=full)
    pyr = ex.pyramid(run, depth=3, theta=theta, top_n=top_n)
    assert pyr.max_depth_reached == 2 and pyr.n_links > 0
    np.testing.assert_allclose(classtube.flow(pyr), slow_flow(pyr), rtol=1e-10, atol=1e-12)
    assert (classtube.flow(pyr)[pyr.node_depth == 2] > 0).any()  # flow reaches the bottom
    pyrs = [ex.pyramid(run, label=k, depth=3, theta=theta, top_n=top_n) for k in range(ex.classes)]
    maps = [slow_pyramid_map(ex, p, run) for p in pyrs]
    want = maps[pyr.label] - np.mean(maps, axis=0)
    got = classtube.class_tube(ex, run, pyr, SIZE, "pyramid")
    assert got.shape == SIZE and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    own = classtube.pyramid_tubes(ex, run, [pyr], SIZE)[0]
    np.testing.assert_allclose(own, maps[pyr.label], rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert np.abs(want).max() > 0


def test_pyramid_tube_needs_the_layer_outputs(explained):
    _, ex, run, _ = explained  # a run with map_tensors only
    pyr = ex.pyramid(run, depth=3, theta=0.3)
    missing = [t for t in classtube.tensors(ex, "pyramid", 3) if t not in run.full]
    assert missing
    with pytest.raises(OptionError, match="needs the output of"):
        classtube.class_tube(ex, run, pyr, SIZE, "pyramid")


@pytest.mark.parametrize("net", ["residual", "x3d", "mfnet"])
@pytest.mark.parametrize(("depth", "theta", "top_n"), [(3, 0.0, 2), (4, 0.5, None), (5, 0.0, 3)])
@pytest.mark.parametrize("block", [classtube.FLOW_BLOCK, 1])  # 1: a block per class
def test_mean_flow_over_the_union_equals_every_class_pyramid_built_alone(
    exported, net, depth, theta, top_n, block, monkeypatch
):
    from tests import nets

    monkeypatch.setattr(classtube, "FLOW_BLOCK", block)

    _, path = exported(net)
    x = np.random.default_rng(5).normal(size=nets.CLIP).astype(np.float32)
    ex = Explainer(str(path), clip_shape=x.shape)
    run = ex.run(x, depth=depth)
    pyr = ex.pyramid(run, depth=depth, theta=theta, top_n=top_n)
    want = np.zeros(ex.provenance.space.size)
    for k in range(ex.classes):  # each class's own pyramid, its flow scattered by kernel id
        p = ex.pyramid(run, label=k, depth=depth, theta=theta, top_n=top_n)
        ids = np.flatnonzero(p.node_of >= 0)
        want[ids] += classtube.flow(p)[p.node_of[ids]]
    want /= ex.classes
    union, mean = classtube.mean_flow(ex, run, pyr)
    got = np.zeros_like(want)
    ids = np.flatnonzero(union.node_of >= 0)
    got[ids] = mean[union.node_of[ids]]
    assert union.max_depth_reached >= 2 and (want > 0).sum() > 10
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head_mode", ["weights", "contrastive"])
def test_kept_head_selections_give_the_pyramids_of_a_fresh_explainer(exported, head_mode):
    """The paper's head selection is kept per Explainer (it does not depend on the clip):
    pyramids and union pyramids of several clips equal those of Explainers that never kept
    one, the kept arrays are read-only, and clip-dependent modes keep nothing."""
    from tests import nets

    _, path = exported("residual")
    rng = np.random.default_rng(8)
    ex = Explainer(str(path), clip_shape=nets.CLIP)
    for _ in range(2):
        x = rng.normal(size=nets.CLIP).astype(np.float32)
        fresh = Explainer(str(path), clip_shape=nets.CLIP)
        for kw in ({"theta": 0.0, "top_n": 2}, {"theta": 0.5}):
            opts = {"depth": 3, "head_mode": head_mode, **kw}
            got = ex.pyramid(ex.run(x, depth=3), union=range(ex.classes), **opts)
            fresh._head_cache.clear()
            want = fresh.pyramid(fresh.run(x, depth=3), union=range(ex.classes), **opts)
            assert got.to_json() == want.to_json() and got.head_best == want.head_best
    kept = list(ex._head_cache.values())
    assert len(kept) == (2 if head_mode == "weights" else 0)
    for arrays in kept:
        assert all(not a.flags.writeable for a in arrays)


def _longest_paths(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Slow reference: each node's longest path from a node no link enters."""
    depth = [0] * n
    changed = True
    while changed:
        changed = False
        for s, d in zip(src.tolist(), dst.tolist()):
            if depth[d] < depth[s] + 1:
                depth[d], changed = depth[s] + 1, True
    return np.array(depth)


@pytest.mark.parametrize("seed", range(5))
def test_waves_are_longest_paths_and_no_link_joins_one_wave(seed):
    rng = np.random.default_rng(seed)
    n = 60
    layer = np.sort(rng.integers(0, 8, n))[::-1].copy()  # links run to lower layers
    pairs = [(s, d) for s in range(n) for d in range(n) if layer[d] < layer[s]]
    pick = rng.choice(len(pairs), size=120, replace=False)
    src, dst = (np.array(c) for c in zip(*[pairs[i] for i in pick]))
    wave = classtube._waves(layer, src, dst, n)
    assert np.array_equal(wave, _longest_paths(n, src, dst))
    assert (wave[src] < wave[dst]).all()
    assert wave.dtype == np.uint8
    assert not classtube._waves(layer, src[:0], dst[:0], n).any()
