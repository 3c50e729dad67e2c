"""PyTorch -> ONNX: every zoo model exports and matches torch; bad models fail clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cfp_onnx.exporters.pytorch import conv_node_names, export_torch, torchscript_node_name
from torch import nn

from cfp_onnx.errors import ModelError, OutputError
from cfp_onnx.metadata import read_metadata
from tests.zoo_helpers import CLASSES, TORCH_REDUCED, TORCH_SHAPE, clip, onnx_logits, torch_model


def _torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("name", sorted(TORCH_REDUCED))
def test_zoo_model_exports_and_matches_torch(name: str, tmp_path: Path) -> None:
    model = torch_model(name)
    path = tmp_path / f"{name}.onnx"
    result = export_torch(model, TORCH_SHAPE, path)
    assert result.passed and result.max_abs_diff <= result.tolerance
    assert result.output_shape == (1, CLASSES)
    # An independent run on another clip, with batch 2: the batch axis is dynamic.
    x = clip((2, *TORCH_SHAPE[1:]), seed=7)
    np.testing.assert_allclose(onnx_logits(path, x), _torch(model, x), rtol=0, atol=1e-4)
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert min(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17


@pytest.mark.parametrize("name", sorted(TORCH_REDUCED))
def test_conv_node_names_follow_the_module_tree(name: str, tmp_path: Path) -> None:
    model = torch_model(name)
    export_torch(model, TORCH_SHAPE, tmp_path / "m.onnx")
    convs = {n.name for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "Conv"}
    expected = {v for k, v in conv_node_names(model).items() if v.endswith("/Conv")}
    assert convs == expected


def test_grouped_convs_keep_their_group(tmp_path: Path) -> None:
    model = torch_model("resnext101_3d")
    export_torch(model, TORCH_SHAPE, tmp_path / "m.onnx")
    groups = {
        n.name: a.i
        for n in onnx.load(str(tmp_path / "m.onnx")).graph.node
        for a in n.attribute
        if n.op_type == "Conv" and a.name == "group"
    }
    assert groups["/layer1/layer1.0/conv2/Conv"] == 4
    assert groups["/layer1/layer1.0/conv1/Conv"] == 1


def test_dynamo_export_matches_and_gets_torchscript_names(tmp_path: Path) -> None:
    model = torch_model("resnet50_3d")
    script = export_torch(model, TORCH_SHAPE, tmp_path / "script.onnx", dynamo=False)
    dyn = export_torch(model, TORCH_SHAPE, tmp_path / "dynamo.onnx", dynamo=True)
    assert script.passed and dyn.passed
    assert dyn.opset >= 17

    def convs(p: Path) -> set[str]:
        return {n.name for n in onnx.load(str(p)).graph.node if n.op_type == "Conv"}

    assert convs(tmp_path / "dynamo.onnx") == convs(tmp_path / "script.onnx")
    x = clip(TORCH_SHAPE, seed=3)
    np.testing.assert_allclose(
        onnx_logits(tmp_path / "dynamo.onnx", x), _torch(model, x), atol=1e-4
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TORCH_REDUCED))
def test_zoo_model_exports_with_dynamo(name: str, tmp_path: Path) -> None:
    model = torch_model(name)
    result = export_torch(model, TORCH_SHAPE, tmp_path / "m.onnx", dynamo=True)
    assert result.passed
    x = clip(TORCH_SHAPE, seed=5)
    np.testing.assert_allclose(onnx_logits(tmp_path / "m.onnx", x), _torch(model, x), atol=1e-4)


def test_metadata_written(tmp_path: Path) -> None:
    meta = {"mean": [0.45, 0.45, 0.45], "std": [0.225] * 3, "class_names": list("abcde")}
    export_torch(torch_model("x3d_m"), TORCH_SHAPE, tmp_path / "m.onnx", metadata=meta)
    got = read_metadata(onnx.load(str(tmp_path / "m.onnx")))
    assert got["layout"] == "NCDHW" and got["frames"] == 8 and got["size"] == [32, 32]
    assert got["mean"] == [0.45] * 3 and got["class_names"] == list("abcde")
    assert got["exporter"] == "torch-script"


def test_torchscript_node_name_rule() -> None:
    assert torchscript_node_name("conv1", "Conv") == "/conv1/Conv"
    assert torchscript_node_name("layer1.0.conv1", "Conv") == "/layer1/layer1.0/conv1/Conv"
    assert torchscript_node_name("a.0.1.b", "Gemm") == "/a/a.0/a.0.1/b/Gemm"


# ---------------------------------------------------------------- errors


class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x).mean(dim=(2, 3, 4))
        return y, y


class DictModel(TupleModel):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"logits": self.conv(x).mean(dim=(2, 3, 4))}


class ImageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


class DriftingModel(nn.Module):
    """Adds how often it has been called: the trace bakes in one count, torch moves on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x).mean(dim=(2, 3, 4)) + float(self.calls)


class BakedBatchModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).reshape(1, -1))


SMALL = (1, 3, 4, 8, 8)


@pytest.mark.parametrize("model, kind", [(TupleModel(), "tuple"), (DictModel(), "dict")])
def test_non_tensor_output_is_refused(model: nn.Module, kind: str, tmp_path: Path) -> None:
    with pytest.raises(
        ModelError, match=f"model returns a {kind}; cfp_onnx needs one logits tensor"
    ):
        export_torch(model, SMALL, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_non_video_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ModelError, match=r"shape \[1, 3, 32, 32\] \(4-D\); a video model takes a 5-D"
    ):
        export_torch(ImageModel(), (1, 3, 32, 32), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_model_that_fails_on_a_video_clip(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model fails on a clip of shape \[1, 3, 4, 8, 8\]"):
        export_torch(ImageModel(), SMALL, tmp_path / "m.onnx")


def test_failed_verification_is_loud_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"max \|onnx - torch\| = 1 > tolerance 0.0001"):
        export_torch(DriftingModel(), SMALL, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_baked_batch_axis_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="batch axis is baked in"):
        export_torch(BakedBatchModel(), SMALL, tmp_path / "m.onnx")


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        export_torch(torch_model("x3d_m"), TORCH_SHAPE, path)
    assert path.read_bytes() == b"keep me"
    assert export_torch(torch_model("x3d_m"), TORCH_SHAPE, path, overwrite=True).passed
    assert len(list(tmp_path.iterdir())) == 1


def test_old_opset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="opset 13 is too old"):
        export_torch(torch_model("x3d_m"), TORCH_SHAPE, tmp_path / "m.onnx", opset=13)
