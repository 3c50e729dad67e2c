"""Train small zoo models on the synthetic action data (CPU, minutes each) and export to ONNX.

Every epoch draws fresh clips from ``cfp_onnx.synthetic.make_dataset`` (seeded by the
epoch), so the models never see a clip twice; validation uses its own seed. Everything
follows from ``--seed``: data, initialisation, batch order.

    python benchmarks/train.py --model r3d            # one of: r3d, i3d, x3d, resnext, keras_r3d, r2plus1d
    python benchmarks/train.py --all

Writes ``benchmarks/models/<name>.onnx`` (with layout, mean, std, frames, size and
class names in its metadata) and ``benchmarks/models/<name>.json`` (config, accuracy,
times).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cfp_onnx.synthetic import CLASSES, make_dataset

HERE = Path(__file__).resolve().parent
OUT = HERE / "models"
MEAN, STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)
VAL_SEED = 10_000  # validation clips: make_dataset(n_val, VAL_SEED + seed)
QUALITY_SEED = 20_000  # quality.py's clips, never seen in training or validation


@dataclass(frozen=True)
class Config:
    """One trained model: zoo architecture, size, clip shape and schedule."""

    name: str
    arch: str  # zoo factory name
    framework: str  # "torch" or "keras"
    width: float
    depth: float
    frames: int = 16
    size: int = 112
    epochs: int = 16
    clips_per_epoch: int = 540
    batch: int = 12
    lr: float = 3e-3


CONFIGS = {
    c.name: c
    for c in (
        Config("r3d", "resnet50_3d", "torch", width=0.125, depth=0.25),
        Config("resnext", "resnext101_3d", "torch", width=0.25, depth=0.1),
        Config("x3d", "x3d_m", "torch", width=0.25, depth=0.1, epochs=40, lr=5e-3),
        Config("i3d", "i3d", "torch", width=0.125, depth=0.5),
        Config("keras_r3d", "resnet50_3d", "keras", width=0.125, depth=0.25, epochs=20),
        # a finer last conv map (10x10 at 160 px, stride 16) than the others' 3x3-4x4
        Config("r2plus1d", "r2plus1d_18", "torch", width=0.125, depth=0.5, size=160),
    )
}


def normalise(frames: np.ndarray, layout: str) -> np.ndarray:
    """uint8 ``[N, T, H, W, 3]`` -> float32 in the model's layout (NCDHW or NDHWC)."""
    x = (frames.astype(np.float32) / 255.0 - np.float32(MEAN[0])) / np.float32(STD[0])
    return np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)) if layout == "NCDHW" else x


