"""Saliency tubes: equal to a slow direct computation, peaked on the object they must find."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cfp_onnx.exporters.pytorch import export_torch

from cfp_onnx import tubes
from cfp_onnx.api import Explainer, Run
from cfp_onnx.errors import OptionError
from cfp_onnx.pyramid import Pyramid
from tests.handmade import color_model, moving_square, to_tensor
from tests.nets import Plain


def _explain(
    model: Path, x: np.ndarray, depth: int, **kw: object
) -> tuple[Explainer, Run, Pyramid]:
    ex = Explainer(str(model), clip_shape=x.shape)
    run = ex.run(x, depth=depth, full=ex.map_tensors(depth))
    return ex, run, ex.pyramid(run, depth=depth, **kw)  # type: ignore[arg-type]


def _reference(ex: Explainer, pyr: Pyramid, run: Run, node: int, size: tuple[int, ...], *,
               weighted: bool = False) -> np.ndarray:  # fmt: skip
    """SPEC §6 written out slowly: loop over kept channels, torch's trilinear resize."""
    layer = ex.layers[int(pyr.node_layer[node])]
    if node in set(pyr.link_source.tolist()):
        x = run.full[layer.input]
        m = np.zeros(x.shape[1:], dtype=np.float64)
        for c, s in zip(
            pyr.kept_channel[pyr.kept_node == node], pyr.kept_score[pyr.kept_node == node]
        ):
            m += x[c] * (s if weighted else 1.0)
    else:
        m = run.full[layer.output][int(pyr.node_channel[node])].astype(np.float64)
    big = F.interpolate(torch.from_numpy(m)[None, None], size=size, mode="trilinear",
                        align_corners=False)[0, 0].numpy()  # fmt: skip
    lo, hi = big.min(), big.max()
    return (big - lo) / (hi - lo) if hi > lo else np.zeros_like(big)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("plain") / "plain.onnx"
    export_torch(Plain(), (1, 3, 4, 16, 16), path)
    return path


@pytest.mark.parametrize("weighted", [False, True])
def test_tubes_equal_a_direct_computation(plain_model: Path, weighted: bool) -> None:
    x = np.random.default_rng(1).normal(size=(1, 3, 4, 16, 16)).astype(np.float32)
    ex, run, pyr = _explain(plain_model, x, 3, theta=0.3)
    assert pyr.max_depth_reached == 2 and len(pyr.link_source)
    size = (6, 20, 24)  # not the clip size: the resize must really interpolate
    nodes = np.arange(len(pyr.node_layer))
    got = tubes.TubeMaker(ex, pyr, run, size, weighted=weighted).tubes(nodes)
    assert got.maps.shape == (len(nodes), *size)
    for k in nodes.tolist():
        np.testing.assert_allclose(got.maps[k], _reference(ex, pyr, run, k, size, weighted=weighted),
                                   atol=2e-5)  # fmt: skip


