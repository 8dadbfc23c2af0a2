"""Shard snapshots on disk: one self-checking file per snapshot, written atomically.

Layout of `shard-<id>-<applied offset, 20 digits>.snap`:

    MAGIC | header length (u64 LE) | header (JSON) | sections (raw arrays) | sha256 of all before

The header names each section's dtype, shape and offset, plus what the shard
needs to resume (applied offset, widths, index configuration, counters). A
snapshot is written to a hidden temporary file, fsynced, then renamed into
place, so a crash mid-write leaves a temporary file (ignored and removed),
never a half-written snapshot under a real name. A file whose checksum does
not match (torn by the disk, truncated, bit-flipped) is refused with
CorruptSnapshot, and the loader moves on to the next-newest.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
from pathlib import Path

import numpy as np

MAGIC = b"FEEDRET-SNAPSHOT-1\n"
_DIGEST = 32
_NAME = re.compile(r"^shard-(\d+)-(\d{20})\.snap$")


class CorruptSnapshot(Exception):
    """The file is not a complete, intact snapshot."""


def snapshot_path(directory: Path, shard_id: int, offset: int) -> Path:
    return Path(directory) / f"shard-{shard_id}-{offset:020d}.snap"


def list_snapshots(directory: Path, shard_id: int) -> list[Path]:
    """This shard's snapshots, newest (highest applied offset) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        m = _NAME.match(path.name)
        if m and int(m.group(1)) == shard_id:
            found.append((int(m.group(2)), path))
    return [p for _, p in sorted(found, reverse=True)]


def remove_temporaries(directory: Path, shard_id: int) -> list[Path]:
    """Temporary files a crash left behind mid-write."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for path in directory.glob(f".shard-{shard_id}-*.snap.tmp*"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_snapshot(directory: Path, shard_id: int, offset: int, header: dict, sections: dict[str, np.ndarray]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.ascontiguousarray(a) for name, a in sections.items()}
    layout, position = [], 0
    for name, a in arrays.items():
        layout.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": position, "nbytes": a.nbytes})
        position += a.nbytes
    head = json.dumps({**header, "shard_id": shard_id, "applied_offset": offset, "sections": layout}).encode()
    final = snapshot_path(directory, shard_id, offset)
    tmp = directory / f".{final.name}.tmp{os.getpid()}"
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for chunk in (MAGIC, struct.pack("<Q", len(head)), head):
                digest.update(chunk)
                f.write(chunk)
            for a in arrays.values():
                if a.nbytes:
                    view = memoryview(a.reshape(-1).view(np.uint8))
                    digest.update(view)
                    f.write(view)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return final


def read_snapshot(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Header and sections of an intact snapshot; CorruptSnapshot otherwise."""
    path = Path(path)
    size = path.stat().st_size
    if size < len(MAGIC) + 8 + _DIGEST:
        raise CorruptSnapshot(f"{path.name}: {size} bytes, too short")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            if view[: len(MAGIC)] != MAGIC:
                raise CorruptSnapshot(f"{path.name}: not a feedret snapshot")
            if hashlib.sha256(view[: size - _DIGEST]).digest() != view[size - _DIGEST :]:
                raise CorruptSnapshot(f"{path.name}: checksum mismatch (torn or corrupt)")
            (head_len,) = struct.unpack("<Q", view[len(MAGIC) : len(MAGIC) + 8])
            start = len(MAGIC) + 8
            header = json.loads(bytes(view[start : start + head_len]))
            data = start + head_len
            sections = {}
            for s in header["sections"]:
                dtype = np.dtype(s["dtype"])
                count = int(np.prod(s["shape"], dtype=np.int64))
                a = np.frombuffer(mm, dtype=dtype, count=count, offset=data + s["offset"])
                sections[s["name"]] = a.reshape(s["shape"]).copy()
                del a
        finally:
            view.release()
    return header, sections


def prune(directory: Path, shard_id: int, keep: int) -> list[Path]:
    """Delete all but the newest `keep` snapshots of this shard."""
    removed = []
    for path in list_snapshots(directory, shard_id)[max(keep, 1) :]:
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
