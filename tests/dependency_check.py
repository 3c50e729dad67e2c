"""Ground truth for pyramids, decided by autograd on the PyTorch model, not by the analyzer.

Every conv output is made a leaf; the gradient of a conv's input channel c w.r.t.
those leaves says exactly which kernels (P, i) channel c carries. Squeeze-excitation
gates are detached (tests/nets.SqueezeExcite.detach), as SPEC §2 says.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cfp_onnx.api import Explainer
from cfp_onnx.pyramid import Pyramid


@dataclass
class Truth:
    convs: list[nn.Conv3d]  # torch convs, in the order of `names`
    names: list[str]  # the ONNX layer each conv became
    inputs: dict[str, np.ndarray]  # layer -> its input activation (C, T, H, W), float64
    prov: dict[str, list[set[tuple[str, int]]]]  # layer -> per input channel, kernels carried
    head_prov: list[set[tuple[str, int]]]  # per classifier feature
    head_features: np.ndarray  # pooled classifier input
    fc_weight: np.ndarray
    logits: np.ndarray


def match_layers(model: nn.Module, ex: Explainer) -> dict[nn.Conv3d, str]:
    """Pair torch convs with ONNX layers by their weights (direction per output channel:
    folding BatchNorm scales each output channel, which this ignores)."""

    def fingerprint(w: np.ndarray) -> np.ndarray:
        w = w.reshape(w.shape[0], -1).astype(np.float64)
        return w / np.linalg.norm(w, axis=1, keepdims=True)

    out: dict[nn.Conv3d, str] = {}
    layers = {lay.node: fingerprint(lay.weight) for lay in ex.layers}
    for m in model.modules():
        if not isinstance(m, nn.Conv3d) or m is logits_conv(model, ex):
            continue
        fp = fingerprint(m.weight.detach().numpy())
        hits = [
            n for n, f in layers.items() if f.shape == fp.shape and np.allclose(f, fp, atol=1e-5)
        ]
        assert len(hits) == 1, f"conv {m} matched {hits}"
        out[m] = hits[0]
    assert sorted(out.values()) == sorted(layers), "some ONNX layers have no torch conv"
    return out


def logits_conv(model: nn.Module, ex: Explainer) -> nn.Conv3d | None:
    """The classifier when it is a 1x1x1 conv (S3D, I3D): the model's last conv, as wide as
    the classes, and no Linear after the convs."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    if any(isinstance(m, nn.Linear) for m in model.modules()) or not convs:
        return None
    last = convs[-1]
    return last if last.out_channels == ex.classes and last.kernel_size == (1, 1, 1) else None


@contextmanager
def statistics_detached():
    """LayerNorm's mean and variance as constants while taking gradients: SPEC-silent, we
    pass provenance through normalisations (as SPEC §2 does for Group/Instance norm); their
    statistics scale a position, like a gate, and are not producers."""
    saved = torch.nn.functional.layer_norm

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5):  # type: ignore[no-untyped-def]
        dims = tuple(range(-len(shape), 0))
        mean = x.mean(dims, keepdim=True).detach()
        var = x.var(dims, unbiased=False, keepdim=True).detach()
        y = (x - mean) / torch.sqrt(var + eps)
        if weight is not None:
            y = y * weight
        return y + bias if bias is not None else y

    torch.nn.functional.layer_norm = layer_norm
    try:
        yield
    finally:
        torch.nn.functional.layer_norm = saved


