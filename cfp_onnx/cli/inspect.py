"""Show what cfp sees in a model (batch 1): input, classes, layers, merges, unsupported ops.

Exits 0 when every op on the pyramid's paths is understood, 2 when some are not.
"""

from __future__ import annotations

import argparse

from cfp_onnx.inspection import inspect_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--output", metavar="NAME", help="graph output holding the logits, if several")


def run(args: argparse.Namespace) -> int:
    report = inspect_model(args.model, output=args.output)
    print("\n".join(report.lines()))
    return 2 if report.unsupported else 0
