"""Model libraries that the test environment cannot import the normal way.

With the pinned CPU torch (2.13.0), PyPI's torchvision 0.28 is built against CUDA torch:
its package ``__init__`` loads a C extension that fails ("operator torchvision::nms does
not exist"), and every wheel that would import pulls torch 2.14.1 with CUDA (5.5 GB).
The model definitions themselves are pure PyTorch. So the README's test command installs
torchvision, timm and timm-3d *without dependencies* into ``<venv>/lib-sources`` (off
``sys.path``: nothing else sees them), and `use_library_sources` makes them importable:
timm and timm-3d as they are, torchvision as a package whose ``__init__`` is skipped, so
``torchvision.models.video`` and ``torchvision.ops.misc`` load from their own files and the
extension is never touched. The models built are the libraries' own code, seeded.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

SOURCES = Path(sys.prefix) / "lib-sources"
INSTALL = (
    ".venv/bin/pip install --upgrade --no-deps --target .venv/lib-sources "
    "torchvision==0.28.0 timm==1.0.31 timm-3d==1.0.1"
)


def _working_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or the CUDA build that fails at import
        sys.modules.pop("torchvision", None)
        return False
    return True


def use_library_sources() -> bool:
    """Make torchvision's models, timm and timm-3d importable; False when not installed."""
    if not (SOURCES / "timm_3d").is_dir() or not (SOURCES / "torchvision").is_dir():
        return False
    if str(SOURCES) not in sys.path:
        sys.path.append(str(SOURCES))  # last: never shadows an installed package
    if "torchvision" not in sys.modules and not _working_torchvision():
        root = str(SOURCES / "torchvision")
        pkg = types.ModuleType("torchvision")
        pkg.__path__ = [root]
        pkg.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
        pkg.__spec__.submodule_search_locations = [root]
        sys.modules["torchvision"] = pkg
    return True
