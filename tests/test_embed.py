"""`cfp embed`: the embedded outputs equal what the host computes (`Explainer.pyramid`,
`classtube.class_tube`) on the same clip, and the model's own outputs are unchanged.

The host's pyramid is itself checked against autograd on the source models
(test_zoo_pyramids, test_pyramid_models); here the in-graph version must match it:
kernel sets and depths exactly, relevances to 1e-9 (float64 in the graph, as on the
host), the class tube to 1e-4 of its largest value (float32 maps, summed in a different
order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from cfp_onnx import classtube
from cfp_onnx.api import Explainer
from cfp_onnx.embed import (
    LABEL,
    LABEL_INPUT,
    TUBE,
    EmbedInfo,
    clip_geometry,
    depth_name,
    embed,
    embed_to,
    relevance_name,
)
from cfp_onnx.errors import ModelError, OptionError, OutputError
from cfp_onnx.loading import load_model
from cfp_onnx.options import PyramidOptions
from cfp_onnx.runtime import ort
from tests.zoo_helpers import TORCH_REDUCED

MODELS = Path(__file__).resolve().parents[1] / "benchmarks" / "models"
TRAINED = ("x3d", "r3d", "i3d", "resnext", "keras_r3d", "r2plus1d")


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def outputs(s: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feed)))


def check_embedding(
    path: Path,
    clip: np.ndarray,
    opts: PyramidOptions,
    kind: str | None = "contrast",
    *,
    labels: tuple[int | None, ...] = (None,),
) -> EmbedInfo:
    """Embed `path`, run it on `clip`, and compare every output with the host's."""
    loaded = load_model(path)
    shape, size = clip_geometry(loaded)
    ex = Explainer(loaded, clip_shape=tuple(clip.shape))
    proto, info = embed(ex, opts, class_tube=kind, clip_size=size)
    onnx.checker.check_model(proto)
    assert all(o.version >= 17 for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    plain, embedded = session(path), session(proto)
    name = plain.get_inputs()[0].name
    own = outputs(plain, {name: clip})
    # the pyramid from a run without map outputs: extra graph outputs can change how
    # onnxruntime fuses a graph (tf2onnx's transposes), and with it float32 rounding
    run = ex.run(clip, depth=opts.depth)
    with_maps = ex.run(clip, depth=opts.depth, full=ex.map_tensors(opts.depth))
    for label in labels:
        feed = (
            {name: clip}
            if label is None
            else {name: clip, LABEL_INPUT: np.asarray(label, np.int64)}
        )
        got = outputs(embedded, feed)
        for key, value in own.items():  # the model's own outputs, bit for bit
            assert np.array_equal(got[key], value), key
        asked = None if label is None or label < 0 else label  # -1: the prediction
        pyr_opts = PyramidOptions(opts.depth, opts.theta, opts.top_n, opts.head_mode, asked)
        pyr = ex.pyramid(run, pyr_opts)
        assert got[LABEL].tolist() == [pyr.label]
        listed = set(info.layers)
        for li, layer in enumerate(pyr.layers):
            at = pyr.node_layer == li
            if layer not in listed:
                assert not at.any(), layer
                continue
            depth, rel = got[depth_name(layer)][0], got[relevance_name(layer)][0]
            want_depth = np.full(len(depth), -1)
            want_depth[pyr.node_channel[at]] = pyr.node_depth[at]
            want_rel = np.zeros(len(depth))
            want_rel[pyr.node_channel[at]] = pyr.node_relevance[at]
            np.testing.assert_array_equal(depth, want_depth, err_msg=layer)
            np.testing.assert_allclose(rel, want_rel, rtol=0, atol=1e-9, err_msg=layer)
        if kind is not None:
            seen = ex.pyramid(with_maps, pyr_opts)
            assert np.array_equal(seen.node_channel, pyr.node_channel)
            want = classtube.class_tube(ex, with_maps, seen, size, kind)
            tube = got[TUBE][0]
            assert tube.shape == want.shape == size
            scale = max(1.0, float(np.abs(want).max()))
            assert float(np.abs(tube - want).max()) <= 1e-4 * scale
    return info


def net_clip(shape: tuple[int, ...], seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("name", TRAINED)
def test_trained_models_embed_exactly(name):
    """The trained models of benchmarks/ (torch and Keras, NCDHW and NDHWC)."""
    path = MODELS / f"{name}.onnx"
    shape, _ = clip_geometry(load_model(path))
    info = check_embedding(path, net_clip(shape), PyramidOptions(depth=3, theta=0.6))
    assert len(info.layers) >= 2


def test_nets_embed_exactly(exported):
    """Hand-written nets: residual, grouped, branch concat, SE gates, multi-fiber, shuffle."""
    from tests import nets

    for name in nets.MODELS:
        _, path = exported(name)
        check_embedding(path, net_clip(nets.CLIP), PyramidOptions(depth=3, theta=0.5))


@pytest.mark.parametrize("name", sorted(TORCH_REDUCED))
def test_zoo_models_embed_exactly(tmp_path, name):
    pytest.importorskip("torch")
    from cfp_onnx.exporters.pytorch import export_torch

    from tests.zoo_helpers import TORCH_SHAPE, torch_model

    path = tmp_path / f"{name}.onnx"
    export_torch(torch_model(name), TORCH_SHAPE, path)
    check_embedding(path, net_clip(TORCH_SHAPE), PyramidOptions(depth=3, theta=0.6))


def test_a_graph_onnxruntime_optimised_embeds_exactly(tmp_path):
    """Saved at the extended level: com.microsoft FusedConv, a residual Add as its Z."""
    pytest.importorskip("torch")
    from cfp_onnx.exporters.pytorch import export_torch

    from tests.test_optimised import saved_at
    from tests.zoo_helpers import TORCH_SHAPE, torch_model

    path = tmp_path / "r50.onnx"
    export_torch(torch_model("resnet50_3d"), TORCH_SHAPE, path)
    fused = saved_at(path, "extended")
    assert any(n.op_type == "FusedConv" for n in onnx.load(str(fused)).graph.node)
    check_embedding(fused, net_clip(TORCH_SHAPE), PyramidOptions(theta=0.6))


@pytest.mark.parametrize("name", ["x3d", "csn", "slowfast"])
def test_library_models_embed_exactly(tmp_path, name):
    """pytorchvideo's X3D (depth-wise, SE), CSN (channel-separated) and SlowFast."""
    pytest.importorskip("pytorchvideo")
    from cfp_onnx.exporters.pytorch import export_torch

    from tests.test_library_models import SHAPE, _seeded

    path = tmp_path / f"{name}.onnx"
    export_torch(_seeded(name), SHAPE, path)
    check_embedding(path, net_clip(SHAPE), PyramidOptions(theta=0.6))


def test_a_keras_zoo_model_embeds_exactly(tmp_path):
    """Channels-last (NDHWC) and grouped: the Keras ResNeXt-3D through tf2onnx."""
    pytest.importorskip("tensorflow")
    from cfp_onnx.exporters.tensorflow import export_keras

    from tests.zoo_helpers import keras_model, keras_shape

    path = tmp_path / "k.onnx"
    export_keras(keras_model("resnext101_3d"), path)
    check_embedding(path, net_clip(keras_shape("resnext101_3d")), PyramidOptions(theta=0.6))


@pytest.mark.parametrize("net", ["residual", "mfnet"])
@pytest.mark.parametrize("head_mode", ["weights", "contribution", "contrastive"])
@pytest.mark.parametrize(
    ("depth", "theta", "top_n"), [(1, 0.6, None), (2, 0.0, 2), (4, 0.4, None), (3, 0.0, 1)]
)
def test_every_option_embeds_exactly(exported, net, head_mode, depth, theta, top_n):
    from tests import nets

    _, path = exported(net)
    opts = PyramidOptions(depth=depth, theta=theta, top_n=top_n, head_mode=head_mode)
    for kind in ("weighted", "contrast"):
        check_embedding(path, net_clip(nets.CLIP, seed=depth), opts, kind)


def test_the_label_input_explains_any_class(exported):
    """Every class through cfp_explain_label, and -1 back to the prediction."""
    from tests import nets

    _, path = exported("resnext")
    classes = Explainer(path).classes
    check_embedding(
        path, net_clip(nets.CLIP), PyramidOptions(theta=0.5, head_mode="contribution"),
        labels=(*range(classes), -1),
    )  # fmt: skip


def test_a_batch_gives_each_clip_its_own_explanation(exported):
    from tests import nets

    _, path = exported("inception")
    ex = Explainer(path)
    proto, info = embed(
        ex, PyramidOptions(theta=0.5), class_tube="weighted", clip_size=nets.CLIP[2:]
    )
    s = session(proto)
    clips = [net_clip(nets.CLIP, seed=s_) for s_ in (1, 2, 3)]
    batch = outputs(s, {"video": np.concatenate(clips)})
    for i, c in enumerate(clips):
        alone = outputs(s, {"video": c})
        for key in info.outputs:
            np.testing.assert_allclose(
                batch[key][i], alone[key][0], rtol=1e-5, atol=1e-6, err_msg=key
            )
    assert len(set(batch[LABEL].tolist())) >= 1 and batch[TUBE].shape[0] == 3


def test_a_dynamo_export_at_opset_18_embeds_exactly(exported):
    """Opset 18 takes reduction axes as inputs; the model keeps its own opset."""
    from tests import nets

    _, path = exported("residual", dynamo=True)
    check_embedding(path, net_clip(nets.CLIP), PyramidOptions(theta=0.5, top_n=2))


def float32_agreement(
    path: Path, clip: np.ndarray, opts: PyramidOptions
) -> tuple[float, float, float]:
    """(kernel-set Jaccard, largest relevance difference on shared kernels, largest class
    tube difference / its largest value) of a float32 embedding against the host."""
    loaded = load_model(path)
    _, size = clip_geometry(loaded)
    ex = Explainer(loaded, clip_shape=tuple(clip.shape))
    proto, info = embed(ex, opts, class_tube="contrast", clip_size=size, precision="float32")
    assert info.precision == "float32"
    plain, embedded = session(path), session(proto)
    name = plain.get_inputs()[0].name
    got = outputs(embedded, {name: clip})
    for key, value in outputs(plain, {name: clip}).items():
        assert np.array_equal(got[key], value), key
    run = ex.run(clip, depth=opts.depth, full=ex.map_tensors(opts.depth))
    pyr = ex.pyramid(run, opts)
    host = {
        (pyr.layers[la], int(c)): float(r)
        for la, c, r in zip(pyr.node_layer, pyr.node_channel, pyr.node_relevance)
    }
    mine: dict[tuple[str, int], float] = {}
    for layer in info.layers:
        rel = got[relevance_name(layer)][0]
        assert rel.dtype == np.float32
        for c in np.flatnonzero(got[depth_name(layer)][0] >= 0).tolist():
            mine[(layer, c)] = float(rel[c])
    shared = host.keys() & mine.keys()
    jaccard = len(shared) / max(1, len(host.keys() | mine.keys()))
    worst = max((abs(host[k] - mine[k]) for k in shared), default=0.0)
    want = classtube.class_tube(ex, run, pyr, size, "contrast")
    tube = float(np.abs(got[TUBE][0] - want).max()) / max(1.0, float(np.abs(want).max()))
    return jaccard, worst, tube


@pytest.mark.parametrize("name", TRAINED)
def test_float32_arithmetic_stays_within_its_bound(name):
    """float32 in the graph (for runtimes without doubles): on these clips the same
    kernels, relevances within 1e-4 and the class tube within 1e-4 of its largest value.
    (A keep decision can flip only for a score within float32 rounding of theta.)"""
    path = MODELS / f"{name}.onnx"
    shape, _ = clip_geometry(load_model(path))
    jaccard, worst, tube = float32_agreement(path, net_clip(shape), PyramidOptions(theta=0.6))
    assert jaccard == 1.0 and worst <= 1e-4 and tube <= 1e-4, (jaccard, worst, tube)


def test_an_opset_11_model_is_converted_and_keeps_its_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    from tests import nets

    path = tmp_path / "old.onnx"
    torch.onnx.export(
        nets.build("residual"), (torch.randn(*nets.CLIP),), str(path), dynamo=False,
        opset_version=11, input_names=["video"], output_names=["logits"],
    )  # fmt: skip
    check_embedding(path, net_clip(nets.CLIP), PyramidOptions(theta=0.5))


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_a_quantised_model_embeds_its_dequantised_pyramid(tmp_path, exported, fmt):
    """int8 by onnxruntime's static quantisation. A QOperator file is embedded as the QDQ
    graph it computes; onnxruntime fuses that back, and its logits stay bit-equal here."""
    from tests import nets
    from tests.test_quantised import _static

    _, path = exported("residual")
    q = _static(path, tmp_path / "q.onnx", nets.CLIP, fmt)
    check_embedding(q, net_clip(nets.CLIP), PyramidOptions(theta=0.5))


def test_external_weights_are_copied_into_the_embedded_model(tmp_path, exported):
    _, path = exported("plain")
    model = onnx.load(str(path))
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(
        model, str(src / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0
    )
    out = tmp_path / "explained.onnx"
    embed_to(src / "m.onnx", out, PyramidOptions(theta=0.5))
    (src / "m.data").unlink()  # the embedded model stands alone
    from tests import nets

    clip = net_clip(nets.CLIP)
    got = outputs(session(out), {"video": clip})
    want = outputs(session(path), {"video": clip})
    assert np.array_equal(got["logits"], want["logits"])


def test_an_embedded_model_is_explained_and_inspected_as_the_original(tmp_path, exported):
    from cfp_onnx.inspection import inspect_model
    from tests import nets

    _, path = exported("resnext")
    out = tmp_path / "e.onnx"
    _, info = embed_to(path, out, PyramidOptions(theta=0.5), class_tube="contrast")
    clip = net_clip(nets.CLIP)
    a, b = Explainer(path).explain(clip, theta=0.5), Explainer(out).explain(clip, theta=0.5)
    assert np.array_equal(a.node_relevance, b.node_relevance) and a.layers == b.layers
    report = inspect_model(out)
    assert report.embedded == info == EmbedInfo.of(onnx.load(str(out)))
    text = "\n".join(report.lines())
    assert all(layer in text for layer in info.layers) and TUBE in text and LABEL_INPUT in text


def test_bad_requests_are_refused(tmp_path, exported):
    _, path = exported("plain")
    ex = Explainer(path)
    with pytest.raises(OptionError, match="drop --label"):
        embed(ex, PyramidOptions(label=1))
    with pytest.raises(OptionError, match="class tube must be one of"):
        embed(ex, class_tube="grad-cam", clip_size=(4, 16, 16))
    with pytest.raises(OutputError, match="must not replace"):
        embed_to(path, path, overwrite=True)
    out = tmp_path / "e.onnx"
    out.write_bytes(b"mine")
    with pytest.raises(OutputError, match="already exists"):
        embed_to(path, out)
    assert out.read_bytes() == b"mine"
    dynamic = tmp_path / "dyn.onnx"
    m = onnx.load(str(path))
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "frames"
    onnx.save(m, str(dynamic))
    with pytest.raises(OptionError, match="--frames"):
        clip_geometry(load_model(dynamic))
    bad = tmp_path / "bad_meta.onnx"
    onnx.helper.set_model_props(m, {"cfp.embedded": "{not json"})
    onnx.save(m, str(bad))
    with pytest.raises(ModelError, match=r"cfp\.embedded"):
        EmbedInfo.of(onnx.load(str(bad)))


def test_empty_pyramids_and_empty_frontiers_embed_exactly(exported):
    """theta 1 in the paper's mode keeps only the head weight's largest entries: most
    classes get an empty pyramid (no rows to score at any level, a zero class tube)."""
    from tests import nets

    _, path = exported("residual")
    classes = Explainer(path).classes
    for kind in ("weighted", "contrast"):
        check_embedding(
            path, net_clip(nets.CLIP), PyramidOptions(theta=1.0), kind, labels=tuple(range(classes))
        )
    ex = Explainer(path)
    run = ex.run(net_clip(nets.CLIP), depth=3)
    assert any(ex.pyramid(run, theta=1.0, label=k).empty for k in range(classes))
