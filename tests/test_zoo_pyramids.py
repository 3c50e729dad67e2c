"""The analyzer on every zoo model: no unsupported op, and every pyramid link is a real
dependency (autograd on the torch model), grouped links inside their group, twins equal.

The dependency check is independent of the analyzer: each torch conv's output is made
a leaf, and the gradient of a conv's input channel says which kernels it carries.
ReLUs are swapped for leaky ones for the check (dependency is structural: a channel
that a ReLU happens to zero on this clip still depends on its producers), and
squeeze-excitation convs are left out (SPEC §2: a gate's convs are not producers).
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from cfp_onnx.exporters.pytorch import conv_node_names, export_torch
from torch import nn

from cfp_onnx.api import Explainer
from cfp_onnx.compare import match_layers
from cfp_onnx.inspection import inspect_model
from cfp_onnx.pyramid import Pyramid
from tests.zoo_helpers import (
    KERAS_REDUCED,
    TORCH_REDUCED,
    TORCH_SHAPE,
    TWINS,
    clip,
    keras_model,
    keras_shape,
    torch_model,
    twin,
)

Kernel = tuple[str, int]
THETA = 0.5


def is_gate(layer: str) -> bool:
    return "/se/" in layer


@pytest.fixture(scope="module")
def torch_exports(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("zoo")

    @cache
    def get(name: str, dynamo: bool = False) -> tuple[nn.Module, Path]:
        model = torch_model(name)
        path = root / f"{name}{'_dynamo' if dynamo else ''}.onnx"
        export_torch(model, TORCH_SHAPE, path, dynamo=dynamo)
        return model, path

    return get


class Dependencies:
    """Which kernels each conv input channel, and each logit, depends on (autograd)."""

    def __init__(self, model: nn.Module, x: np.ndarray, head: tuple[str, ...]) -> None:
        model = _leaky(copy.deepcopy(model)).eval()
        modules = dict(model.named_modules())
        self.inputs: dict[str, torch.Tensor] = {}
        self.leaves: dict[str, torch.Tensor] = {}
        hooks = []
        for qualname, node in conv_node_names(model).items():
            module = modules[qualname]
            if isinstance(module, nn.Conv3d) and node not in head:
                hooks.append(module.register_forward_pre_hook(self._pre(node)))
                hooks.append(module.register_forward_hook(self._post(node)))
        try:
            self.logits = model(torch.from_numpy(x))
        finally:
            for h in hooks:
                h.remove()
        self._cache: dict[tuple[str, int], set[Kernel]] = {}

    def _pre(self, node: str):
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.inputs[node] = args[0]

        return hook

    def _post(self, node: str):
        def hook(_m: nn.Module, _a: object, out: torch.Tensor) -> torch.Tensor:
            leaf = out.detach().requires_grad_(True)
            self.leaves[node] = leaf
            return leaf

        return hook

    def _carried(self, t: torch.Tensor) -> set[Kernel]:
        if not t.requires_grad:
            return set()
        weights = torch.rand(t.shape, generator=torch.Generator().manual_seed(0)) + 0.5
        names = list(self.leaves)
        grads = torch.autograd.grad(
            (t * weights).sum(),
            [self.leaves[n] for n in names],
            retain_graph=True,
            allow_unused=True,
        )
        out: set[Kernel] = set()
        for name, g in zip(names, grads, strict=True):
            if g is not None and not is_gate(name):
                hit = g.abs().sum(dim=(0, 2, 3, 4)) > 0
                out |= {(name, int(i)) for i in torch.nonzero(hit).reshape(-1).tolist()}
        return out

    def of_input(self, layer: str, channel: int) -> set[Kernel]:
        key = (layer, channel)
        if key not in self._cache:
            self._cache[key] = self._carried(self.inputs[layer][:, channel])
        return self._cache[key]

    def of_logit(self, label: int) -> set[Kernel]:
        return self._carried(self.logits[:, label])


def _leaky(model: nn.Module) -> nn.Module:
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.LeakyReLU(0.1))
    return model


def kernels(p: Pyramid) -> dict[int, Kernel]:
    return {
        i: (p.layers[la], ch)
        for i, (la, ch) in enumerate(
            zip(p.node_layer.tolist(), p.node_channel.tolist(), strict=True)
        )
    }


def links(p: Pyramid) -> dict[tuple[Kernel, Kernel], float]:
    k = kernels(p)
    return {
        (k[s], k[t]): r
        for s, t, r in zip(
            p.link_source.tolist(), p.link_target.tolist(), p.link_relevance.tolist(), strict=True
        )
    }


def check_pyramid(ex: Explainer, p: Pyramid, deps: Dependencies) -> None:
    """Every link is a real dependency through a kept input channel of the parent, that
    channel inside the parent's group; the head's kernels feed the label's logit."""
    assert not p.empty and p.max_depth_reached == 2
    layers = {lay.node: lay for lay in ex.layers}
    k = kernels(p)
    head_kernels = deps.of_logit(p.label)
    for node in np.flatnonzero(p.node_depth == 0).tolist():
        assert k[node] in head_kernels, k[node]
    children: dict[int, set[Kernel]] = {}
    for s, t in zip(p.link_source.tolist(), p.link_target.tolist(), strict=True):
        children.setdefault(s, set()).add(k[t])
    for parent in np.unique(p.kept_node).tolist():
        layer, j = k[parent]
        lay = layers[layer]
        kept = p.kept_channel[p.kept_node == parent].tolist()
        per_in, per_out = lay.c_in // lay.group, lay.c_out // lay.group
        assert all(c // per_in == j // per_out for c in kept), (layer, j, kept)
        real = set().union(*(deps.of_input(layer, c) for c in kept))
        assert children.get(parent, set()) == real, (layer, j)


@pytest.mark.parametrize("name", sorted(TORCH_REDUCED))
def test_torch_zoo_pyramid_links_are_real_dependencies(torch_exports, name: str) -> None:
    model, path = torch_exports(name)
    assert inspect_model(path).unsupported == ()
    ex = Explainer(path, clip_shape=TORCH_SHAPE)
    x = clip(TORCH_SHAPE, seed=3)
    p = ex.explain(x, depth=3, theta=THETA)
    check_pyramid(ex, p, Dependencies(model, x, ex.head.nodes))
    if any(lay.group > 1 for lay in ex.layers):
        grouped = {lay.node for lay in ex.layers if lay.group > 1}
        assert grouped & {p.layers[i] for i in p.node_layer.tolist()}, "no grouped layer reached"


FAST_DYNAMO = ["slowfast_r50", "x3d_m"]
SLOW_DYNAMO = [pytest.param(n, marks=pytest.mark.slow) for n in sorted(TORCH_REDUCED)]
SLOW_DYNAMO = [p for p in SLOW_DYNAMO if p.values[0] not in FAST_DYNAMO]


@pytest.mark.parametrize("name", FAST_DYNAMO + SLOW_DYNAMO)
def test_dynamo_graph_gives_the_same_pyramid(torch_exports, name: str) -> None:
    _, script = torch_exports(name)
    _, dynamo = torch_exports(name, dynamo=True)
    x = clip(TORCH_SHAPE, seed=3)
    a = Explainer(script, clip_shape=TORCH_SHAPE).explain(x, theta=THETA)
    b = Explainer(dynamo, clip_shape=TORCH_SHAPE).explain(x, theta=THETA)
    assert set(kernels(a).values()) == set(kernels(b).values())
    la, lb = links(a), links(b)
    assert set(la) == set(lb)
    assert max(abs(la[key] - lb[key]) for key in la) < 1e-5


@pytest.mark.parametrize("name", sorted(KERAS_REDUCED))
def test_keras_zoo_models_explain(tmp_path: Path, name: str) -> None:
    from cfp_onnx.exporters.tensorflow import export_keras

    export_keras(keras_model(name), tmp_path / "m.onnx")
    assert inspect_model(tmp_path / "m.onnx").unsupported == ()
    ex = Explainer(tmp_path / "m.onnx", clip_shape=keras_shape(name))
    p = ex.explain(clip(keras_shape(name), seed=3), depth=3, theta=THETA)
    assert not p.empty and p.max_depth_reached == 2
    if name == "c3d":
        # a plain chain: each link steps exactly one conv back, to any of its channels
        order = [lay.node for lay in ex.layers]
        assert {p.layers[i] for i in p.node_layer[p.node_depth == 0].tolist()} == {"conv5b"}
        for (parent, _), (child, _) in links(p):
            assert order.index(child) == order.index(parent) - 1


TWIN_CASES = [(n, 3) for n in TWINS] + [
    pytest.param(n, seed, marks=pytest.mark.slow) for n in TWINS for seed in (4, 5, 6)
]


@pytest.mark.parametrize("name, seed", TWIN_CASES)
def test_twins_give_the_same_pyramid(tmp_path: Path, name: str, seed: int) -> None:
    from cfp_onnx.exporters.tensorflow import export_keras

    pair = twin(name, seed=seed)
    export_torch(pair.torch_model, TORCH_SHAPE, tmp_path / "t.onnx")
    export_keras(pair.keras_model, tmp_path / "k.onnx")
    x = clip(TORCH_SHAPE, seed=seed)
    x_last = np.ascontiguousarray(x.transpose(0, 2, 3, 4, 1))
    ex_t = Explainer(tmp_path / "t.onnx", clip_shape=x.shape)
    ex_k = Explainer(tmp_path / "k.onnx", clip_shape=x_last.shape)
    pt, pk = ex_t.explain(x, theta=THETA), ex_k.explain(x_last, theta=THETA)
    assert pt.label == pk.label and pt.score == pytest.approx(pk.score, abs=1e-4)
    to_torch = {k: t for t, k in pair.conv_nodes.items()}
    # cfp compare pairs the twins' layers by their weights, without the transfer's map
    # (the exporters order ResNet's downsample conv differently)
    matched = match_layers(ex_t, ex_k)
    assert matched is not None and set(matched.how) == {"weights"}
    layers = {a: b for a, b in pair.conv_nodes.items() if a in ex_t.layer_index}  # no logits conv
    assert {a: b for a, b, _ in matched.pairs(ex_t, ex_k)} == layers

    def mapped(p: Pyramid, names: dict[str, str]) -> dict[Kernel, tuple[int, float]]:
        return {
            (names.get(p.layers[la], p.layers[la]), ch): (d, r)
            for la, ch, d, r in zip(
                p.node_layer.tolist(),
                p.node_channel.tolist(),
                p.node_depth.tolist(),
                p.node_relevance.tolist(),
                strict=True,
            )
        }

    nodes_t, nodes_k = mapped(pt, {}), mapped(pk, to_torch)
    assert set(nodes_t) == set(nodes_k) and len(nodes_t) > 10
    for key, (d, r) in nodes_t.items():
        assert nodes_k[key][0] == d and nodes_k[key][1] == pytest.approx(r, abs=1e-4)
    lt = links(pt)
    lk = {((to_torch[a], i), (to_torch[b], j)): r for ((a, i), (b, j)), r in links(pk).items()}
    assert set(lt) == set(lk)
    assert max(abs(lt[key] - lk[key]) for key in lt) < 1e-4
