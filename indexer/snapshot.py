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

`SnapshotStore` keeps them in a local directory or at any fsspec URL (s3://bucket/prefix,
gs://..., with the filesystem's package installed): a remote snapshot is written to a
local staging file first, checksummed as above, then uploaded in one PUT, which object
stores make visible whole or not at all; it is downloaded to staging to be read. So a
replica with an empty disk restores its shard from the bucket and replays only the tail.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import socket
import struct
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from feedret.processes import pid_alive

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
        finally:
            view.release()
    # Each section is mapped from the file, read-only, not copied: a restore copies what it
    # keeps into the index, so a shard's peak while restoring is the index plus the pages
    # being read, not twice the snapshot (10 GB of float32 rows for a 10M-post shard rescored
    # from disk). The file is never rewritten in place (a new snapshot is a new file), and a
    # mapping outlives an unlink or a prune.
    sections = {}
    for s in header["sections"]:
        shape = tuple(s["shape"])
        if not s["nbytes"]:
            sections[s["name"]] = np.empty(shape, np.dtype(s["dtype"]))
            continue
        sections[s["name"]] = np.memmap(path, dtype=np.dtype(s["dtype"]), mode="r", offset=data + s["offset"], shape=shape)
    return header, sections


@dataclass(frozen=True)
class StoredSnapshot:
    """One snapshot in a store: where it is, the offset it resumes from, when it was stored."""

    location: str  # a path in the store's filesystem (a local path, or bucket/key)
    offset: int
    modified: float | None  # unix seconds; None when the store does not say

    @property
    def name(self) -> str:
        return self.location.rstrip("/").rsplit("/", 1)[-1]


class SnapshotStore:
    """A shard's snapshots in a local directory or at an fsspec URL (S3 through s3fs).

    Credentials and endpoint come from the filesystem's own settings; for S3 the usual
    AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an
    S3-compatible server) or the pod's IAM role. `staging_dir` holds a remote snapshot
    while it is written or read (empty: the system's temporary directory): it needs room
    for one snapshot.
    """

    def __init__(self, location: str, staging_dir: str = "") -> None:
        self.url = location
        self.fs, self.root = fsspec.core.url_to_fs(location)
        self.local = isinstance(self.fs, LocalFileSystem)
        # One directory per host and process: replicas of a shard on one host stage the same
        # names, and pods sharing a staging volume are all pid 1.
        self.staging_root = Path(staging_dir or tempfile.gettempdir())
        self.staging = self.staging_root / f"feedret-snapshots-{socket.gethostname()}-{os.getpid()}"

    def __repr__(self) -> str:
        return f"SnapshotStore({self.url!r})"

    def _key(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def entries(self, shard_id: int) -> list[StoredSnapshot]:
        """This shard's snapshots, newest (highest applied offset) first."""
        if self.local:
            return [StoredSnapshot(str(p), int(_NAME.match(p.name).group(2)), _mtime(p))
                    for p in list_snapshots(Path(self.root), shard_id)]
        self.fs.invalidate_cache(self.root)  # other replicas write and prune here too
        try:
            listed = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        found = []
        for info in listed:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            m = _NAME.match(name)
            if m and int(m.group(1)) == shard_id:
                found.append(StoredSnapshot(info["name"], int(m.group(2)), _modified(info)))
        return sorted(found, key=lambda e: e.offset, reverse=True)

    def write(self, shard_id: int, offset: int, header: dict, sections: dict[str, np.ndarray]) -> tuple[str, int]:
        """Store one snapshot; its location and size in bytes."""
        if self.local:
            path = write_snapshot(Path(self.root), shard_id, offset, header, sections)
            return str(path), path.stat().st_size
        staged = write_snapshot(self.staging, shard_id, offset, header, sections)
        try:
            key = self._key(staged.name)
            self.fs.put_file(str(staged), key)
            return key, staged.stat().st_size
        finally:
            staged.unlink(missing_ok=True)

    def read(self, location: str) -> tuple[dict, dict[str, np.ndarray]]:
        """Header and sections of an intact snapshot; CorruptSnapshot, or OSError when it is gone."""
        if self.local:
            return read_snapshot(Path(location))
        self.staging.mkdir(parents=True, exist_ok=True)
        staged = self.staging / f".{location.rsplit('/', 1)[-1]}.tmp{os.getpid()}"
        try:
            self.fs.get_file(location, str(staged))
            return read_snapshot(staged)
        finally:
            staged.unlink(missing_ok=True)

    def prune(self, shard_id: int, keep: int, max_age_s: float = 0.0) -> list[str]:
        """Delete all but the newest `keep` of this shard's snapshots, and all but the newest of
        those older than max_age_s (0: no age limit), which no replica would restore anyway."""
        now = time.time()
        removed = []
        for i, entry in enumerate(self.entries(shard_id)):
            too_old = max_age_s > 0 and entry.modified is not None and now - entry.modified > max_age_s
            if i >= max(keep, 1) or (i > 0 and too_old):
                try:
                    self.fs.rm_file(entry.location)
                except FileNotFoundError:
                    pass  # another replica of this shard pruned it first
                removed.append(entry.location)
        return removed

    def remove_temporaries(self, shard_id: int) -> list[Path]:
        """Temporary files a crash left mid-write: in the directory, or for a remote store the
        staging files of this process (a restarted container has the same pid) and of
        processes no longer running. `shard_id` picks the files in a local directory."""
        if self.local:
            return remove_temporaries(Path(self.root), shard_id)
        removed = []
        # Only this host's: another host's pids mean nothing here.
        for directory in self.staging_root.glob(f"feedret-snapshots-{socket.gethostname()}-*"):
            pid = directory.name.rsplit("-", 1)[-1]
            if directory != self.staging and (not pid.isdigit() or pid_alive(int(pid))):
                continue
            for path in directory.iterdir():  # one process stages one shard's files only
                path.unlink(missing_ok=True)
                removed.append(path)
            if directory != self.staging:
                try:
                    directory.rmdir()
                except OSError:
                    pass
        return removed


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _modified(info: dict) -> float | None:
    """A listing entry's modification time: S3 says LastModified, local and others mtime."""
    value = info.get("LastModified", info.get("mtime", info.get("updated")))
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None
