"""cfp_onnx: Class Feature Pyramids for any ONNX video (3D) CNN.

Entry points (imported on first use, so ``import cfp_onnx.exporters`` stays light):

* ``explain(model, clip)`` -> ``Pyramid``; ``Explainer`` to analyse a model once and
  explain many clips.
* ``load_model``, ``ModelInput`` (layout and preprocessing, once) and its ``clip`` (the one
  way a clip comes in), ``explain_clip`` -> ``Explanation`` (pyramid, every kernel's map,
  shuffle test, class tube, faithfulness check), ``render_report`` (HTML string) and
  ``write_outputs`` (files).
* ``check_faithfulness(explainer, clip, pyramid)`` -> ``Faithfulness``: the depth-0
  kernels' ablation against random kernels of the same layers.
* ``explain_to`` / ``compare_to``: what ``cfp explain`` / ``cfp compare`` do.
* Options: ``PyramidOptions``, ``ClipOptions``, ``ViewOptions``. Errors: ``CfpError`` and
  its subclasses (``ModelError``, ``UnsupportedOpError``, ``ClipError``, ``OptionError``,
  ``OutputError``, ``ResourceError``): a user's problem, with a message saying what to do.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Explainer": ("cfp_onnx.api", "Explainer"),
    "explain": ("cfp_onnx.api", "explain"),
    "Pyramid": ("cfp_onnx.pyramid", "Pyramid"),
    "class_tube": ("cfp_onnx.classtube", "class_tube"),
    "Faithfulness": ("cfp_onnx.faithfulness", "Faithfulness"),
    "check_faithfulness": ("cfp_onnx.faithfulness", "check"),
    "load_model": ("cfp_onnx.loading", "load_model"),
    "ModelInput": ("cfp_onnx.modelinput", "ModelInput"),
    "load_clip": ("cfp_onnx.video", "load_clip"),
    "Explanation": ("cfp_onnx.explanation", "Explanation"),
    "explain_clip": ("cfp_onnx.explanation", "explain"),
    "render_report": ("cfp_onnx.report", "render"),
    "write_outputs": ("cfp_onnx.outputs", "write"),
    "explain_to": ("cfp_onnx.commands", "explain_to"),
    "compare_to": ("cfp_onnx.commands", "compare_to"),
    "PyramidOptions": ("cfp_onnx.options", "PyramidOptions"),
    "ClipOptions": ("cfp_onnx.options", "ClipOptions"),
    "ViewOptions": ("cfp_onnx.options", "ViewOptions"),
    **{
        name: ("cfp_onnx.errors", name)
        for name in (
            "CfpError",
            "ModelError",
            "UnsupportedOpError",
            "ClipError",
            "OptionError",
            "OutputError",
            "ResourceError",
        )
    },
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'cfp_onnx' has no attribute {name!r}")
