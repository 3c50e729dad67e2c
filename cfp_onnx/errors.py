"""Errors a user can act on. The CLI prints them as one line and exits 2.

Anything that is not a ``CfpError`` is a bug in cfp_onnx and keeps its traceback.
"""

from __future__ import annotations


class CfpError(Exception):
    """Base class: a problem with the user's model, clip or options."""


class ModelError(CfpError):
    """The model file is unreadable, malformed, or lacks what the method needs."""


class UnsupportedOpError(ModelError):
    """An op with no channel-provenance rule lies on a path the pyramid needs."""


class ClipError(CfpError):
    """The clip is unreadable or does not fit the model's input."""


class OptionError(CfpError):
    """An option is out of range or inconsistent with the model."""


class OutputError(CfpError):
    """The output location cannot be written, or exists without --overwrite."""


class ResourceError(OptionError):
    """The run would need more memory than --max-memory allows (refused before running)."""
