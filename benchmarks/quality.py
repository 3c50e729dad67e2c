"""Explanation quality of the trained models on held-out synthetic clips.

For each model in ``benchmarks/models/`` and each configuration (head mode x selection
by theta or top-n x class tube summed, relevance-weighted or contrast), over ``--clips`` clips
never seen in training (``make_dataset(n, QUALITY_SEED)``), explained for their true
class at depth 3:

- faithfulness: zero the conv outputs of the pyramid's depth-d kernels (a Mul by a
  per-channel mask inserted after every conv) and measure the class logit's drop, against
  zeroing as many random kernels of the same layers; ratio of mean drops with a 95 %
  bootstrap interval over clips, per depth;
- deletion / insertion AUC of the class tube (20 steps, removed voxels replaced by the
  clip's per-channel mean, softmax probability of the class);
- localisation: pointing game (max voxel inside the actor's mask dilated by 3 px),
  energy inside the mask and mask AUC (a voxel on the actor outranks one off it), against
  3D Grad-CAM (``gradcam.py``) and a random map;
- sanity: weights randomised (head + top half of the convs, then all), pyramid node
  Jaccard and class-tube Spearman against the trained model's;
- class-specificity: the clip explained for every other class, Spearman of their class
  tubes against the true class's.

The class tube is the sum over depth-0 kernels of their raw maps (SPEC §6, before the
per-tube min-max), upsampled to the clip; "weighted" multiplies each by its relevance;
"contrast" is the weighted tube minus the mean of every label's weighted tube (the clip
explained for each class: one forward, nine pyramids).

    python benchmarks/quality.py [--models r3d x3d] [--clips 108] [--modes weights] [--depth 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gradcam import GradCam
from metrics import (
    auc,
    bootstrap_mean,
    bootstrap_ratio,
    energy_inside,
    jaccard,
    mask_auc,
    pointing_game,
    spearman,
    step_masks,
)
from train import MEAN, QUALITY_SEED, STD

from cfp_onnx import classtube
from cfp_onnx.api import Explainer, Run
from cfp_onnx.faithfulness import Ablator, random_like
from cfp_onnx.pyramid import Pyramid
from cfp_onnx.synthetic import make_dataset

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
RESULTS = HERE / "results" / "quality.json"
DEPTH, THETA, TOP_N, STEPS, RANDOM_DRAWS = 3, 0.6, 5, 20, 3
HEAD_MODES = ("weights", "contribution", "contrastive")
SELECTIONS = {"theta": (THETA, None), "top5": (0.0, TOP_N)}
TUBES = ("sum", "weighted", "contrast", "pyramid")


@dataclass(frozen=True)
class Setting:
    """How one pyramid is asked for, and how its class tube is combined."""

    mode: str
    selection: str
    tube: str

    @property
    def name(self) -> str:
        return f"{self.mode}/{self.selection}/{self.tube}"

    def pyramid(self, ex: Explainer, run: Run, label: int) -> Pyramid:
        theta, top_n = SELECTIONS[self.selection]
        return ex.pyramid(
            run, label=label, depth=DEPTH, theta=theta, top_n=top_n, head_mode=self.mode
        )


# ----------------------------------------------------------------------------- model surgery


def randomised(path: Path, ex: Explainer, share: float, out: Path, seed: int = 0) -> Path:
    """A copy whose head and top `share` of conv layers (last first) have random weights
    of the same scale (normal, the original tensor's std)."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    by_output = {n.output[0]: n for n in model.graph.node if n.output}
    by_name = {n.name: n for n in model.graph.node}
    n_top = round(share * len(ex.layers))
    targets = [by_output[lay.output] for lay in ex.layers[len(ex.layers) - n_top :]]
    targets += [by_name[name] for name in ex.head.nodes]
    rng = np.random.default_rng(seed)
    for node in targets:
        for inp in node.input[1:]:
            if inp in inits:
                w = numpy_helper.to_array(inits[inp])
                new = rng.normal(0, float(w.std()) or 1.0, w.shape).astype(w.dtype)
                inits[inp].CopyFrom(numpy_helper.from_array(new, inp))
    onnx.save(model, str(out))
    return out


# ----------------------------------------------------------------------------- class tubes


def tube_tensors(ex: Explainer, gc: GradCam) -> tuple[str, ...]:
    """Full maps one run must return: the depth-0 layers' inputs/outputs and Grad-CAM's map."""
    names: dict[str, None] = {}
    for i in ex.levels(DEPTH)[0].tolist():
        names[ex.layers[int(i)].input] = None
        names[ex.layers[int(i)].output] = None
    names.update(dict.fromkeys(ex.map_tensors(DEPTH)))
    names.update(dict.fromkeys(classtube.tensors(ex, "pyramid", DEPTH)))  # every kernel's output
    names[gc.tensor] = None
    return tuple(names)


# ----------------------------------------------------------------------------- one model


class ModelBench:
    """Sessions and helpers for one model."""

    def __init__(self, path: Path, tmp: Path) -> None:
        dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
        self.nchw = dims[1] == 3
        frames, size = (dims[2], dims[3]) if self.nchw else (dims[1], dims[2])
        shape = (1, 3, frames, size, size) if self.nchw else (1, frames, size, size, 3)
        self.size = (frames, size, size)
        self.ex = Explainer(path, clip_shape=shape)
        self.gc = GradCam(self.ex, path)
        self.full = tube_tensors(self.ex, self.gc)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        self.plain = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.plain.get_inputs()[0].name
        self.ablator = Ablator(self.ex, range(len(self.ex.layers)))
        self.random = {}
        for share, tag in ((0.5, "top"), (1.0, "all")):
            rpath = randomised(path, self.ex, share, tmp / f"{path.stem}_{tag}.onnx")
            rex = Explainer(rpath, clip_shape=shape)
            rgc = GradCam(rex, rpath)
            self.random[tag] = (rex, rgc, tube_tensors(rex, rgc))

    def prepare(self, frames: np.ndarray) -> np.ndarray:
        x = (frames.astype(np.float32) / 255.0 - np.float32(MEAN[0])) / np.float32(STD[0])
        return (x.transpose(3, 0, 1, 2) if self.nchw else x)[None].astype(np.float32)

    def ablate(self, x: np.ndarray, rows: list[dict[int, np.ndarray]], label: int) -> np.ndarray:
        """Class logit with each row's kernels zeroed (row: layer -> channels), one batched
        run through the product's faithfulness check's masked model."""
        return self.ablator.logits(x, rows)[:, label]

    def curves(self, x: np.ndarray, tube: np.ndarray, label: int) -> tuple[float, float]:
        """Deletion and insertion AUC of the class probability, 20 steps, mean fill."""
        steps = step_masks(tube, STEPS)  # [S, T, H, W]
        axes = (2, 3, 4) if self.nchw else (1, 2, 3)
        mean = x.mean(axis=axes, keepdims=True)
        sel = steps[:, None] if self.nchw else steps[..., None]
        deletion = np.where(sel, mean, x)
        insertion = np.where(sel, x, mean)
        logits = self.plain.run(None, {self.input: np.concatenate([deletion, insertion])})[0]
        prob = softmax(np.asarray(logits, np.float64))[:, label]
        return auc(prob[: STEPS + 1]), auc(prob[STEPS + 1 :])


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kernel_sets(p: Pyramid, depth: int) -> dict[int, np.ndarray]:
    """The pyramid's depth-`depth` kernels as layer -> channels."""
    at = p.node_depth == depth
    return {
        int(la): p.node_channel[at & (p.node_layer == la)] for la in np.unique(p.node_layer[at])
    }


def node_set(p: Pyramid) -> set[tuple[int, int]]:
    """The pyramid's kernels as (layer index, channel) pairs (layer names are shared)."""
    return set(zip(p.node_layer.tolist(), p.node_channel.tolist()))


# ----------------------------------------------------------------------------- one clip


def clip_metrics(
    mb: ModelBench,
    frames: np.ndarray,
    mask: np.ndarray,
    label: int,
    rng: np.random.Generator,
    curves: tuple[str, ...],
    grid: list[tuple[str, str]],
    kinds: tuple[str, ...] = TUBES,
) -> dict[str, dict[str, float]]:
    """Every metric of one clip, keyed by setting name (plus 'gradcam' and 'random');
    `grid`: the (head mode, selection) pairs to measure."""
    ex, x = mb.ex, mb.prepare(frames)
    run = ex.run(x, depth=DEPTH, full=mb.full)
    others = [k for k in range(ex.classes) if k != label]
    cams = mb.gc.maps(run, [label, *others], mb.size)
    out: dict[str, dict[str, float]] = {}
    out["gradcam"] = localisation(cams[0], mask)
    out["gradcam"]["specificity"] = float(np.mean([spearman(cams[0], c) for c in cams[1:]]))
    noise = rng.random(mb.size).astype(np.float32)
    out["random"] = localisation(noise, mask)
    if curves:
        for key, tube in (("gradcam", cams[0]), ("random", noise)):
            out[key]["deletion"], out[key]["insertion"] = mb.curves(x, tube, label)
    rand_runs = {
        tag: rex.run(x, depth=DEPTH, full=full) for tag, (rex, _, full) in mb.random.items()
    }
    for tag, (_, rgc, _) in mb.random.items():
        rcam = rgc.maps(rand_runs[tag], [label], mb.size)[0]
        out["gradcam"][f"sanity_spearman_{tag}"] = spearman(cams[0], rcam)
    for mode, sel in grid:
        pyramid_metrics(mb, x, run, rand_runs, label, others, mask, Setting(mode, sel, ""), rng,
                        curves, out, kinds)  # fmt: skip
    out["_meta"] = {"correct": float(np.argmax(run.logits) == label)}
    return out


def localisation(tube: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    return {
        "pointing": float(pointing_game(tube, mask)),
        "energy": energy_inside(tube, mask),
        "mask_auc": mask_auc(tube, mask),
    }


def pyramid_metrics(
    mb: ModelBench,
    x: np.ndarray,
    run: Run,
    rand_runs: dict[str, Run],
    label: int,
    others: list[int],
    mask: np.ndarray,
    base: Setting,
    rng: np.random.Generator,
    curves: tuple[str, ...],
    out: dict[str, dict[str, float]],
    kinds: tuple[str, ...] = TUBES,
) -> None:
    """Metrics of one (head mode, selection): faithfulness is shared by the tube kinds."""
    ex = mb.ex
    labels = [label, *others]
    pyrs = [base.pyramid(ex, run, k) for k in labels]  # pyrs[0]: the true class
    p = pyrs[0]
    faith = faithfulness(mb, x, p, label, rng)
    rand_p = {tag: [base.pyramid(r[0], rand_runs[tag], k) for k in labels]
              for tag, r in mb.random.items()}  # fmt: skip
    cache: dict[str, list[np.ndarray]] = {}
    for tube_kind in kinds:
        s = Setting(base.mode, base.selection, tube_kind)
        tubes = class_tubes(ex, pyrs, run, mb.size, tube_kind, cache)
        m = {**localisation(tubes[0], mask), **faith}
        m["kernels_d0"] = float((p.node_depth == 0).sum())
        m["specificity"] = float(np.mean([spearman(tubes[0], t) for t in tubes[1:]]))
        for tag, (rex, _, _) in mb.random.items():
            rt = class_tubes(rex, rand_p[tag], rand_runs[tag], mb.size, tube_kind, {})[0]
            m[f"sanity_spearman_{tag}"] = spearman(tubes[0], rt)
            m[f"sanity_jaccard_{tag}"] = jaccard(node_set(p), node_set(rand_p[tag][0]))
        if tube_kind in curves:
            m["deletion"], m["insertion"] = mb.curves(x, tubes[0], label)
        out[s.name] = m


def class_tubes(
    ex: Explainer,
    pyrs: list[Pyramid],
    run: Run,
    size: tuple[int, int, int],
    kind: str,
    cache: dict[str, list[np.ndarray]],
) -> list[np.ndarray]:
    """Class tubes of several labels' pyramids (`cache` keeps them per kind). "contrast":
    each label's weighted tube minus the mean weighted tube over all labels."""
    if kind not in cache:
        if kind == "contrast":
            weighted = class_tubes(ex, pyrs, run, size, "weighted", cache)
            mean = np.mean(weighted, axis=0)
            cache[kind] = [t - mean for t in weighted]
        elif kind == "pyramid":  # classtube.class_tube's pyramid tube, every label at once
            own = classtube.pyramid_tubes(ex, run, pyrs, size)
            cache[kind] = list(own - own.mean(axis=0))
        else:
            cache[kind] = list(
                classtube.class_tubes(ex, run, pyrs, size, weighted=kind == "weighted")
            )
    return cache[kind]


def faithfulness(
    mb: ModelBench, x: np.ndarray, p: Pyramid, label: int, rng: np.random.Generator
) -> dict[str, float]:
    """Logit drops when the pyramid's depth-d kernels, or as many random kernels of the
    same layers (mean of RANDOM_DRAWS draws), are zeroed."""
    base = float(p.score)
    rows: list[dict[int, np.ndarray]] = []
    index: list[tuple[str, int]] = []
    for d in range(DEPTH):
        sets = kernel_sets(p, d)
        if not sets:
            continue
        rows.append(sets)
        index.append(("pyr", d))
        for _ in range(RANDOM_DRAWS):
            rows.append(random_like(sets, {la: mb.ex.layers[la].c_out for la in sets}, rng))
            index.append(("rand", d))
    logits = mb.ablate(x, rows, label) if rows else np.zeros(0)
    drops: dict[str, list[float]] = defaultdict(list)
    for (kind, d), v in zip(index, logits):
        drops[f"drop_{kind}_d{d}"].append(base - float(v))
    return {k: float(np.mean(v)) for k, v in drops.items()}


# ----------------------------------------------------------------------------- driver


def bench_model(
    path: Path,
    n: int,
    curves: tuple[str, ...],
    seed: int,
    grid: list[tuple[str, str]],
    kinds: tuple[str, ...] = TUBES,
) -> dict[str, Any]:
    """Per-clip metrics of one model (raw lists) on `n` held-out clips."""
    with tempfile.TemporaryDirectory() as tmp:
        mb = ModelBench(path, Path(tmp))
        frames, masks, labels = make_dataset(n, QUALITY_SEED, frames=mb.size[0], size=mb.size[1])
        rng = np.random.default_rng(seed)
        per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        t = time.perf_counter()
        for i in range(n):
            res = clip_metrics(mb, frames[i], masks[i], int(labels[i]), rng, curves, grid, kinds)
            for key, m in res.items():
                for k, v in m.items():
                    per[key][k].append(v)
            if i % 20 == 19:
                print(
                    f"  {path.stem}: {i + 1}/{n} clips, {time.perf_counter() - t:.0f} s", flush=True
                )
    return {key: dict(m) for key, m in per.items()}


def summarise(per: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """Means with 95 % bootstrap intervals; faithfulness as ratios of mean drops."""
    out: dict[str, dict[str, Any]] = {}
    for key, m in per.items():
        s: dict[str, Any] = {}
        for k, v in m.items():
            if not k.startswith("drop_"):
                s[k] = bootstrap_mean(np.array(v))
        for d in range(DEPTH):
            pyr, rnd = m.get(f"drop_pyr_d{d}"), m.get(f"drop_rand_d{d}")
            if pyr and rnd and len(pyr) == len(rnd):
                s[f"faith_ratio_d{d}"] = bootstrap_ratio(np.array(pyr), np.array(rnd))
                s[f"drop_pyr_d{d}"] = float(np.mean(pyr))
                s[f"drop_rand_d{d}"] = float(np.mean(rnd))
        out[key] = s
    return out


def iter_models(folder: Path, names: list[str] | None) -> Iterator[Path]:
    for path in sorted(folder.glob("*.onnx")):
        if not names or path.stem in names:
            yield path


def main() -> None:
    global DEPTH
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--clips", type=int, default=108)
    ap.add_argument(
        "--curves", choices=("none", "weighted", "all"), default="weighted",
        help="class tubes given deletion/insertion curves (default: weighted, contrast, pyramid)",
    )  # fmt: skip
    ap.add_argument("--modes", nargs="+", choices=HEAD_MODES, default=list(HEAD_MODES))
    ap.add_argument("--selections", nargs="+", choices=sorted(SELECTIONS), default=list(SELECTIONS))
    ap.add_argument("--tubes", nargs="+", choices=TUBES, default=list(TUBES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=MODELS, help="folder of trained .onnx models")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--depth", type=int, default=DEPTH, help=f"pyramid depth (default {DEPTH})")
    args = ap.parse_args()
    DEPTH = args.depth  # read by every function here at call time
    args.out.parent.mkdir(exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for path in iter_models(args.dir, args.models):
        t = time.perf_counter()
        curves = {"none": (), "weighted": ("weighted", "contrast", "pyramid"), "all": TUBES}[
            args.curves
        ]
        grid = [(m, s) for m in args.modes for s in args.selections]
        per = bench_model(path, args.clips, curves, args.seed, grid, tuple(args.tubes))
        results[path.stem] = {"clips": args.clips, "depth": DEPTH, "summary": summarise(per),
                              "seconds": round(time.perf_counter() - t)}  # fmt: skip
        args.out.write_text(json.dumps(results, indent=1))
        print(f"{path.stem}: {time.perf_counter() - t:.0f} s")
    from quality_report import report

    report(results)


if __name__ == "__main__":
    main()
