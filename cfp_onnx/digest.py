"""sha256 of model files, remembered while the file is unchanged.

Every output folder records its model's sha256 (and ``cfp batch`` checks it on resume).
Hashing a 190 MB model costs ~0.16 s of CPU per command, on a machine where a whole
``cfp explain`` is about a second. A user explains many clips with one model, so the
digest is kept in ``$XDG_CACHE_HOME/cfp_onnx/digests`` (default ``~/.cache``) under the
file's identity, as git's index and make do: its resolved path, device, inode, size and
mtime (nanoseconds), plus a hash of 16 blocks of 64 KiB spread over the file, so that
a same-size file written in place with its mtime put back still misses. (ctime is not
used: cfp itself hard-links weight files, which changes it.) A file modified within two
seconds of being hashed is not remembered (the "racily clean" case: a later edit in the
same timestamp tick would look unchanged). Any failure to read or write the cache only
means hashing. ``CFP_NO_DIGEST_CACHE=1`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

RACY_S = 2.0
"""A file modified this recently when hashed is not remembered."""

SAMPLES, SAMPLE = 16, 1 << 16


def file_digest(path: str | os.PathLike[str]) -> Future[str]:
    """sha256 of a file, on a thread (hashlib releases the GIL) while work goes on."""
    return _pool().submit(digest, path)


def digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file: remembered, or computed (and remembered when it is safe to)."""
    before = _identity(path)
    entry = _entry(before[0]) if before is not None else None
    if entry is not None and before is not None:
        try:
            doc = json.loads(entry.read_text("utf-8"))
            if doc.get("key") == before[0] and isinstance(doc.get("sha256"), str):
                return str(doc["sha256"])
        except (OSError, ValueError):
            pass
    started = time.time()
    value = sha256(path)
    after = _identity(path)  # unchanged while it was hashed, and not modified just before
    if entry is not None and before is not None and after is not None and after[0] == before[0]:
        if started - after[1] > RACY_S:
            _remember(entry, {"key": before[0], "sha256": value})
    return value


def sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path | None:
    if os.environ.get("CFP_NO_DIGEST_CACHE", "") not in ("", "0"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cfp_onnx" / "digests"


def _identity(path: str | os.PathLike[str]) -> tuple[str, float] | None:
    """The cache key of a file, and its mtime; None when it cannot be read."""
    try:
        real = os.path.realpath(path)
        with open(real, "rb") as f:
            st = os.fstat(f.fileno())
            h = hashlib.sha256()
            step = max(SAMPLE, st.st_size // SAMPLES)
            for at in range(0, st.st_size, step):
                h.update(os.pread(f.fileno(), SAMPLE, at))
            h.update(os.pread(f.fileno(), SAMPLE, max(0, st.st_size - SAMPLE)))
    except OSError:
        return None
    stamp = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    return f"{real}\0{stamp}:{h.hexdigest()[:32]}", st.st_mtime


def _entry(key: str) -> Path | None:
    folder = cache_dir()
    if folder is None:
        return None
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _remember(entry: Path, doc: dict[str, str]) -> None:
    """Write the entry whole or not at all (a rename), never failing the command."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".digest.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f)
            os.replace(tmp, entry)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfp-hash")
