"""A channels-last Keras model exported with tf2onnx explains exactly as its channels-first
PyTorch twin (same weights), and its links pass the perturbation oracle."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tf2onnx = pytest.importorskip("tf2onnx")
torch = pytest.importorskip("torch")

from cfp_onnx.api import Explainer  # noqa: E402
from tests.perturbation_check import perturbation_truth  # noqa: E402

SHAPE = (1, 4, 16, 16, 3)  # NDHWC


def _keras():
    keras = tf.keras
    keras.utils.set_random_seed(0)
    x = keras.Input(SHAPE[1:], batch_size=1, name="video")
    a = keras.layers.Conv3D(8, 3, padding="same", activation="relu", name="stem")(x)
    b = keras.layers.Conv3D(8, 3, padding="same", name="conv_b")(a)
    s = keras.layers.Conv3D(8, 1, name="short")(a)
    y = keras.layers.ReLU()(keras.layers.Add()([b, s]))
    y = keras.layers.Conv3D(12, 3, strides=2, padding="same", activation="relu", name="conv_c")(y)
    y = keras.layers.GlobalAveragePooling3D()(y)
    return keras.Model(x, keras.layers.Dense(5, name="fc")(y))


class Twin(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        c = torch.nn.Conv3d
        self.stem, self.conv_b = c(3, 8, 3, padding=1), c(8, 8, 3, padding=1)
        self.short, self.conv_c = c(8, 8, 1), c(8, 12, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(12, 5)

    def forward(self, x):
        a = torch.relu(self.stem(x))
        y = torch.relu(self.conv_b(a) + self.short(a))
        # Keras pads 'same' stride-2 convs at the end only; match it explicitly.
        y = torch.relu(self.conv_c(torch.nn.functional.pad(y, (0, 1, 0, 1, 0, 1))))
        return self.fc(y.mean(dim=(2, 3, 4)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("keras")
    km = _keras()
    spec = (tf.TensorSpec(SHAPE, tf.float32, name="video"),)
    fn = tf.function(lambda x: km(x, training=False))
    tf2onnx.convert.from_function(
        fn, input_signature=spec, opset=17, output_path=str(root / "k.onnx")
    )
    twin = Twin().eval()
    with torch.no_grad():
        for name in ("stem", "conv_b", "short", "conv_c"):
            w, b = km.get_layer(name).get_weights()
            mod = getattr(twin, name)
            mod.weight.copy_(torch.from_numpy(w.transpose(4, 3, 0, 1, 2)))
            mod.bias.copy_(torch.from_numpy(b))
            if name == "conv_c":
                mod.padding = (0, 0, 0)
        w, b = km.get_layer("fc").get_weights()
        twin.fc.weight.copy_(torch.from_numpy(w.T))
        twin.fc.bias.copy_(torch.from_numpy(b))
    torch.onnx.export(
        twin,
        (torch.zeros(1, 3, 4, 16, 16),),
        str(root / "t.onnx"),
        dynamo=False,
        input_names=["video"],
        output_names=["logits"],
        opset_version=17,
    )
    clip = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    return root / "k.onnx", root / "t.onnx", clip


def _keyed(p, rename):
    nodes = {
        (rename[p.layers[la]], ch): (d, r)
        for la, ch, d, r in zip(p.node_layer, p.node_channel, p.node_depth, p.node_relevance)
    }
    key = [(rename[p.layers[la]], int(ch)) for la, ch in zip(p.node_layer, p.node_channel)]
    links = {(key[s], key[t]): r for s, t, r in zip(p.link_source, p.link_target, p.link_relevance)}
    return nodes, links


def _by_weight(ex):
    """Layer name -> a framework-independent key: the weight, rounded."""
    return {lay.node: np.round(lay.weight.astype(np.float64), 5).tobytes() for lay in ex.layers}


@pytest.mark.parametrize("head_mode", ["weights", "contribution"])
def test_channels_last_explains_like_channels_first_twin(pair, head_mode):
    kpath, tpath, clip = pair
    kx = Explainer(kpath, clip_shape=clip.shape)
    tx = Explainer(tpath, clip_shape=(1, 3, 4, 16, 16))
    assert len(kx.layers) == 4
    pk = kx.explain(clip, theta=0.4, head_mode=head_mode)
    pt = tx.explain(
        np.ascontiguousarray(clip.transpose(0, 4, 1, 2, 3)), theta=0.4, head_mode=head_mode
    )
    np.testing.assert_allclose(pk.logits, pt.logits, atol=1e-4)
    nk, lk = _keyed(pk, _by_weight(kx))
    nt, lt = _keyed(pt, _by_weight(tx))
    assert nk.keys() == nt.keys() and lk.keys() == lt.keys()
    for k in nk:
        assert nk[k][0] == nt[k][0]
        assert nk[k][1] == pytest.approx(nt[k][1], abs=1e-4)
    for k in lk:
        assert lk[k] == pytest.approx(lt[k], abs=1e-4)


def test_channels_last_provenance_is_real(pair):
    kpath, _, clip = pair
    ex = Explainer(kpath, clip_shape=clip.shape)
    truth, head = perturbation_truth(ex, clip)
    offsets = ex.provenance.offsets
    for i, lay in enumerate(ex.layers):
        csr = ex.input_csr(i)
        for c in range(lay.c_in):
            ks = csr.kernels[csr.indptr[c] : csr.indptr[c + 1]]
            la = np.searchsorted(offsets, ks, side="right") - 1
            got = {(ex.layers[a].node, int(k - offsets[a])) for a, k in zip(la, ks)}
            assert got == truth[lay.node][c]
