"""3D Grad-CAM (Selvaraju et al. 2017, on spatio-temporal maps) through onnxruntime.

The target map ``A`` is the last spatio-temporal feature map before the head's pooling
(found by walking back from the classifier's input through pooling and layout ops). The
Grad-CAM weight of channel ``c`` is the mean over positions of ``d logit / d A_c``; it
equals the derivative of the logit along a *uniform* shift of channel ``c``, which we
take by central differences through the head sub-graph ``A -> logits`` (one tiny run per
channel and sign, every class at once). No autograd, so it works for any exported model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort

from cfp_onnx.tubes import upsample

WALK_THROUGH = {
    "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "AveragePool", "Flatten", "Reshape",
    "Squeeze", "Unsqueeze", "Dropout", "Identity", "Transpose",
}  # fmt: skip


def target_tensor(ex: Any) -> str:
    """The last map with time and space before the classifier (Grad-CAM's ``A``)."""
    g = ex.graph
    name = ex.head.input
    while name in g.producer:
        node = g.nodes[g.producer[name]]
        if node.op_type not in WALK_THROUGH:
            break
        name = node.inputs[0]
        if len(g.shape(name)) == 5 and node.op_type not in ("Transpose", "Reshape"):
            pooled = node.op_type in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean")
            if pooled or node.op_type == "AveragePool":
                break
    return name


def channel_axis(shape: tuple[int, ...], features: int) -> int:
    """NCDHW's axis 1 unless only the last axis has the head's feature count (NDHWC)."""
    if shape[1] == features:
        return 1
    if shape[-1] == features:
        return len(shape) - 1
    raise ValueError(f"no axis of {shape} holds the head's {features} features")


class GradCam:
    """Grad-CAM maps of any class from one instrumented run of an ``Explainer``."""

    def __init__(self, ex: Any, path: Path) -> None:
        self.ex = ex
        self.tensor = target_tensor(ex)
        shape = ex.graph.shape(self.tensor)
        self.axis = channel_axis(shape, int(ex.head.weight.shape[1]))
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        sub = onnx.utils.Extractor(model).extract_model([self.tensor], [ex.head.logits])
        self.head = ort.InferenceSession(
            sub.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        self.head_input = self.head.get_inputs()[0].name

    def weights(self, a: np.ndarray) -> np.ndarray:
        """``[classes, C]``: mean gradient of every logit w.r.t. each channel of ``a``."""
        a = a[None].astype(np.float32)  # batch axis back
        channels = a.shape[self.axis]
        eps = np.float32(1e-2 * max(float(np.sqrt((a * a).mean())), 1e-6))
        grads = np.zeros((self.ex.classes, channels))
        for c in range(channels):
            idx = [slice(None)] * a.ndim
            idx[self.axis] = c
            up, down = a.copy(), a.copy()
            up[tuple(idx)] += eps
            down[tuple(idx)] -= eps
            diff = self._logits(up) - self._logits(down)
            grads[:, c] = diff / (2 * float(eps))
        positions = a.size // channels
        return grads / positions

    def _logits(self, a: np.ndarray) -> np.ndarray:
        out = self.head.run(None, {self.head_input: a})[0]
        return np.asarray(out, dtype=np.float64).reshape(-1)

    def maps(self, run: Any, labels: list[int], size: tuple[int, int, int]) -> np.ndarray:
        """``[len(labels), T, H, W]`` Grad-CAM volumes (ReLU of the weighted map),
        upsampled trilinearly to the clip. `run` must hold ``full[self.tensor]``."""
        a = np.asarray(run.full[self.tensor], dtype=np.float64)
        w = self.weights(a)[labels]  # [k, C]
        a = np.moveaxis(a, self.axis - 1, 0)  # [C, T', H', W']
        cam = np.maximum(np.tensordot(w, a, axes=(1, 0)), 0).astype(np.float32)
        return upsample(np, cam, size)
