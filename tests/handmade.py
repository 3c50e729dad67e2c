"""Hand-set ONNX video models and clips for the tube, report and CLI tests.

Built with onnx.helper (no framework, milliseconds): the weights are chosen so we
know where each kernel must look, e.g. a "red" kernel must peak on a red square.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cfp_onnx.metadata import write_metadata

FRAMES, SIZE = 8, 32


def color_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """conv1: red, green, temporal change, red persisting over 3 frames; conv2 mixes them."""
    rng = np.random.default_rng(seed)
    w1 = np.zeros((4, 3, 3, 3, 3), dtype=np.float32)
    w1[0, :, 1, 1, 1] = [1.0, -0.5, -0.5]  # red detector
    w1[1, :, 1, 1, 1] = [-0.5, 1.0, -0.5]  # green detector
    w1[2, :, 2, 1, 1] = 1.0 / 3  # brightness now ...
    w1[2, :, 0, 1, 1] = -1.0 / 3  # ... minus brightness two frames back: motion
    w1[3, :, :, 1, 1] = np.array([1.0, -0.5, -0.5])[:, None]  # red here in 3 frames running
    b1 = np.array([0.0, 0.0, 0.0, -2.0], dtype=np.float32)  # ... only then it fires: motion
    w1[:, :, :, :, :] += rng.normal(0, 1e-3, w1.shape).astype(np.float32)
    w2 = np.zeros((3, 4, 1, 1, 1), dtype=np.float32)
    w2[0, :, 0, 0, 0] = [1.0, 0.0, 0.2, 0.0]
    w2[1, :, 0, 0, 0] = [0.0, 1.0, 0.0, 0.1]
    w2[2, :, 0, 0, 0] = [0.1, 0.0, 0.3, 1.0]
    fc = np.array([[2.0, -1.0, 0.0], [-1.0, 2.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    return {"w1": w1, "b1": b1, "w2": w2, "fc": fc}


def color_model(
    path: Path,
    *,
    frames: int = FRAMES,
    size: int = SIZE,
    conv_names: tuple[str, str] = ("conv1", "conv2"),
    class_names: tuple[str, ...] = ("red", "green", "moving"),
    seed: int = 0,
    layout: str = "NCDHW",
) -> Path:
    """Conv(3->4) -> Relu -> Conv(4->3, 1x1x1) -> Relu -> GAP -> Gemm(3 classes)."""
    w = color_weights(seed)
    shape = [1, 3, frames, size, size] if layout == "NCDHW" else [1, frames, size, size, 3]
    nodes = []
    x = "video"
    if layout == "NDHWC":
        nodes.append(helper.make_node("Transpose", ["video"], ["x_t"], perm=[0, 4, 1, 2, 3]))
        x = "x_t"
    nodes += [
        helper.make_node("Conv", [x, "w1", "b1"], ["c1"], name=conv_names[0], pads=[1] * 6),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name=conv_names[1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "color",
        [helper.make_tensor_value_info("video", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, len(class_names)])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    if len(class_names) != 3:
        raise ValueError("color_model has three classes")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    write_metadata(model, layout=layout, frames=frames, size=(size, size), class_names=class_names)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def moving_square(
    frames: int = FRAMES, size: int = SIZE, *, side: int = 8, step: float = 1.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A red square moving right by `step` pixels a frame over a dark noisy background.

    Returns:
        ``(uint8 RGB frames [T, H, W, 3], bool mask [T, H, W])``.
    """
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 30, (frames, size, size, 3)).astype(np.uint8)
    mask = np.zeros((frames, size, size), dtype=bool)
    y = size // 2 - side // 2
    for t in range(frames):
        x = 2 + round(t * step)
        video[t, y : y + side, x : x + side] = (230, 20, 20)
        mask[t, y : y + side, x : x + side] = True
    return video, mask


def to_tensor(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` -> float32 ``(1, 3, T, H, W)`` in [0, 1]."""
    return np.ascontiguousarray(frames.transpose(3, 0, 1, 2)[None], dtype=np.float32) / 255.0
