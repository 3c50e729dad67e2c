"""Markdown tables from ``benchmarks/results/quality.json`` (written by quality.py).

python benchmarks/quality_report.py
"""

from __future__ import annotations

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


def report(results: dict[str, Any]) -> None:
    for name, r in results.items():
        acc = r["summary"].get("_meta", {}).get("correct")
        print(model_table(name, r["summary"]))
        print(f"\n{r['clips']} clips; accuracy on them {cell(acc)}; {r['seconds']} s\n")


if __name__ == "__main__":
    report(json.loads(RESULTS.read_text()))
