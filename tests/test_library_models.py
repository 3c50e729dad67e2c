"""Real library video models with seeded random weights (pytorchvideo), exported by both
torch exporters: every conv input's provenance and the classifier's equal autograd's on
the source model (tests/dependency_check), and the pyramid is explained end to end.

pytorchvideo 0.1.5 imports ``torchvision.ops.RoIAlign`` at module level (for its detection
head, never built here); with the pinned CPU torch no torchvision imports, so a stub
stands in for that one name when torchvision is absent.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

try:
    import torchvision  # noqa: F401
except Exception:  # absent, or the CUDA wheel that fails at import
    _tv, _ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    _tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    _ops.__spec__ = importlib.machinery.ModuleSpec("torchvision.ops", None)
    _ops.RoIAlign = nn.Module  # type: ignore[attr-defined]
    _tv.ops = _ops  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = _tv, _ops

pv = pytest.importorskip("pytorchvideo.models")

from cfp_onnx.api import Explainer  # noqa: E402
from tests.dependency_check import analyzer_sets, autograd_truth  # noqa: E402

T, S = 8, 64
SHAPE = (1, 3, T, S, S)


def _pool(**_: object) -> nn.Module:
    return nn.AdaptiveAvgPool3d(1)


class OneClip(nn.Module):
    """SlowFast takes [slow, fast]; deployed, it takes one clip and samples the slow path
    from it (every `alpha`-th frame): the wrapper a user exports."""

    def __init__(self, model: nn.Module, alpha: int = 4) -> None:
        super().__init__()
        self.model, self.alpha = model, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model([x[:, :, :: self.alpha], x])


def _build(name: str) -> nn.Module:
    from pytorchvideo.models import csn, r2plus1d, resnet, slowfast, x3d
    from pytorchvideo.models.accelerator.mobile_cpu.efficient_x3d import create_x3d

    if name == "x3d":
        return x3d.create_x3d(input_clip_length=T, input_crop_size=S, model_num_class=5,
                              depth_factor=0.5, width_factor=0.5)  # fmt: skip
    if name == "efficient_x3d":
        return create_x3d(num_classes=5, expansion="XS")
    if name == "csn":
        return csn.create_csn(model_depth=50, model_num_class=5, stem_dim_out=8, head_pool=_pool)
    if name == "r2plus1d":
        return r2plus1d.create_r2plus1d(model_depth=50, model_num_class=5, stem_dim_out=8,
                                        head_pool=_pool)  # fmt: skip
    if name == "i3d":
        return resnet.create_resnet(model_depth=50, model_num_class=5, stem_dim_out=8,
                                    stem_conv_kernel_size=(5, 7, 7), head_pool=_pool)  # fmt: skip
    if name == "slowfast":
        return OneClip(slowfast.create_slowfast(
            model_depth=50, model_num_class=5, stem_dim_outs=(16, 2),
            head_pool_kernel_sizes=((T // 4, S // 32, S // 32), (T, S // 32, S // 32))))  # fmt: skip
    raise KeyError(name)


MODELS = ["x3d", "efficient_x3d", "csn", "r2plus1d", "i3d", "slowfast"]


def _seeded(name: str) -> nn.Module:
    """Seeded random weights and BatchNorm statistics (a fresh BatchNorm is the identity
    and would hide folding mistakes); positive scales keep each conv's weight direction,
    by which tests/dependency_check pairs torch convs with ONNX layers."""
    torch.manual_seed(0)
    model = _build(name)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


@contextmanager
def _se_gates_detached() -> Iterator[None]:
    """SPEC §2: a squeeze-excitation gate scales channels, it carries no kernels. Autograd
    sees through it, so its branch is detached while the truth is taken."""
    import fvcore.nn.squeeze_excitation as se

    saved = se.SqueezeExcitation.forward

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        dims = [2, 3, 4] if self.is_3d else [2, 3]
        return torch.mul(x, self.block(x.mean(dim=dims, keepdim=True)).detach())

    se.SqueezeExcitation.forward = forward
    try:
        yield
    finally:
        se.SqueezeExcitation.forward = saved


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool], tuple]:
    from cfp_onnx.exporters.pytorch import export_torch

    root = tmp_path_factory.mktemp("library")
    cache: dict[tuple[str, bool], tuple[nn.Module, Path]] = {}

    def get(name: str, dynamo: bool) -> tuple[nn.Module, Path]:
        if (name, dynamo) not in cache:
            model = _seeded(name)
            path = root / f"{name}{'_dynamo' if dynamo else ''}.onnx"
            export_torch(model, SHAPE, path, dynamo=dynamo)
            cache[name, dynamo] = model, path
        return cache[name, dynamo]

    return get


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", MODELS)
def test_library_model_provenance_equals_autograd(exported, name, dynamo):
    model, path = exported(name, dynamo)
    clip = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    ex = Explainer(path, clip_shape=SHAPE)
    with _se_gates_detached():
        truth = autograd_truth(model, ex, clip)
    for i, layer in enumerate(ex.layers):
        csr = ex.input_csr(i)
        assert analyzer_sets(ex, csr.indptr, csr.kernels) == truth.prov[layer.node], layer.node
    head = analyzer_sets(ex, ex.head_csr.indptr, ex.head_csr.kernels)
    if len(truth.head_prov) == len(head):  # X3D's Linear runs channels-last per position:
        assert head == truth.head_prov  # the oracle's (N, C) reading does not apply there
    p = ex.explain(clip, depth=3, theta=0.6)
    assert p.label == int(np.argmax(truth.logits)) and len(p.node_layer) > 0
