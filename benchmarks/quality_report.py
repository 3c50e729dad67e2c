"""Markdown tables from ``benchmarks/results/quality.json`` (written by quality.py).

python benchmarks/quality_report.py [--results results/quality_px48.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "quality.json"


def cell(v: Any, digits: int = 2) -> str:
    """A mean with its 95 % interval, ``0.52 [0.44, 0.60]``; a bare number as is."""
    if isinstance(v, list | tuple):
        m, lo, hi = v
        return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
    if v is None:
        return "–"
    return f"{v:.{digits}f}"


COLUMNS = (
    ("pointing", "pointing"),
    ("energy", "energy in mask"),
    ("mask_auc", "mask AUC"),
    ("deletion", "deletion AUC (lower better)"),
    ("insertion", "insertion AUC"),
    ("faith_ratio_d0", "ablation ratio d0"),
    ("faith_ratio_d1", "ratio d1"),
    ("faith_ratio_d2", "ratio d2"),
    ("specificity", "class-tube Spearman across labels"),
    ("sanity_jaccard_top", "Jaccard, top rand."),
    ("sanity_jaccard_all", "Jaccard, all rand."),
    ("sanity_spearman_top", "Spearman, top rand."),
    ("sanity_spearman_all", "Spearman, all rand."),
    ("kernels_d0", "d0 kernels"),
)


def model_table(name: str, summary: dict[str, dict[str, Any]]) -> str:
    """One row per configuration (and Grad-CAM, random), one column per metric."""
    lines = [
        "| configuration | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for key in [*sorted(k for k in summary if "/" in k), "gradcam", "random"]:
        s = summary.get(key, {})
        cells = [cell(s.get(k), 1 if k == "kernels_d0" else 2) for k, _ in COLUMNS]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return f"### {name}\n\n" + "\n".join(lines)


SUMMARY = (
    ("weights/theta/weighted", "paper default (`weights/theta/weighted`)"),
    ("weights/top5/contrast", "recommended (`weights/top5/contrast`)"),
    ("gradcam", "3D Grad-CAM (`gradcam`)"),
    ("random", "random map (`random`)"),
)
SUMMARY_COLUMNS = (
    ("faith_ratio_d0", "ablation ratio d0 (>= 3)"),
    ("pointing", "pointing"),
    ("energy", "energy in mask"),
    ("mask_auc", "mask AUC (0.5 = chance)"),
    ("deletion", "deletion AUC"),
    ("insertion", "insertion AUC"),
    ("specificity", "Spearman across labels (< 0.3)"),
    ("sanity_jaccard_all", "Jaccard, all random (< 0.5)"),
    ("sanity_spearman_all", "Spearman, all random (< 0.3)"),
    ("sanity_jaccard_top", "Jaccard, top half random"),
    ("sanity_spearman_top", "Spearman, top half random"),
)


def summary_table(results: dict[str, Any]) -> str:
    """Per model: the paper's default, the recommended configuration, Grad-CAM, random."""
    lines = [
        "| model | configuration | " + " | ".join(t for _, t in SUMMARY_COLUMNS) + " |",
        "|---|---|" + "---|" * len(SUMMARY_COLUMNS),
    ]
    for name, r in results.items():
        for key, title in SUMMARY:
            s = r["summary"].get(key, {})
            lines.append(f"| {name} | {title} | "
                         + " | ".join(cell(s.get(k)) for k, _ in SUMMARY_COLUMNS) + " |")  # fmt: skip
    return "\n".join(lines)


def models_table(folder: Path) -> str:
    """The trained models' records (``<name>.json`` beside each ``.onnx``)."""
    lines = [
        "| model | zoo architecture | framework | width | depth | clip | epochs | train time "
        "| ONNX size | val accuracy |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        c = r["config"]
        lines.append(
            f"| `{c['name']}` | `{c['arch']}` | {c['framework']} | {c['width']} | {c['depth']} "
            f"| {c['frames']}x{c['size']}x{c['size']} | {c['epochs']} | {r['train_seconds']:.0f} s "
            f"| {r['onnx_bytes'] / 1e6:.2f} MB | **{100 * r['val_accuracy']:.1f} %** "
            f"({r['val_clips']} clips) |"
        )
    return "\n".join(lines)


def report(results: dict[str, Any]) -> None:
    print(summary_table(results) + "\n")
    for name, r in results.items():
        acc = r["summary"].get("_meta", {}).get("correct")
        print(model_table(name, r["summary"]))
        print(f"\n{r['clips']} clips; accuracy on them {cell(acc)}; {r['seconds']} s\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--models", type=Path, help="print the table of the models in this folder")
    args = ap.parse_args()
    if args.models:
        print(models_table(args.models))
    else:
        report(json.loads(args.results.read_text()))
