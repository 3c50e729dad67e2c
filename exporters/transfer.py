"""Copy weights from a PyTorch model into its Keras twin, and say which layers match.

Twins name every Keras layer after the torch module it mirrors (dots become
underscores, see :mod:`cfp_onnx.exporters.zoo.keras_models`), so the copy goes
by name. The returned mapping pairs the ONNX node names the two exporters give
each conv (torch: ``/layer1/layer1.0/conv1/Conv``; Keras: ``layer1_0_conv1``),
which is what comparing the twins' pyramids needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import torch
from cfp_onnx.exporters.pytorch import torchscript_node_name
from cfp_onnx.exporters.zoo.keras_models import keras_name
from torch import nn

from cfp_onnx.errors import ModelError

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True, slots=True)
class Transfer:
    """What was copied: ``conv_nodes`` maps torch ONNX Conv node -> Keras ONNX Conv
    node; ``layers`` maps every copied torch module -> Keras layer name."""

    conv_nodes: dict[str, str]
    layers: dict[str, str]

    def keras_to_torch(self) -> dict[str, str]:
        return {k: t for t, k in self.conv_nodes.items()}


def torch_to_keras(model: nn.Module, twin: keras.Model) -> Transfer:
    """Copy every Conv3d, BatchNorm and Linear of ``model`` into ``twin``.

    Raises:
        ModelError: a module has no same-named Keras layer, or their shapes differ.
    """
    by_name = {layer.name: layer for layer in twin._flatten_layers(include_self=False)}
    copied: dict[str, str] = {}
    convs: dict[str, str] = {}
    for qualname, module in model.named_modules():
        if not isinstance(module, (nn.Conv3d, nn.Linear, *BATCH_NORMS)):
            continue
        name = keras_name(qualname)
        if name not in by_name:
            raise ModelError(f"torch module {qualname!r} has no Keras twin layer {name!r}")
        _copy(module, by_name[name], qualname)
        copied[qualname] = name
        if isinstance(module, nn.Conv3d):
            convs[torchscript_node_name(qualname, "Conv")] = name
    unmatched = sorted(
        n for n, layer in by_name.items() if layer.weights and n not in copied.values()
    )
    if unmatched:
        raise ModelError(f"Keras layers with weights but no torch twin: {unmatched[:5]}")
    return Transfer(conv_nodes=convs, layers=copied)


def _copy(module: nn.Module, layer: keras.layers.Layer, qualname: str) -> None:
    weights = [w.detach().cpu().numpy() for w in _torch_weights(module)]
    if isinstance(module, nn.Conv3d):
        weights[0] = weights[0].transpose(2, 3, 4, 1, 0)  # OI DHW -> DHW I O
    elif isinstance(module, nn.Linear):
        weights[0] = weights[0].T
    expected = [tuple(w.shape) for w in layer.get_weights()]
    got = [tuple(w.shape) for w in weights]
    if expected != got:
        raise ModelError(f"{qualname}: torch weights {got} do not fit Keras layer {expected}")
    layer.set_weights([np.ascontiguousarray(w) for w in weights])


def _torch_weights(module: nn.Module) -> list[torch.Tensor]:
    """In Keras order: kernel[, bias]; BN: gamma, beta, moving mean, moving variance."""
    names: tuple[str, ...] = ("weight", "bias", "running_mean", "running_var")
    if not isinstance(module, BATCH_NORMS):
        names = ("weight", "bias")
    found = (getattr(module, n, None) for n in names)
    return [t for t in found if isinstance(t, torch.Tensor)]
