"""`cfp export` through the real console script: outputs, metadata, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from cfp_onnx.metadata import read_metadata

CFP = str(Path(sys.executable).with_name("cfp"))

FACTORIES = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))


class Pair(Tiny):
    def forward(self, x):
        y = super().forward(x)
        return y, y


def make(classes=3):
    return Tiny(classes)


def pair():
    return Pair()
"""


def cfp(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [CFP, *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.fixture
def factories(tmp_path: Path) -> Path:
    path = tmp_path / "nets.py"
    path.write_text(FACTORIES)
    return path


def test_export_torch_factory_with_metadata(factories: Path, tmp_path: Path) -> None:
    names = tmp_path / "classes.txt"
    names.write_text("run\njump\nwave\n")
    out = tmp_path / "tiny.onnx"
    args = ["export", "torch", f"{factories}:make", "--input-shape", "1,3,4,16,16", "-o", out]
    done = cfp(
        *args, "--mean", "0.45,0.45,0.45", "--std", "0.225,0.225,0.225", "--class-names", names
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith(
        f"OK: {out} (torch, opset 17) video[1, 3, 4, 16, 16] NCDHW -> logits[1, 3]"
    )
    assert "max |onnx - torch| = " in line
    meta = read_metadata(onnx.load(str(out)))
    assert meta["class_names"] == ["run", "jump", "wave"]
    assert meta["mean"] == [0.45] * 3 and meta["std"] == [0.225] * 3 and meta["frames"] == 4

    again = cfp(*args)
    assert again.returncode == 2
    assert (
        again.stderr.strip() == f"cfp export: error: {out} exists; pass --overwrite to replace it"
    )
    assert cfp(*args, "--overwrite", "--arg", "classes=4").returncode == 0
    assert onnx.load(str(out)).graph.output[0].type.tensor_type.shape.dim[1].dim_value == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.txt", "nets.py", "tiny.onnx"]


def test_export_zoo_model_with_dynamo(tmp_path: Path) -> None:
    out = tmp_path / "x3d.onnx"
    done = cfp(
        "export", "torch", "zoo:x3d_m", "--arg", "width=0.5", "--arg", "depth=0.01",
        "--arg", "num_classes=3", "--arg", "in_frames=8", "--input-shape", "1,3,8,32,32",
        "-o", out, "--dynamo",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK:")
    assert read_metadata(onnx.load(str(out)))["exporter"] == "torch-dynamo"


@pytest.mark.parametrize(
    "source, extra, message",
    [
        ("{f}:pair", [], "model returns a tuple; cfp_onnx needs one logits tensor"),
        ("{f}:nothing", [], "has no function 'nothing'; it defines"),
        ("{f}", [], "is not FILE.py:FACTORY or zoo:NAME"),
        ("zoo:alexnet", [], "no zoo model 'alexnet'; available: mfnet_3d, i3d"),
        ("{f}:make", ["--arg", "colours=2"], "failed: TypeError"),
    ],
)
def test_torch_user_errors_are_one_line(
    factories: Path, tmp_path: Path, source: str, extra: list[str], message: str
) -> None:
    src = source.format(f=factories)
    done = cfp(
        "export", "torch", src, "--input-shape", "1,3,4,16,16", "-o", tmp_path / "m.onnx", *extra
    )
    assert done.returncode == 2
    assert done.stderr.startswith("cfp export: error: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_torch_needs_input_shape(factories: Path, tmp_path: Path) -> None:
    done = cfp("export", "torch", f"{factories}:make", "-o", tmp_path / "m.onnx")
    assert done.returncode == 2 and "needs --input-shape" in done.stderr


def test_export_keras_file(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    inputs = keras.Input((4, 16, 16, 3), name="clip")
    x = keras.layers.Conv3D(4, 3, padding="same", groups=1, name="conv")(inputs)
    x = keras.layers.Conv3D(4, 3, padding="same", groups=2, name="gconv")(x)
    x = keras.layers.GlobalAveragePooling3D()(x)
    keras.Model(inputs, keras.layers.Dense(3)(x)).save(tmp_path / "m.keras")
    out = tmp_path / "m.onnx"
    done = cfp("export", "tf", tmp_path / "m.keras", "-o", out)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"OK: {out} (tf, opset 17) video[1, 4, 16, 16, 3] NDHWC")
    assert read_metadata(onnx.load(str(out)))["layout"] == "NDHWC"