@contextmanager
def leaky_relus():
    """ReLU -> LeakyReLU while taking gradients: a dead ReLU channel still depends
    structurally on its inputs, it just has zero gradient at this clip."""
    saved = torch.relu, nn.ReLU.forward

    def leaky(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.leaky_relu(x, 0.1)

    torch.relu = leaky  # type: ignore[assignment]
    nn.ReLU.forward = lambda self, x: leaky(x)  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.relu, nn.ReLU.forward = saved  # type: ignore[method-assign]


def autograd_truth(model: nn.Module, ex: Explainer, clip: np.ndarray) -> Truth:
    real = _capture(model, ex, clip)
    with leaky_relus(), statistics_detached():
        grads = _capture(model, ex, clip)
    return Truth(
        convs=real.convs,
        names=real.names,
        inputs=real.inputs,
        prov=grads.prov,
        head_prov=grads.head_prov,
        head_features=real.head_features,
        fc_weight=real.fc_weight,
        logits=real.logits,
    )


def _capture(model: nn.Module, ex: Explainer, clip: np.ndarray) -> Truth:
    names = match_layers(model, ex)
    leaves: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    head_in: list[torch.Tensor] = []
    hooks = []

    def pre(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs[names[mod]] = args[0]  # type: ignore[index]

    def post(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        leaf = out.detach().requires_grad_(True)
        leaves[names[mod]] = leaf  # type: ignore[index]
        return leaf.clone()  # a model's in-place activation may follow: not on the leaf

    fc = logits_conv(model, ex) or [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    hooks.append(fc.register_forward_pre_hook(lambda m, a: head_in.append(a[0])))
    for m in names:
        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    from tests.nets import SqueezeExcite

    SqueezeExcite.detach = True
    try:
        logits = model(torch.from_numpy(clip))
    finally:
        SqueezeExcite.detach = False
        for h in hooks:
            h.remove()
    leaf_names = list(leaves)
    leaf_list = [leaves[n] for n in leaf_names]

    def carried(t: torch.Tensor) -> list[set[tuple[str, int]]]:
        rng = torch.Generator().manual_seed(0)
        out = []
        for c in range(t.shape[1]):
            r = torch.rand(t[:, c].shape, generator=rng) + 0.5
            if not t.requires_grad:
                out.append(set())
                continue
            grads = torch.autograd.grad(
                (t[:, c] * r).sum(), leaf_list, retain_graph=True, allow_unused=True
            )
            s = set()
            for n, g in zip(leaf_names, grads):
                if g is not None:
                    nz = g.abs().sum(dim=tuple(d for d in range(g.ndim) if d != 1)) > 0
                    s |= {(n, int(i)) for i in torch.nonzero(nz).reshape(-1).tolist()}
            out.append(s)
        return out

    prov = {names[m]: carried(inputs[names[m]]) for m in names}
    feats = head_in[0]
    return Truth(
        convs=list(names),
        names=list(names.values()),
        inputs={k: v.detach().double().numpy()[0] for k, v in inputs.items()},
        prov=prov,
        head_prov=carried(feats),
        head_features=feats.detach().double().numpy().reshape(-1),
        fc_weight=fc.weight.detach().double().numpy().reshape(fc.weight.shape[0], -1),
        logits=logits.detach().double().numpy().reshape(-1),
    )


def analyzer_sets(
    ex: Explainer, csr_indptr: np.ndarray, csr_kernels: np.ndarray
) -> list[set[tuple[str, int]]]:
    offsets = ex.provenance.offsets
    layer = np.searchsorted(offsets, csr_kernels, side="right") - 1
    names = [ex.layers[i].node for i in layer]
    chans = (csr_kernels - offsets[layer]).tolist()
    pairs = list(zip(names, chans))
    return [set(pairs[csr_indptr[c] : csr_indptr[c + 1]]) for c in range(len(csr_indptr) - 1)]


def kernel_children(p: Pyramid) -> dict[tuple[str, int], dict[tuple[str, int], float]]:
    out: dict[tuple[str, int], dict[tuple[str, int], float]] = {}
    key = [(p.layers[la], ch) for la, ch in zip(p.node_layer.tolist(), p.node_channel.tolist())]
    for s, t, r in zip(p.link_source.tolist(), p.link_target.tolist(), p.link_relevance.tolist()):
        out.setdefault(key[s], {})[key[t]] = r
    return out


def reference_pyramid(
    truth: Truth, *, label: int, depth: int, theta: float, group: dict[str, int]
) -> tuple[dict[tuple[str, int], int], dict[tuple[tuple[str, int], tuple[str, int]], float]]:
    """SPEC §3-5 the slow way: one kernel at a time, from the torch weights and activations.

    Returns (kernel -> depth, (parent, child) -> relevance); head mode 'weights'.
    """
    conv = dict(zip(truth.names, truth.convs))
    w = truth.fc_weight
    wn = (w - w.min()) / (w.max() - w.min())
    depth_of: dict[tuple[str, int], int] = {}
    for f in range(w.shape[1]):
        if wn[label, f] >= theta:
            for k in truth.head_prov[f]:
                depth_of.setdefault(k, 0)
    links: dict[tuple[tuple[str, int], tuple[str, int]], float] = {}
    frontier = sorted(depth_of)
    for d in range(depth - 1):
        nxt = []
        for layer, j in frontier:
            weight = conv[layer].weight.detach().double().numpy()
            g = group[layer]
            c_out, per = weight.shape[0], weight.shape[1]
            x = truth.inputs[layer]
            scores = []
            for m in range(per):
                c = (j // (c_out // g)) * per + m
                k = weight[j, m].mean()
                a = x[c].mean()
                scores.append((c, k * a))
            r = np.array([s for _, s in scores])
            rn = np.ones_like(r) if r.max() == r.min() else (r - r.min()) / (r.max() - r.min())
            for (c, _), v in zip(scores, rn):
                if v < theta:
                    continue
                for child in truth.prov[layer][c]:
                    key = ((layer, j), child)
                    links[key] = max(links.get(key, -1.0), float(v))
                    if child not in depth_of:
                        depth_of[child] = d + 1
                        nxt.append(child)
        frontier = sorted(set(nxt))
    return depth_of, links
