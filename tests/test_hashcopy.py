"""mastering.hashcopy: copies on worker threads that return the size and SHA-256 of what they
wrote; sources checked against their scan stamps while a thread copies them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from threading import Event

import pytest

from mastering import content, hashcopy, isosource
from mastering.content import Range, SourceChanged


def _stamp(path: Path) -> isosource.Stamp:
    return isosource.stat_stamp(path.stat())


def test_written_proof_is_the_sha256_of_the_bytes_on_disk(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * hashcopy.BLOCK + 17))
    parts = [b"HEAD", Range(str(src), 5, src.stat().st_size - 5, _stamp(src))]
    made: list[str] = []
    got = hashcopy.write_hashed(parts, str(tmp_path / "out"), sync=True,
                                buf=bytearray(hashcopy.BLOCK), created=lambda: made.append(1))
    data = (tmp_path / "out").read_bytes()
    assert data == b"HEAD" + src.read_bytes()[5:] and made == [1]
    assert got == hashcopy.Written(len(data), hashlib.sha256(data).hexdigest())


def test_never_writes_over_an_existing_name(tmp_path: Path) -> None:
    (tmp_path / "out").write_bytes(b"the owner's")
    made: list[int] = []
    with pytest.raises(FileExistsError):
        hashcopy.write_hashed([b"x"], str(tmp_path / "out"), sync=False, buf=bytearray(16),
                              created=lambda: made.append(1))
    assert made == [] and (tmp_path / "out").read_bytes() == b"the owner's"


def test_a_source_changed_while_a_thread_copies_it_is_an_error_naming_it(
        tmp_path: Path, monkeypatch) -> None:
    """The second of two sources grows after its first kernel chunk was copied (on a pool
    thread): the copy fails naming that source; the other file is proven as written."""
    monkeypatch.setattr(content, "KERNEL_CHUNK", 1 << 16)
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    good.write_bytes(os.urandom(1 << 18))
    bad.write_bytes(os.urandom(1 << 18))
    real = content._kernel_copy

    def copy(src: int, dst: int, count: int, offset: int, at: int) -> int:
        n = real(src, dst, count, offset, at)
        if os.fstat(src).st_ino == bad.stat().st_ino and offset == 0:
            with open(bad, "ab") as fh:  # another program appends to it meanwhile
                fh.write(b"more")
        return n

    monkeypatch.setattr(content, "_kernel_copy", copy)
    pool = hashcopy.Pool(2, sync=False)
    made: list[str] = []
    try:
        jobs = [pool.submit([Range(str(p), 0, 1 << 18, _stamp(p))], str(tmp_path / f"o{i}"),
                            lambda i=i: made.append(f"o{i}")) for i, p in enumerate((good, bad))]
        assert jobs[0].result().sha256 == hashlib.sha256(good.read_bytes()).hexdigest()
        with pytest.raises(SourceChanged, match=str(bad)):
            jobs[1].result()
    finally:
        pool.close()
    assert sorted(made) == ["o0", "o1"]  # both created: the caller removes them as its own


def test_cancel_stops_a_copy_at_its_next_block(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(content, "KERNEL_CHUNK", 1 << 16)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1 << 20))
    cancel = Event()
    real = content._kernel_copy

    def copy(*args: int) -> int:
        cancel.set()
        return real(*args)

    monkeypatch.setattr(content, "_kernel_copy", copy)
    pool = hashcopy.Pool(2, sync=False, cancel=cancel)
    try:
        job = pool.submit([Range(str(src), 0, 1 << 20, _stamp(src))], str(tmp_path / "o"),
                          lambda: None)
        with pytest.raises(hashcopy.Stopped):
            job.result()
    finally:
        pool.close()
    assert (tmp_path / "o").stat().st_size < 1 << 20
