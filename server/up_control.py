"""How `feedret rollout` asks a running `feedret up` to start, promote or abort a generation.

`feedret up` owns its processes, so the steps run there. It writes `<workdir>/up.json`
(`UpState`: its pid, addresses and generations) when it is up and after each change,
and holds a lock on `<workdir>/up.lock` while it runs.
A rollout command writes its `RolloutRequest` to `<workdir>/rollout-request.json` (one
rename), sends `feedret up` SIGUSR1, and waits until up.json carries the reply to its
request's id. Files and a signal, not a socket: nothing more to secure, and the state
stays readable by `rollout status` and by people.

On Kubernetes the same steps are the manifests' (docs/kubernetes.md): nothing here is used.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


STATE_FILE = "up.json"
REQUEST_FILE = "rollout-request.json"
LOCK_FILE = "up.lock"  # held by the running `feedret up`
SEND_LOCK_FILE = "rollout.lock"  # held by the rollout command talking to it


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    action: Literal["start", "promote", "abort"]
    model_dir: str = ""
    model_version: str = ""
    shards: int = 0  # start: 0 keeps the serving generation's count
    index_factory: str = ""  # start: the shards' FEEDRET_INDEX_FACTORY; "": the stack's
    posts_file: str = ""  # start: post events to embed before its consumer starts (feedret backfill)
    grace_s: float = 10.0  # promote: how long the old generation still answers queries of its model


class RolloutReply(BaseModel):
    id: str
    ok: bool
    message: str


class GenerationState(BaseModel):
    name: str
    role: Literal["serving", "next", "retiring"]
    model_version: str  # "": the stack's own model
    shard_addresses: str
    member_address: str
    vectors_topic: str
    consumer_group: str
    backfill: str = ""  # its bulk backfill: "" (none), "embedding FILE", "done: ...", "FAILED ..."


class UpState(BaseModel):
    pid: int
    root_address: str
    bootstrap_servers: str
    generations: list[GenerationState]
    reply: RolloutReply | None = None  # to the last request

    def generation(self, role: str) -> GenerationState | None:
        return next((g for g in self.generations if g.role == role), None)


class NotRunning(Exception):
    """No `feedret up` runs with this workdir (or it stopped without saying so)."""


@dataclass(frozen=True)
class Unreadable:
    """A request file `feedret up` could not read: answered with this id (when it had one) and reason."""

    id: str
    reason: str


def hold_running_lock(workdir: Path) -> IO[bytes]:
    """`feedret up`'s side: an exclusive lock on <workdir>/up.lock, held while the returned file
    stays open. Its holder is what "running" means: a pid in a state file left by a killed
    `feedret up` may belong to another process by now, which SIGUSR1 would kill."""
    f = open(workdir / LOCK_FILE, "ab")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def write_state(workdir: Path, state: UpState) -> None:
    _write(workdir / STATE_FILE, state.model_dump_json(indent=1))


def clear_state(workdir: Path) -> None:
    (workdir / STATE_FILE).unlink(missing_ok=True)


def _running(workdir: Path) -> bool:
    try:
        with open(workdir / LOCK_FILE, "ab") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def read_state(workdir: Path) -> UpState:
    """The state of the `feedret up` running with this workdir; NotRunning when none is."""
    path = workdir / STATE_FILE
    try:
        state = UpState.model_validate_json(path.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        raise NotRunning(f"no `feedret up` is running with workdir {workdir} (no {path})") from None
    except (OSError, ValidationError) as exc:
        raise NotRunning(f"cannot read {path}: {exc}") from None
    if not _running(workdir):
        raise NotRunning(f"the `feedret up` that wrote {path} (pid {state.pid}) is not running")
    return state


def send(workdir: Path, request: RolloutRequest, timeout: float) -> RolloutReply:
    """Hand `request` to the running `feedret up` and wait for its reply (TimeoutError after `timeout`).

    One command at a time per workdir (a lock held until the reply): `feedret up` keeps
    one request file and the last reply only."""
    with open(workdir / SEND_LOCK_FILE, "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = read_state(workdir)
        _write(workdir / REQUEST_FILE, request.model_dump_json())
        try:
            os.kill(state.pid, signal.SIGUSR1)
        except (ProcessLookupError, PermissionError) as exc:
            raise NotRunning(f"cannot signal `feedret up` (pid {state.pid}): {exc}") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reply = read_state(workdir).reply
            except NotRunning:
                if not _running(workdir):
                    raise
                reply = None  # mid-rewrite
            if reply is not None and reply.id == request.id:
                return reply
            time.sleep(0.2)
    raise TimeoutError(f"`feedret up` (pid {state.pid}) did not answer within {timeout:.0f} s; see its terminal")


def take_request(workdir: Path) -> RolloutRequest | Unreadable | None:
    """The waiting request, removed (`feedret up`'s side); Unreadable saying why when it cannot be read."""
    path = workdir / REQUEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Unreadable("", f"cannot read the rollout request: {exc}")
    path.unlink(missing_ok=True)
    text = raw.decode("utf-8", errors="replace")
    try:
        return RolloutRequest.model_validate_json(text)
    except ValidationError as exc:
        try:
            rid = json.loads(text).get("id", "")
        except (ValueError, AttributeError):
            rid = ""
        return Unreadable(rid if isinstance(rid, str) else "", f"unreadable rollout request: {exc.errors()[0]['msg']}")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