@pytest.mark.parametrize(("n_in", "n_out"), [(1, 5), (4, 16), (7, 3), (16, 16), (5, 13)])
def test_linear_matrix_matches_torch(n_in: int, n_out: int) -> None:
    x = np.random.default_rng(n_in).normal(size=(2, n_in)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x)[None], size=n_out, mode="linear", align_corners=False)
    np.testing.assert_allclose(x @ tubes.linear_matrix(n_in, n_out).T, want[0].numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def color(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Explainer, Run, Pyramid, np.ndarray, np.ndarray]:
    frames, mask = moving_square()
    path = color_model(tmp_path_factory.mktemp("color") / "color.onnx")
    ex, run, pyr = _explain(path, to_tensor(frames), 2, theta=0.0, label=0)
    return ex, run, pyr, frames, mask


def _node(pyr: Pyramid, name: str) -> int:
    return [pyr.kernel_name(i) for i in range(len(pyr.node_layer))].index(name)


@pytest.mark.parametrize("kernel", ["conv1:0", "conv2:0", "conv1:3"])
def test_tube_peaks_on_the_red_square(color: tuple, kernel: str) -> None:  # type: ignore[type-arg]
    ex, run, pyr, frames, mask = color
    tube = tubes.TubeMaker(ex, pyr, run, frames.shape[:3]).tubes([_node(pyr, kernel)]).maps[0]
    peaks = [np.unravel_index(np.argmax(f), f.shape) for f in tube]
    assert all(mask[t][p] for t, p in enumerate(peaks)), peaks
    hot = tube >= 0.5 * tube.max(axis=(1, 2), keepdims=True)
    xs = [float(np.nonzero(h)[1].mean()) for h in hot]  # centre of the hot region
    square = [float(np.nonzero(m)[1].mean()) for m in mask]
    assert np.abs(np.array(xs) - square).max() <= 2.0, (xs, square)  # it follows the square


def test_green_kernel_does_not_find_the_red_square(color: tuple) -> None:  # type: ignore[type-arg]
    ex, run, pyr, frames, mask = color
    tube = tubes.TubeMaker(ex, pyr, run, frames.shape[:3]).tubes([_node(pyr, "conv1:1")]).maps[0]
    assert not any(mask[t].flat[np.argmax(f)] for t, f in enumerate(tube))


def test_frame_shuffle_labels_motion_and_appearance(color: tuple) -> None:  # type: ignore[type-arg]
    ex, run, pyr, frames, _ = color
    nodes = np.array([_node(pyr, "conv1:0"), _node(pyr, "conv1:3")])
    perm = tubes.shuffle_order(frames.shape[0])
    assert not np.any(perm == np.arange(len(perm)))
    x = to_tensor(frames)
    shuffled = ex.run(tubes.shuffle_frames(x, 2, perm), depth=2, full=ex.map_tensors(2))
    test = tubes.motion_test(tubes.TubeMaker(ex, pyr, run, frames.shape[:3]), nodes, shuffled, perm)
    assert test.ratio[0] == pytest.approx(1.0, abs=0.01)  # a per-frame colour detector
    assert test.labels == ("appearance", "motion")  # red that persists over three frames


def test_missing_map_is_a_clear_error(color: tuple) -> None:  # type: ignore[type-arg]
    ex, run, pyr, frames, _ = color
    bare = Run(run.logits, run.features, run.pooled, {}, run.plan)
    with pytest.raises(OptionError, match="map_tensors"):
        tubes.TubeMaker(ex, pyr, bare, frames.shape[:3]).tubes([0])


def test_shown_nodes_keeps_the_most_relevant_per_depth(color: tuple) -> None:  # type: ignore[type-arg]
    _, _, pyr, _, _ = color
    shown = tubes.shown_nodes(pyr, per_depth=1)
    assert sorted(pyr.node_depth[shown].tolist()) == [0, 1]
    for k in shown.tolist():
        at = pyr.node_depth == pyr.node_depth[k]
        assert pyr.node_relevance[k] == pyr.node_relevance[at].max()


def test_pictures_and_files(color: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    ex, run, pyr, frames, _ = color
    tube = tubes.TubeMaker(ex, pyr, run, frames.shape[:3]).tubes([0]).maps[0]
    blended = tubes.overlay(frames, tube)
    assert blended.shape == frames.shape and blended.dtype == np.uint8
    # half frame, half JET colour: where the tube is 0, JET is dark blue (0, 0, 128)
    cold = tube == 0
    if cold.any():
        want = (frames[cold].astype(int) + np.array([0, 0, 128])) / 2
        assert np.abs(blended[cold].astype(int) - want).max() <= 1
    names = tubes.write_kernel_files(tmp_path, tubes.safe_stem(0, "a/b<c>", 3), blended)
    assert names[0] == "n00000_a_b_c_c3_strip.png"
    for n in names:
        assert (tmp_path / n).stat().st_size > 100
    assert (tmp_path / names[1]).read_bytes()[:6] == b"GIF89a"
    assert tubes.encode_frames(blended[:1])[0].startswith("data:image/jpeg;base64,")
