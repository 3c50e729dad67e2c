"""Shared fixtures: a seeded rng, and tiny models exported once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# cfp remembers model digests in the user's cache: tests (and the commands they start) use their own
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="cfp-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """name, dynamo -> (torch model, onnx path); exported once per session."""
    from tests import nets

    cache: dict[tuple[str, bool], tuple[object, Path]] = {}
    root = tmp_path_factory.mktemp("models")

    def get(name: str, dynamo: bool = False):
        key = (name, dynamo)
        if key not in cache:
            model = nets.build(name)
            path = root / f"{name}{'_dynamo' if dynamo else ''}.onnx"
            nets.export(model, str(path), dynamo=dynamo)
            cache[key] = (model, path)
        return cache[key]

    return get
