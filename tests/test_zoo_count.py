"""Parameter and multiply-add counts: ONNX graph, torch module and Keras model agree,
and a single conv is counted by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cfp_onnx.exporters.pytorch import export_torch
from cfp_onnx.exporters.zoo.count import count_onnx, count_torch
from torch import nn

from tests.zoo_helpers import TORCH_SHAPE, torch_model


class OneConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(4, 8, (3, 3, 3), stride=(1, 2, 2), padding=1, groups=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3, 4)))


def test_hand_count(tmp_path: Path) -> None:
    # conv: 8 out x (4 x 8 x 8) positions x (4/2 x 27) taps; fc: 8 x 5
    macs = 8 * 4 * 8 * 8 * 2 * 27 + 8 * 5
    params = 8 * 2 * 27 + 8 + 8 * 5 + 5
    model = OneConv()
    assert count_torch(model, (1, 4, 4, 16, 16)).macs == macs
    export_torch(model, (1, 4, 4, 16, 16), tmp_path / "m.onnx")
    c = count_onnx(tmp_path / "m.onnx")
    assert (c.macs, c.params) == (macs, params)


@pytest.mark.parametrize("name", ["resnext101_3d", "x3d_m", "slowfast_r50", "i3d"])
def test_onnx_and_module_counts_agree(name: str, tmp_path: Path) -> None:
    model = torch_model(name)
    export_torch(model, TORCH_SHAPE, tmp_path / "m.onnx")
    from_graph, from_module = count_onnx(tmp_path / "m.onnx"), count_torch(model, TORCH_SHAPE)
    assert from_graph.macs == from_module.macs
    # BatchNorm folded into convs: the graph has biases where the module had BN params
    bn = sum(2 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm3d))
    assert from_module.params - bn <= from_graph.params <= from_module.params


def test_full_size_resnet50_matches_the_paper_code() -> None:
    from cfp_onnx.exporters.zoo.torch_models import resnet50_3d

    c = count_torch(resnet50_3d(), (1, 3, 16, 224, 224))
    assert abs(2 * c.gmacs - 80.32) / 80.32 < 0.05  # the paper's code reports 2 x MACs
