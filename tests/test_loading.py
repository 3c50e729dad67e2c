"""Loading: external weights stay on disk, unsafe paths are refused, names are made unique."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from cfp_onnx.api import Explainer
from cfp_onnx.errors import ClipError, ModelError
from cfp_onnx.loading import load_model, name_nodes
from tests import nets
from tests.bad_inputs.models import point_weights_at


def _external_copy(src, folder, location="weights.bin"):
    folder.mkdir(exist_ok=True)
    m = onnx.load(str(src))
    onnx.save_model(
        m, str(folder / "model.onnx"), save_as_external_data=True,
        all_tensors_to_one_file=True, location=location, size_threshold=0,
    )  # fmt: skip
    return folder / "model.onnx"


def test_external_data_model_explains_like_embedded(exported, tmp_path):
    _, path = exported("residual")
    ext = _external_copy(path, tmp_path / "ext")
    inline = load_model(path)  # weights stored inside the .onnx: referenced in place
    assert {e.file for e in inline.external.values()} == {path.resolve()}
    loaded = load_model(ext)
    assert loaded.external, "weights should stay in their file, not be inlined"
    assert {e.file.name for e in loaded.external.values()} == {"weights.bin"}
    assert not any(t.raw_data for t in loaded.proto.graph.initializer if t.name in loaded.external)
    clip = np.random.default_rng(0).standard_normal(nets.CLIP).astype(np.float32)
    a = Explainer(path, clip_shape=clip.shape).explain(clip, theta=0.5)
    b = Explainer(ext, clip_shape=clip.shape).explain(clip, theta=0.5)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.link_target, b.link_target)
    np.testing.assert_array_equal(a.link_relevance, b.link_relevance)


def test_fully_external_shape_constants_are_read_and_weights_stay_on_disk(tmp_path):
    """``size_threshold=0`` puts the Reshape / Unsqueeze / Squeeze shapes in the weight file
    too: they are read (small integers), the conv weights are not, and the pyramid is the
    inline model's."""
    from tests.graphs import G

    g = G()
    y = g.relu(g.conv(g.relu(g.conv("video", 3, 32)), 32, 64))
    p = g.op("GlobalAveragePool", y)
    r = g.op("Reshape", p, g.const(np.array([1, 64], np.int64), np.int64))
    u = g.op("Unsqueeze", r, g.const(np.array([2], np.int64), np.int64))
    s = g.op("Squeeze", u, g.const(np.array([2], np.int64), np.int64))
    path = g.save(tmp_path / "m.onnx", [g.gemm(s, 64, 3)])
    ext = _external_copy(path, tmp_path / "ext")
    loaded = load_model(ext)
    kinds = {e.dtype for e in loaded.external.values()}
    assert loaded.external and kinds == {np.dtype(np.float32)}  # weights on disk, shapes read
    clip = np.random.default_rng(0).standard_normal((1, 3, 4, 8, 8)).astype(np.float32)
    a = Explainer(path, clip_shape=clip.shape).explain(clip, theta=0.3)
    b = Explainer(ext, clip_shape=clip.shape).explain(clip, theta=0.3)
    assert len(a.link_target) > 0
    assert {**a.to_dict(), "model": ""} == {**b.to_dict(), "model": ""}


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_outside_the_folder_is_refused(exported, tmp_path, location):
    _, path = exported("plain")
    ext = point_weights_at(_external_copy(path, tmp_path / "ext"), location)
    with pytest.raises(ModelError, match="outside the model's folder; refusing to read it"):
        load_model(ext)


def test_missing_external_file(exported, tmp_path):
    _, path = exported("plain")
    ext = _external_copy(path, tmp_path / "ext")
    (tmp_path / "ext" / "weights.bin").unlink()
    with pytest.raises(ModelError, match="is missing"):
        load_model(ext)


def test_empty_and_duplicate_names_are_replaced():
    nodes = [
        onnx.helper.make_node("Relu", ["x"], ["a"], name=""),
        onnx.helper.make_node("Relu", ["a"], ["b"], name="dup"),
        onnx.helper.make_node("Relu", ["b"], ["c"], name="dup"),
        onnx.helper.make_node("Relu", ["c"], ["d"], name="keep"),
    ]
    g = onnx.helper.make_graph(nodes, "g", [], [])
    m = onnx.helper.make_model(g)
    name_nodes(m)
    assert [n.name for n in m.graph.node] == ["Relu_0", "Relu_1", "Relu_2", "keep"]


