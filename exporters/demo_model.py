"""Build the demo model shipped in ``cfp_onnx/assets/demo.onnx`` (``cfp demo`` runs it).

A tiny 3D CNN over 16x112x112 RGB clips whose key kernels are set by hand, the
rest seeded random, so its saliency tubes must follow the bright yellow bar of
:func:`cfp_onnx.synthetic.demo_clip` (and it predicts ``move_right`` for it):

* conv1 finds yellow (R + G - 2B), the bar's leading and trailing edges in time
  (brightness at t+1 minus t-1, and the reverse) and bright pixels;
* conv2 combines yellow with each edge (a moving yellow object) and smooths yellow;
* conv3 pools those; the head weighs conv3's "moving yellow" kernels for move_right.

No training: it builds in a second, and what each kernel should do is known, which
makes the demo's pyramid easy to read. Regenerate with
``python -m cfp_onnx.exporters.demo_model`` (or ``python exporters/demo_model.py``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cfp_onnx.synthetic import CLASSES

FRAMES, SIZE = 16, 112
ASSET = Path(__file__).resolve().parent.parent / "cfp_onnx" / "assets" / "demo.onnx"
YELLOW, LEAD, TRAIL, BRIGHT = 0, 1, 2, 3  # conv1 kernels set by hand
MOVING_LEAD, MOVING_TRAIL, STILL_YELLOW = 0, 1, 2  # conv2 kernels set by hand


class DemoNet(nn.Module):
    """conv1 -> relu -> pool -> conv2 -> relu -> pool -> conv3 -> relu -> mean -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 8, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2))
        self.conv2 = nn.Conv3d(8, 12, 3, padding=1)
        self.conv3 = nn.Conv3d(12, 16, 3, padding=1)
        self.pool1 = nn.MaxPool3d((1, 2, 2))
        self.pool2 = nn.MaxPool3d(2)
        self.fc = nn.Linear(16, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3, 4)))


def build(seed: int = 0) -> DemoNet:
    """The demo network: seeded small random weights, then the hand-set kernels."""
    torch.manual_seed(seed)
    net = DemoNet().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.15)
        _conv1(net.conv1)
        _conv2(net.conv2)
        _conv3(net.conv3)
        _head(net.fc)
    return net


def _centre(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(k // 2 for k in shape)


def _conv1(conv: nn.Conv3d) -> None:
    w, b = conv.weight, conv.bias
    assert b is not None
    t, y, x = _centre(w.shape[2:])
    for k in (YELLOW, LEAD, TRAIL, BRIGHT):
        w[k].zero_()
    w[YELLOW, :, t, y - 1 : y + 2, x - 1 : x + 2] = (
        torch.tensor([1.0, 1.0, -2.0])[:, None, None] / 9
    )
    b[YELLOW] = -0.3
    w[LEAD, :, t + 1, y, x], w[LEAD, :, t - 1, y, x] = 1 / 3, -1 / 3
    w[TRAIL, :, t - 1, y, x], w[TRAIL, :, t + 1, y, x] = 1 / 3, -1 / 3
    b[LEAD] = b[TRAIL] = -0.1
    w[BRIGHT, :, t, y, x] = 1 / 3
    b[BRIGHT] = -0.4


def _conv2(conv: nn.Conv3d) -> None:
    w, b = conv.weight, conv.bias
    assert b is not None
    t, y, x = _centre(w.shape[2:])
    for k in (MOVING_LEAD, MOVING_TRAIL, STILL_YELLOW):
        w[k].zero_()
        b[k] = 0.0
    w[MOVING_LEAD, YELLOW, t, y, x] = w[MOVING_LEAD, LEAD, t, y, x] = 1.0
    w[MOVING_TRAIL, YELLOW, t, y, x] = w[MOVING_TRAIL, TRAIL, t, y, x] = 1.0
    w[STILL_YELLOW, YELLOW, t, y - 1 : y + 2, x - 1 : x + 2] = 1 / 9


def _conv3(conv: nn.Conv3d) -> None:
    w, b = conv.weight, conv.bias
    assert b is not None
    t, y, x = _centre(w.shape[2:])
    for k in (0, 1):
        w[k].zero_()
        b[k] = 0.0
    w[0, MOVING_LEAD, t, y, x] = w[0, MOVING_TRAIL, t, y, x] = 1.0
    w[1, STILL_YELLOW, t, y, x] = 1.0
    w[1, MOVING_LEAD, t, y, x] = 0.3


def _head(fc: nn.Linear) -> None:
    right = CLASSES.index("move_right")
    fc.weight[right, :2] = torch.tensor([3.0, 2.0])
    fc.bias.zero_()
    fc.bias[right] = 0.1


def export(path: Path = ASSET, *, seed: int = 0, overwrite: bool = True) -> Path:
    """Export the demo model (verified against torch) with its preprocessing metadata."""
    from cfp_onnx.exporters.pytorch import export_torch

    export_torch(
        build(seed),
        (1, 3, FRAMES, SIZE, SIZE),
        path,
        metadata={"mean": [0.0], "std": [1.0], "class_names": list(CLASSES), "source": "demo"},
        seed=seed,
        overwrite=overwrite,
    )
    Path(path).chmod(0o644)  # a shipped asset: readable by everyone
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSET, help=f"default {ASSET}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {export(args.out, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
