"""cfp_onnx: Class Feature Pyramids for any ONNX video (3D) CNN.

``cfp_onnx.explain(model, clip)`` and ``cfp_onnx.Explainer`` are the entry points; they
are imported on first use, so ``import cfp_onnx.exporters`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Explainer", "Pyramid", "class_tube", "explain"]


def __getattr__(name: str) -> Any:
    if name in ("Explainer", "explain"):
        from cfp_onnx import api

        return getattr(api, name)
    if name == "class_tube":
        from cfp_onnx.classtube import class_tube

        return class_tube
    if name == "Pyramid":
        from cfp_onnx.pyramid import Pyramid

        return Pyramid
    raise AttributeError(f"module 'cfp_onnx' has no attribute {name!r}")
