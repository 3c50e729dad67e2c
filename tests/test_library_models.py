"""Real library video models with seeded random weights -- pytorchvideo, torchvision's
video models and timm-3d -- exported by both torch exporters: every conv input's
provenance and the classifier's equal autograd's on the source model
(tests/dependency_check), and the pyramid is explained end to end.

torchvision and timm-3d come from tests/library_sources (installed without dependencies
by the README's test command: torchvision's own wheels cannot import beside the pinned
CPU torch). Without them those cases skip, and pytorchvideo, which imports
``torchvision.ops.RoIAlign`` for a detection head never built here, gets a stub of it.
"""

from __future__ import annotations

import importlib.machinery
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from tests.library_sources import INSTALL, use_library_sources  # noqa: E402

SOURCES = use_library_sources()
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
from tests.bad_inputs.conftest import CFP, assert_one_line_error  # noqa: E402
from tests.dependency_check import analyzer_sets, autograd_truth  # noqa: E402

T, S = 8, 64
SHAPE = (1, 3, T, S, S)
SHAPES = {"timm_convnext": (1, 3, 32, S, S)}  # ConvNeXt downsamples time 32x


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
    if name.startswith("tv_"):
        from torchvision.models import video

        model = getattr(video, name[3:])(num_classes=5)
        if name == "tv_s3d":  # its AvgPool3d(2, 7, 7) expects 224 px: pool what there is
            model.avgpool = nn.AdaptiveAvgPool3d(1)
        return model
    if name.startswith("timm_"):
        import timm_3d

        arch, kwargs = TIMM[name]
        return timm_3d.create_model(arch, pretrained=False, num_classes=5, **kwargs)
    raise KeyError(name)


TIMM: dict[str, tuple[str, dict[str, object]]] = {
    "timm_resnet": ("resnet18", {"layers": [1, 1, 1, 1]}),
    "timm_seresnet": ("seresnet18", {"layers": [1, 1, 1, 1]}),
    "timm_efficientnet": ("efficientnet_b0", {}),
    "timm_convnext": ("convnext_tiny", {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)}),
}
"""timm-3d models, one block per stage where the architecture takes it (CPU-sized)."""


MODELS = ["x3d", "efficient_x3d", "csn", "r2plus1d", "i3d", "slowfast"]
SOURCED = ["tv_r3d_18", "tv_mc3_18", "tv_r2plus1d_18", "tv_s3d", *TIMM]
"""Need tests/library_sources (torchvision's video models, timm-3d)."""


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


class _Detach(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).detach()


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
    gated = []  # timm-3d's SE modules: ``x * self.gate(x_se)``
    if SOURCES:
        from timm_3d.layers.squeeze_excite import SEModule
        from timm_3d.models._efficientnet_blocks import SqueezeExcite

        for cls in (SEModule, SqueezeExcite):
            gated.append((cls, cls.forward))

            def detached(self: nn.Module, x: torch.Tensor, _f=cls.forward) -> torch.Tensor:
                gate = self.gate
                self.gate = _Detach(gate)
                try:
                    return _f(self, x)
                finally:
                    self.gate = gate

            cls.forward = detached
    try:
        yield
    finally:
        se.SqueezeExcitation.forward = saved
        for cls, f in gated:
            cls.forward = f


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool], tuple]:
    from cfp_onnx.exporters.pytorch import export_torch

    root = tmp_path_factory.mktemp("library")
    cache: dict[tuple[str, bool], tuple[nn.Module, Path]] = {}

    def get(name: str, dynamo: bool) -> tuple[nn.Module, Path]:
        if (name, dynamo) not in cache:
            model = _seeded(name)
            path = root / f"{name}{'_dynamo' if dynamo else ''}.onnx"
            export_torch(model, SHAPES.get(name, SHAPE), path, dynamo=dynamo)
            cache[name, dynamo] = model, path
        return cache[name, dynamo]

    return get


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", MODELS + SOURCED)
def test_library_model_provenance_equals_autograd(exported, name, dynamo):
    if name in SOURCED and not SOURCES:
        pytest.skip(f"torchvision's and timm-3d's model code is not installed: {INSTALL}")
    model, path = exported(name, dynamo)
    shape = SHAPES.get(name, SHAPE)
    clip = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    ex = Explainer(path, clip_shape=shape)
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


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize(
    ("name", "shape"), [("swin3d_t", (1, 3, 8, 64, 64)), ("mvit_v1_b", (1, 3, 16, 224, 224))]
)
def test_video_transformers_are_one_line_errors_naming_attention(tmp_path, name, shape, dynamo):
    """torchvision's MViT and Swin3D: attention mixes positions by weights computed from the
    clip, which channel provenance cannot follow. Said in one line, naming the MatMul."""
    if not SOURCES:
        pytest.skip(f"torchvision's model code is not installed: {INSTALL}")
    from cfp_onnx.exporters.pytorch import export_torch
    from torchvision.models import video

    torch.manual_seed(0)
    path = tmp_path / f"{name}.onnx"
    export_torch(getattr(video, name)(num_classes=5).eval(), shape, path, dynamo=dynamo)
    np.save(tmp_path / "clip.npy", np.zeros(shape, np.float32))
    r = subprocess.run(
        [CFP, "explain", path.name, "--clip", "clip.npy", "--out", "o"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert_one_line_error(r, "the model holds attention (MatMul", "transformers")
    assert "supported ops" not in r.stderr and not (tmp_path / "o").exists()
