"""How much of the class mean the pyramid tube should take away: ``P_c - lam * mean_k P_k``.

The pyramid tube (README) is ``lam = 1``. A smaller ``lam`` keeps more of the evidence all
classes share (localisation) and less of what tells this class from the others
(specificity). This measures both for several ``lam``, and the contrast against only the
three most likely other classes (``top3``), on the quality benchmark's clips, with the
recommended top-5 paper-head pyramid:

    python benchmarks/quality_contrast.py --models i3d r2plus1d --clips 18
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality as q

from cfp_onnx import classtube

LAMS = {"lam1": 1.0, "lam0.9": 0.9, "lam0.75": 0.75, "lam0.5": 0.5, "lam0.25": 0.25}
KINDS = (*LAMS, "top3")
SHOWN = ("mask_auc", "insertion", "deletion", "pointing", "specificity", "sanity_spearman_all")


def class_tubes(
    ex: Any, pyrs: list[Any], run: Any, size: Any, kind: str, cache: dict[str, Any]
) -> list[np.ndarray]:
    """`quality.class_tubes` with this script's kinds: every label's ``P`` from one run."""
    if kind not in KINDS:
        return base(ex, pyrs, run, size, kind, cache)
    if "_own" not in cache:
        cache["_own"] = classtube.pyramid_tubes(ex, run, pyrs, size)
    own = cache["_own"]
    if kind not in cache:
        if kind in LAMS:
            cache[kind] = list(own - LAMS[kind] * own.mean(axis=0))
        else:  # the three other labels with the highest logits
            likeliest = np.argsort(-run.logits[[p.label for p in pyrs]], kind="stable").tolist()
            out = []
            for i in range(len(pyrs)):
                rest = [j for j in likeliest if j != i][:3]
                out.append(own[i] - own[rest].mean(axis=0))
            cache[kind] = out
    return cache[kind]


base = q.class_tubes
q.class_tubes = class_tubes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["i3d", "r2plus1d"])
    ap.add_argument("--clips", type=int, default=18)
    args = ap.parse_args()
    for name in args.models:
        per = q.bench_model(q.MODELS / f"{name}.onnx", args.clips, KINDS, 0,
                            [("weights", "top5")], KINDS)  # fmt: skip
        print(name)
        for setting, m in q.summarise(per).items():
            cells = [f"{k} {m[k][0]:.2f} [{m[k][1]:.2f}, {m[k][2]:.2f}]" for k in SHOWN if k in m]
            print(f"  {setting:24s} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
