"""cfp_onnx: Class Feature Pyramids for any ONNX video (3D) CNN."""

from __future__ import annotations

__version__ = "0.1.0"
