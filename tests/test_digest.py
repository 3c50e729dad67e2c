"""Model digests remembered by file identity: never a stale hash, never a failed command."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cfp_onnx import digest


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CFP_NO_DIGEST_CACHE", raising=False)
    return tmp_path / "cache" / "cfp_onnx" / "digests"


def _file(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "model.onnx"
    p.write_bytes(data)
    return p


def test_digest_is_the_files_sha256(tmp_path: Path, cache: Path) -> None:
    data = os.urandom(5 << 20)
    p = _file(tmp_path, data)
    assert digest.file_digest(p).result() == hashlib.sha256(data).hexdigest()


def test_a_just_written_file_is_not_remembered(tmp_path: Path, cache: Path) -> None:
    digest.digest(_file(tmp_path, b"abc"))
    assert not cache.exists() or not list(cache.iterdir())


def test_remembered_then_recomputed_after_a_same_size_edit_with_mtime_restored(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digest, "RACY_S", -1e9)  # as if the file were old
    p = _file(tmp_path, b"a" * 1000)
    first = digest.digest(p)
    assert len(list(cache.glob("*.json"))) == 1
    calls: list[object] = []
    real = digest.sha256
    monkeypatch.setattr(digest, "sha256", lambda path: calls.append(path) or real(path))
    assert digest.digest(p) == first and calls == []  # remembered: not read again
    st = p.stat()
    p.write_bytes(b"b" * 1000)  # same size, same inode, mtime put back: only the bytes tell
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert p.stat().st_ino == st.st_ino
    assert digest.digest(p) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert len(calls) == 1


def test_a_hard_link_made_meanwhile_does_not_forget_it(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cfp links weight files next to the model for onnxruntime: that changes ctime only."""
    monkeypatch.setattr(digest, "RACY_S", -1e9)
    p = _file(tmp_path, os.urandom(1 << 20))
    digest.digest(p)
    os.link(p, tmp_path / "linked")
    os.unlink(tmp_path / "linked")
    monkeypatch.setattr(digest, "sha256", lambda path: pytest.fail("hashed again"))
    assert digest.digest(p) == hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_damaged_or_unwritable_cache_only_means_hashing(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digest, "RACY_S", -1e9)
    p = _file(tmp_path, b"model bytes")
    want = hashlib.sha256(b"model bytes").hexdigest()
    assert digest.digest(p) == want
    for entry in cache.glob("*.json"):
        entry.write_text("{not json")
    assert digest.digest(p) == want
    for entry in cache.glob("*.json"):
        entry.write_text('{"key": "another file", "sha256": "0"}')
    assert digest.digest(p) == want
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    assert digest.digest(p) == want


def test_the_cache_can_be_turned_off(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digest, "RACY_S", -1e9)
    monkeypatch.setenv("CFP_NO_DIGEST_CACHE", "1")
    digest.digest(_file(tmp_path, b"x"))
    assert not cache.exists()
