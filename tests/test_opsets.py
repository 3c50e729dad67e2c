"""The same network at opsets 11 to 21 gives the same pyramid: exported by the TorchScript
exporter at 11 and carried up to each opset by onnx's version converter (opset-dependent
forms such as Squeeze's axes becoming an input at 13 and ReduceMean's at 18), against
the exporter's own opset-17 file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from cfp_onnx.api import Explainer
from tests.test_optimised import assert_same_pyramid

torch = pytest.importorskip("torch")
OPSETS = list(range(11, 22))


@pytest.fixture(scope="module")
def zoo_resnet(tmp_path_factory):  # type: ignore[no-untyped-def]
    from cfp_onnx.exporters.pytorch import export_torch

    from tests.zoo_helpers import TORCH_SHAPE, torch_model

    root = tmp_path_factory.mktemp("opsets")
    model = torch_model("resnet50_3d")
    export_torch(model, TORCH_SHAPE, root / "r50_17.onnx", opset=17, dynamo=False)
    torch.onnx.export(  # our exporter writes >= 17: opset 11 straight from torch
        model, (torch.zeros(TORCH_SHAPE),), str(root / "r50_11.onnx"), opset_version=11,
        input_names=["video"], output_names=["logits"], dynamo=False,
    )  # fmt: skip
    clip = np.random.default_rng(7).standard_normal(TORCH_SHAPE).astype(np.float32)
    ref = Explainer(root / "r50_17.onnx", clip_shape=TORCH_SHAPE).explain(clip, theta=0.6)
    return root / "r50_11.onnx", clip, ref


@pytest.mark.parametrize("opset", OPSETS)
def test_every_opset_gives_the_same_pyramid(zoo_resnet, tmp_path, opset):
    path, clip, ref = zoo_resnet
    converted = onnx.load(str(path))
    if opset > 11:
        converted = onnx.version_converter.convert_version(converted, opset)
    assert converted.opset_import[0].version == opset
    out = tmp_path / f"r50_{opset}.onnx"
    onnx.save(converted, str(out))
    got = Explainer(out, clip_shape=clip.shape).explain(clip, theta=0.6, label=ref.label)
    assert_same_pyramid(ref, got)
