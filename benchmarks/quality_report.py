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


RECOMMENDED = "weights/top5/pyramid"
SUMMARY = (
    ("weights/theta/weighted", "paper default (`weights/theta/weighted`)"),
    ("weights/top5/contrast", "earlier recommendation (`weights/top5/contrast`)"),
    (RECOMMENDED, "recommended (`weights/top5/pyramid`)"),
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
            if key not in r["summary"]:
                continue
            s = r["summary"][key]
            lines.append(f"| {name} | {title} | "
                         + " | ".join(cell(s.get(k)) for k, _ in SUMMARY_COLUMNS) + " |")  # fmt: skip
    return "\n".join(lines)


AGAINST_GRADCAM = (("mask_auc", 1), ("insertion", 1), ("deletion", -1), ("pointing", 1))
THRESHOLDS = (
    ("specificity", "<", 0.3, "Spearman across labels < 0.3"),
    ("sanity_spearman_all", "<", 0.3, "Spearman, all weights random < 0.3"),
    ("sanity_jaccard_all", "<", 0.5, "Jaccard, all weights random < 0.5"),
    ("faith_ratio_d0", ">=", 3.0, "ablation ratio d0 >= 3"),
)


def versus(a: Any, b: Any, sign: int) -> str:
    """`a` against `b` (mean, lo, hi): 'better' / 'worse' when the 95 % intervals are
    apart (in the direction `sign` calls better), else 'tie'."""
    if a is None or b is None:
        return "–"
    (_, alo, ahi), (_, blo, bhi) = a, b
    if alo > bhi:
        return "better" if sign > 0 else "worse"
    if ahi < blo:
        return "worse" if sign > 0 else "better"
    return "tie"


def goal_table(results: dict[str, Any], config: str = RECOMMENDED) -> str:
    """Issue 14's goals for `config`, per model: against Grad-CAM (intervals overlapping
    count as a tie, which meets the goal) and against fixed thresholds (on the mean)."""
    titles = [f"{k} vs Grad-CAM" for k, _ in AGAINST_GRADCAM] + [t for *_, t in THRESHOLDS]
    lines = ["| model | " + " | ".join(titles) + " | goals met |",
             "|---|" + "---|" * (len(titles) + 1)]  # fmt: skip
    for name, r in results.items():
        s, g = r["summary"].get(config), r["summary"].get("gradcam")
        if s is None or g is None:
            continue
        cells, met = [], 0
        for key, sign in AGAINST_GRADCAM:
            v = versus(s.get(key), g.get(key), sign)
            met += v in ("better", "tie")
            cells.append(f"{v} ({cell(s.get(key))} vs {cell(g.get(key))})")
        for key, op, limit, _ in THRESHOLDS:
            m = s.get(key)
            ok = m is not None and (m[0] < limit if op == "<" else m[0] >= limit)
            met += ok
            cells.append(f"{'yes' if ok else '**no**'} ({cell(m)})")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {met} of {len(titles)} |")
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
    if any(RECOMMENDED in r["summary"] for r in results.values()):
        print(goal_table(results) + "\n")
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
