"""`cfp compare`: a PyTorch model and its Keras twin agree almost perfectly; unrelated ones less."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from cfp_onnx import compare as cmp
from cfp_onnx.cli.main import main
from cfp_onnx.errors import OptionError
from tests.handmade import moving_square

FRAMES, SIZE, CLASSES = 8, 32, 4


class Tiny(nn.Module):
    def __init__(self, seed: int, width: int = 6) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv3d(3, width, 3, padding=1)
        self.conv2 = nn.Conv3d(width, 8, 3, padding=1)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3, 4)))


def keras_twin():  # type: ignore[no-untyped-def]
    import keras
    from keras import layers

    x = inputs = keras.Input((FRAMES, SIZE, SIZE, 3))
    for name, width in (("conv1", 6), ("conv2", 8)):
        x = layers.ZeroPadding3D(1)(x)
        x = layers.Conv3D(width, 3, name=name, activation="relu")(x)
    x = layers.GlobalAveragePooling3D()(x)
    return keras.Model(inputs, layers.Dense(CLASSES, name="fc")(x))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from cfp_onnx.exporters.pytorch import export_torch
    from cfp_onnx.exporters.tensorflow import export_keras
    from cfp_onnx.exporters.transfer import torch_to_keras

    root = tmp_path_factory.mktemp("compare")
    shape = (1, 3, FRAMES, SIZE, SIZE)
    torch_model, other = Tiny(0), Tiny(1, width=5)
    twin = keras_twin()
    transfer = torch_to_keras(torch_model, twin)
    export_torch(torch_model, shape, root / "torch.onnx")
    export_torch(other, shape, root / "other.onnx")
    export_keras(twin, root / "keras.onnx")
    (root / "map.json").write_text(json.dumps(transfer.conv_nodes))
    frames, _ = moving_square(FRAMES, SIZE)
    video = root / "square.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), 8.0, (SIZE, SIZE))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    np.save(
        root / "clip.npy",
        np.ascontiguousarray(frames.transpose(3, 0, 1, 2)[None] / 255.0, np.float32),
    )
    return {"root": root, "torch": root / "torch.onnx", "keras": root / "keras.onnx",
            "other": root / "other.onnx", "map": root / "map.json", "video": video,
            "npy": root / "clip.npy"}  # fmt: skip


def _compare(models: dict[str, Path], a: str, b: str, out: str, *extra: str) -> dict:  # type: ignore[type-arg]
    dest = models["root"] / out
    args = [str(models[a]), str(models[b]), "--clip", str(models["video"]), "--out", str(dest)]
    assert main(["compare", *args, "--depth", "2", "--theta", "0.5", *extra]) == 0
    return json.loads((dest / "agreement.json").read_text())  # type: ignore[no-any-return]


def test_torch_and_keras_twins_agree_almost_perfectly(models: dict[str, Path]) -> None:
    fig = _compare(models, "torch", "keras", "twins")
    assert fig["same_prediction"]
    assert fig["spearman"] > 0.999 and fig["top10_iou"] > 0.95
    assert fig["matched_layers"] == 2 and fig["jaccard_per_depth"] == [1.0, 1.0]
    html = (models["root"] / "twins" / "report.html").read_text()
    assert "A: torch.onnx" in html and "B: keras.onnx" in html and "Spearman" in html
    for key in ("a", "b"):
        assert json.loads((models["root"] / "twins" / f"pyramid_{key}.json").read_text())["nodes"]


def test_explicit_layer_mapping_and_npy_relayout(models: dict[str, Path]) -> None:
    dest = models["root"] / "mapped"
    args = [str(models["torch"]), str(models["keras"]), "--clip", str(models["npy"]),
            "--clip", str(models["video"]), "--out", str(dest), "--map", str(models["map"])]  # fmt: skip
    assert main(["compare", *args, "--depth", "2", "--no-report", "--no-tubes"]) == 0
    figures = json.loads((dest / "agreement.json").read_text())
    assert len(figures) == 2 and sorted(p.name for p in dest.iterdir())[:3] == [
        ".cfp-output.json",
        "agreement.json",
        "clip_000",
    ]
    for fig in figures:  # the .npy is torch's NCDHW input, transposed for Keras
        assert fig["spearman"] > 0.999 and fig["jaccard_per_depth"] == [1.0, 1.0]


def test_unrelated_models_agree_less(models: dict[str, Path]) -> None:
    twins = _compare(models, "torch", "keras", "twins2", "--no-report", "--no-tubes")
    other = _compare(models, "torch", "other", "unrelated", "--no-report", "--no-tubes")
    assert other["matched_layers"] is None and other["jaccard_per_depth"] is None
    assert other["spearman"] < twins["spearman"] - 0.05
    assert other["top10_iou"] < twins["top10_iou"] - 0.1


def test_rank_helpers_against_a_slow_reference() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 200).astype(float)  # many ties
    b = a + rng.normal(0, 2, 200)
    slow = [sum(x < v for x in a) + (sum(x == v for x in a) - 1) / 2 for v in a]
    np.testing.assert_allclose(cmp.ranks(a), slow)
    ra, rb = cmp.ranks(a), cmp.ranks(b)
    assert cmp.spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    assert cmp.spearman(a, a) == pytest.approx(1.0) and math.isnan(cmp.spearman(a, np.ones(200)))
    x = np.arange(100.0)
    assert cmp.top_iou(x, x) == 1.0 and cmp.top_iou(x, -x) == 0.0
    assert cmp.top_iou(x, np.r_[x[:95], x[95:] - 200]) == pytest.approx(5 / 15)


def test_bad_mapping_is_a_clear_error(models: dict[str, Path]) -> None:
    from cfp_onnx.api import Explainer

    shape = (1, 3, FRAMES, SIZE, SIZE)
    a, b = (
        Explainer(str(models["torch"]), clip_shape=shape),
        Explainer(str(models["other"]), clip_shape=shape),
    )
    with pytest.raises(OptionError, match="not a conv layer of model B"):
        cmp.match_layers(a, b, {"/conv1/Conv": "nope"})
    with pytest.raises(OptionError, match="shapes differ"):
        cmp.match_layers(a, b, {"/conv1/Conv": "/conv1/Conv"})


@pytest.mark.browser
def test_selecting_a_kernel_selects_its_counterpart(models: dict[str, Path]) -> None:
    from tests.browser import chromium, console_errors
    from tests.test_report_browser import wait_ready

    _compare(models, "torch", "keras", "pair")
    report = models["root"] / "pair" / "report.html"
    with chromium() as driver:
        driver.get(report.as_uri())
        wait_ready(driver)
        data = json.loads(driver.execute_script(
            "return document.getElementById('cfp-data').textContent"))  # fmt: skip
        a, b = data["views"]
        for node in a["shown"][:5]:
            driver.find_element("css selector", f"#graph-0 circle[data-node='{node}']").click()
            twin = a["counterpart"][node]
            assert twin >= 0  # twins: every kernel has one
            assert int(driver.find_element("id", "tube-1").get_attribute("data-node")) == twin
            la, lb = a["nodes"]["layer"][node], b["nodes"]["layer"][twin]
            assert a["nodes"]["channel"][node] == b["nodes"]["channel"][twin]
            assert (a["layers"][la], b["layers"][lb]) in json.loads(
                models["map"].read_text()
            ).items()
        assert console_errors(driver) == []


def test_faithfulness_of_twins_is_the_same_on_both_sides(models: dict[str, Path]) -> None:
    _compare(models, "torch", "keras", "faith", "--faithfulness-draws", "3", "--no-tubes")
    docs = [json.loads((models["root"] / "faith" / f"faithfulness_{k}.json").read_text())
            for k in ("a", "b")]  # fmt: skip
    assert docs[0]["kernels"] == docs[1]["kernels"] > 0 and docs[0]["draws"] == 3
    assert docs[0]["score"] == pytest.approx(docs[1]["score"], rel=1e-4)
    assert docs[0]["pyramid_drop"] == pytest.approx(docs[1]["pyramid_drop"], rel=1e-3, abs=1e-4)
    html = (models["root"] / "faith" / "report.html").read_text()
    assert 'id="faithfulness-0"' in html and 'id="faithfulness-1"' in html