@pytest.mark.parametrize(
    ("shape", "msg"),
    [
        ((1, 3, 5, 16, 16), r"clip has shape \(1, 3, 5, 16, 16\); model input 'video' expects"),
        ((1, 4, 16, 16, 3), "expects"),
        ((2, 3, 4, 16, 16), "batch 1"),
        ((3, 4, 16), "expects"),
    ],
)
def test_clip_shape_mismatch_says_what_is_expected(exported, shape, msg):
    _, path = exported("plain")
    with pytest.raises(ClipError, match=msg):
        Explainer(path, clip_shape=shape)


def test_batch_axis_is_optional(exported):
    _, path = exported("plain")
    clip = np.random.default_rng(0).standard_normal(nets.CLIP).astype(np.float32)
    ex = Explainer(path, clip_shape=clip.shape[1:])
    a = ex.explain(clip[0])
    b = ex.explain(clip)
    np.testing.assert_array_equal(a.node_channel, b.node_channel)


def test_dynamic_dims_without_clip_are_an_error(tmp_path):
    from tests.graphs import G

    g = G(shape=(1, 3, 4, 8, 8))
    z = g.relu(g.conv("video", 3, 4))
    logits = g.gemm(g.pool_flatten(z), 4, 2)
    path = g.save(tmp_path / "m.onnx", [logits])
    m = onnx.load(str(path))
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "frames"
    onnx.save(m, str(path))
    with pytest.raises(ModelError, match="dynamic dims"):
        Explainer(path)
    assert Explainer(path, clip_shape=(1, 3, 6, 8, 8)).input_shape == (1, 3, 6, 8, 8)


def test_read_only_model_folder_falls_back_to_memory(exported, tmp_path, monkeypatch):
    """Where no private folder can be made next to the model, weights are handed over from
    memory-mapped files: same logits, same pyramid."""
    import os

    _, path = exported("residual")
    clip = np.random.default_rng(0).standard_normal(nets.CLIP).astype(np.float32)
    want = Explainer(path, clip_shape=clip.shape).explain(clip, theta=0.5)

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(os, "link", refuse)
    got = Explainer(path, clip_shape=clip.shape).explain(clip, theta=0.5)
    np.testing.assert_array_equal(want.logits, got.logits)
    np.testing.assert_array_equal(want.node_relevance, got.node_relevance)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".cfp-")]


def test_random_bytes_and_non_model_protobufs(tmp_path):
    (tmp_path / "rand.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.onnx").write_bytes(b"")
    g = onnx.helper.make_graph([], "g", [], [])
    (tmp_path / "nograph.onnx").write_bytes(onnx.helper.make_model(g).SerializeToString())
    (tmp_path / "tensor.onnx").write_bytes(
        onnx.numpy_helper.from_array(np.zeros(3, np.float32)).SerializeToString()
    )
    for name in ("rand.onnx", "empty.onnx", "nograph.onnx", "tensor.onnx"):
        with pytest.raises(ModelError):
            load_model(tmp_path / name)


def test_symlinked_model_file_is_read_where_it_points(exported, tmp_path):
    """Inline weights are referenced in the file the user named, even through a symlink to
    another folder; a symlinked *external data* file leaving the folder is still refused."""
    _, path = exported("plain")
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    (link_dir / "model.onnx").symlink_to(path)
    clip = np.random.default_rng(0).standard_normal(nets.CLIP).astype(np.float32)
    a = Explainer(path, clip_shape=clip.shape).explain(clip)
    b = Explainer(link_dir / "model.onnx", clip_shape=clip.shape).explain(clip)
    assert b.model == "model.onnx"
    np.testing.assert_array_equal(a.node_relevance, b.node_relevance)
    ext = _external_copy(path, tmp_path / "ext")
    outside = tmp_path / "outside.bin"
    (tmp_path / "ext" / "weights.bin").rename(outside)
    (tmp_path / "ext" / "weights.bin").symlink_to(outside)
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(ext)