def epoch_data(cfg: Config, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    frames, _, labels = make_dataset(
        cfg.clips_per_epoch, seed * 1000 + epoch, frames=cfg.frames, size=cfg.size
    )
    return frames, labels


def val_data(cfg: Config, seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    frames, _, labels = make_dataset(n, VAL_SEED + seed, frames=cfg.frames, size=cfg.size)
    return frames, labels


def batches(n: int, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    order = rng.permutation(n)
    for start in range(0, n - size + 1, size):
        yield order[start : start + size]


# ----------------------------------------------------------------------------- PyTorch


def train_torch(cfg: Config, seed: int, n_val: int) -> tuple[object, float, list[float]]:
    """Train with AdamW + one-cycle; returns (model in eval mode, val accuracy, epoch losses)."""
    import torch
    from cfp_onnx.exporters.zoo.torch_models import MODELS

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    last = torch.channels_last_3d
    model = MODELS[cfg.arch](
        num_classes=len(CLASSES), width=cfg.width, depth=cfg.depth, in_frames=cfg.frames
    ).to(memory_format=last)  # channels-last 3D: depth-wise convs ~3x faster on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * (cfg.clips_per_epoch // cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15
    )
    rng = np.random.default_rng(seed)
    losses = []
    for epoch in range(cfg.epochs):
        frames, labels = epoch_data(cfg, seed, epoch)
        model.train()
        total = 0.0
        for idx in batches(len(labels), cfg.batch, rng):
            x = torch.from_numpy(normalise(frames[idx], "NCDHW")).to(memory_format=last)
            loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(labels[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(labels))
        print(f"  epoch {epoch}: loss {losses[-1]:.3f}", flush=True)
    model.eval().to(memory_format=torch.contiguous_format)
    return model, accuracy_torch(model, cfg, seed, n_val), losses


def accuracy_torch(model: object, cfg: Config, seed: int, n_val: int) -> float:
    import torch

    frames, labels = val_data(cfg, seed, n_val)
    correct = 0
    with torch.no_grad():
        for start in range(0, n_val, 32):
            x = torch.from_numpy(normalise(frames[start : start + 32], "NCDHW"))
            pred = model(x).argmax(1).numpy()  # type: ignore[operator]
            correct += int((pred == labels[start : start + 32]).sum())
    return correct / n_val


def export_torch_model(model: object, cfg: Config, path: Path) -> None:
    from cfp_onnx.exporters.pytorch import export_torch

    export_torch(
        model,  # type: ignore[arg-type]
        (1, 3, cfg.frames, cfg.size, cfg.size),
        path,
        dynamo=False,
        metadata={"mean": MEAN, "std": STD, "class_names": CLASSES},
        overwrite=True,
    )


# ----------------------------------------------------------------------------- Keras


def train_keras(cfg: Config, seed: int, n_val: int) -> tuple[object, float, list[float]]:
    """Keras fit with Adam + cosine decay; channels-last input."""
    import keras
    import tensorflow as tf
    from cfp_onnx.exporters.zoo.keras_models import MODELS

    keras.utils.set_random_seed(seed)
    tf.config.threading.set_intra_op_parallelism_threads(2)
    model = MODELS[cfg.arch](
        num_classes=len(CLASSES), width=cfg.width, depth=cfg.depth,
        in_frames=cfg.frames, size=cfg.size,
    )  # fmt: skip
    steps = cfg.epochs * (cfg.clips_per_epoch // cfg.batch)
    lr = keras.optimizers.schedules.CosineDecay(cfg.lr / 10, steps, warmup_target=cfg.lr,
                                                warmup_steps=steps * 3 // 20)  # fmt: skip
    model.compile(
        optimizer=keras.optimizers.AdamW(lr, weight_decay=1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    losses = []
    for epoch in range(cfg.epochs):
        frames, labels = epoch_data(cfg, seed, epoch)
        hist = model.fit(normalise(frames, "NDHWC"), labels, batch_size=cfg.batch, epochs=1,
                         shuffle=True, verbose=0)  # fmt: skip
        losses.append(float(hist.history["loss"][-1]))
        print(f"  epoch {epoch}: loss {losses[-1]:.3f}", flush=True)
    frames, labels = val_data(cfg, seed, n_val)
    pred = model.predict(normalise(frames, "NDHWC"), batch_size=32, verbose=0).argmax(1)
    return model, float((pred == labels).mean()), losses


def export_keras_model(model: object, cfg: Config, path: Path) -> None:
    from cfp_onnx.exporters.tensorflow import export_keras

    export_keras(
        model,  # type: ignore[arg-type]
        path,
        metadata={"mean": MEAN, "std": STD, "class_names": CLASSES},
        overwrite=True,
    )


# ----------------------------------------------------------------------------- driver


def train_one(cfg: Config, seed: int, n_val: int) -> dict[str, object]:
    """Train, check on the validation clips, export; returns the record written beside it."""
    OUT.mkdir(exist_ok=True)
    start = time.perf_counter()
    trainer = train_torch if cfg.framework == "torch" else train_keras
    model, acc, losses = trainer(cfg, seed, n_val)
    seconds = time.perf_counter() - start
    path = OUT / f"{cfg.name}.onnx"
    (export_torch_model if cfg.framework == "torch" else export_keras_model)(model, cfg, path)
    record = {
        "config": asdict(cfg),
        "seed": seed,
        "val_clips": n_val,
        "val_seed": VAL_SEED + seed,
        "val_accuracy": acc,
        "train_seconds": round(seconds, 1),
        "losses": [round(v, 4) for v in losses],
        "onnx_bytes": path.stat().st_size,
    }
    (OUT / f"{cfg.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{cfg.name}: val accuracy {acc:.3f} ({n_val} clips), {seconds:.0f} s, "
          f"{path.stat().st_size / 1e6:.2f} MB")  # fmt: skip
    return record


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", choices=sorted(CONFIGS), action="append")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val", type=int, default=270, help="validation clips (default 270)")
    ap.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    args = ap.parse_args()
    names = sorted(CONFIGS) if args.all else (args.model or [])
    for name in names:
        cfg = CONFIGS[name]
        if args.epochs is not None:
            cfg = Config(**{**asdict(cfg), "epochs": args.epochs})
        train_one(cfg, args.seed, args.val)


if __name__ == "__main__":
    main()
