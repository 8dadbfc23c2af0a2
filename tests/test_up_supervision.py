"""`feedret up`'s supervision: a crash-looping server is given up, never the broker or the rest.

The policy (Supervisor) and Stack.supervise are tested with fakes; one test runs a real
`feedret up`, kills a shard until it is given up, and checks that everything else still
serves, that a relative --workdir is the caller's, and that nothing in it was deleted.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from feedret.clients.client import FeedretClient
from feedret.routing import shard_of
from feedret.server.launcher import Stack, StackConfig, Supervisor

from conftest import SAMPLE_POSTS, free_port_block, post_line, wait_for

# ---------------------------------------------------------------- the policy


def test_restarts_until_more_than_max_restarts_exits_within_the_window():
    sup = Supervisor(max_restarts=3, window_s=10.0)
    assert [sup.on_exit("shard-1", t).action for t in (0.0, 1.0, 2.0)] == ["restart"] * 3
    verdict = sup.on_exit("shard-1", 3.0)
    assert (verdict.action, verdict.exits) == ("give_up", 4)
    assert not sup.watches("shard-1") and sup.given_up == {"shard-1"}
    assert sup.watches("shard-0") and sup.watches("broker")


def test_exits_spread_wider_than_the_window_are_restarted_forever():
    sup = Supervisor(max_restarts=2, window_s=10.0)
    verdicts = [sup.on_exit("root", t) for t in range(0, 200, 6)]  # at most 2 in any 10 s
    assert {v.action for v in verdicts} == {"restart"}
    assert max(v.exits for v in verdicts) == 2


def test_each_process_is_counted_on_its_own():
    sup = Supervisor(max_restarts=1, window_s=60.0)
    assert sup.on_exit("shard-0", 0.0).action == "restart"
    assert sup.on_exit("shard-1", 0.5).action == "restart"
    assert sup.on_exit("consumer", 1.0).action == "restart"
    assert sup.on_exit("shard-1", 1.5).action == "give_up"
    assert sup.given_up == {"shard-1"}


def test_the_embedded_broker_is_fatal_at_once_and_never_given_up():
    sup = Supervisor(max_restarts=5, window_s=60.0, fatal=("broker",))
    assert sup.on_exit("broker", 0.0).action == "fatal"
    assert sup.watches("broker")
    # Without an embedded broker nothing is fatal: a process named broker is just a process.
    assert Supervisor(fatal=()).on_exit("broker", 0.0).action == "restart"


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        Supervisor(max_restarts=-1)
    with pytest.raises(ValueError):
        Supervisor(window_s=0)


# ---------------------------------------------------------------- Stack.supervise, with fake processes


class FakeProc:
    """What supervise reads of a subprocess.Popen: poll() and returncode."""

    def __init__(self, code: int | None = None) -> None:
        self.returncode = code
        self.pid = 0

    def poll(self) -> int | None:
        return self.returncode

    def terminate(self) -> None:
        self.returncode = -15

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


class FakeStack(Stack):
    """A Stack whose start_role starts a fake process that crashes at once when told to."""

    def __init__(self, config: StackConfig, crashing: set[str]) -> None:
        super().__init__(config)
        self.crashing = crashing
        self.started: list[str] = []
        for name in ["broker", "member", "consumer", *config.shard_names(), "root"]:
            self.procs[name] = FakeProc()

    def start_role(self, name: str) -> FakeProc:  # type: ignore[override]
        self.started.append(name)
        self.procs[name] = FakeProc(1 if name in self.crashing else None)
        return self.procs[name]


def test_a_crash_looping_shard_is_given_up_and_nothing_else_is_touched(tmp_path: Path):
    stack = FakeStack(StackConfig(workdir=tmp_path, max_restarts=5, restart_window_s=60.0), crashing={"shard-1"})
    stack.log_dir.mkdir(parents=True)
    others = {name: proc for name, proc in stack.procs.items() if name != "shard-1"}
    stack.procs["shard-1"].returncode = 1
    actions = []
    for t in range(20):  # one supervision pass a second; the shard crashes every time it starts
        actions += [(e.process, e.action, e.exits) for e in stack.supervise(now=float(t))]
    assert actions == [("shard-1", "restart", n) for n in range(1, 6)] + [("shard-1", "give_up", 6)]
    assert stack.started == ["shard-1"] * 5
    assert all(stack.procs[name] is proc and proc.poll() is None for name, proc in others.items())
    assert stack.supervisor.given_up == {"shard-1"}
    # Said at the end of the server's own log, where whoever reads it looks for why it stopped.
    assert "shard-1 exited 6 times within 60 s" in (stack.log_dir / "shard-1.log").read_text()
    assert "partial=true" in stack.consequence("shard-1")


def test_a_dead_embedded_broker_still_ends_the_stack(tmp_path: Path):
    stack = FakeStack(StackConfig(workdir=tmp_path), crashing=set())
    stack.procs["broker"].returncode = 0
    with pytest.raises(RuntimeError, match="embedded broker exited"):
        stack.supervise(now=0.0)


def test_a_relative_workdir_is_the_callers(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stack = Stack(StackConfig(workdir=Path("here/var")))
    assert stack.workdir == tmp_path / "here" / "var"
    assert stack.log_dir == tmp_path / "here" / "var" / "logs"


# ---------------------------------------------------------------- a real `feedret up`


def read_until(proc: subprocess.Popen, pattern: str, timeout: float, seen: list[str]) -> str:
    """Lines of proc's output until one matches; every line read is appended to `seen`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r} within {timeout}s; output:\n{''.join(seen)}")


def shard_process(up: psutil.Process, shard: str, not_in: set[int]) -> psutil.Process | None:
    for p in up.children(recursive=True):
        try:
            if p.environ().get("FEEDRET_SHARD_ID") == shard and p.pid not in not_in:
                return p
        except psutil.Error:
            continue
    return None


@pytest.mark.e2e
def test_up_gives_up_a_crash_looping_shard_and_keeps_the_broker_and_the_rest(tmp_path: Path):
    # The caller's directory, not the repository's: --workdir is relative to it.
    workdir = tmp_path / "rel" / "var"
    keep = workdir / "snapshots" / "keep.txt"
    earlier = workdir / "snapshots" / "run-20000101T000000Z" / "shard-1" / "shard-1-00000000000000000007.snap"
    earlier.parent.mkdir(parents=True)
    keep.write_text("mine")
    earlier.write_bytes(b"an earlier run's snapshot")
    posts = tmp_path / "posts.jsonl"
    posts.write_text("".join(SAMPLE_POSTS.read_text().splitlines(keepends=True)[:60]))
    base = free_port_block(5)
    root = f"127.0.0.1:{base + 1}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "feedret.clients.cli", "up", "--posts", str(posts), "--workdir", "rel/var",
         "--broker-port", str(base), "--root-port", str(base + 1), "--member-port", str(base + 2),
         "--shard-base-port", str(base + 3), "--metrics-base-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "FEEDRET_TORCH_THREADS": "1"},
    )
    seen: list[str] = []
    try:
        read_until(proc, r"Ctrl-C stops every process", 240, seen)
        up = psutil.Process(proc.pid)
        before = {p.pid: p.cmdline() for p in up.children(recursive=True)}

        killed: set[int] = set()
        for n in range(1, 7):  # max_restarts (5) + 1 exits within 60 s
            assert wait_for(lambda: shard_process(up, "1", killed) is not None, timeout=30), "".join(seen)
            victim = shard_process(up, "1", killed)
            victim.kill()
            killed.add(victim.pid)
            if n < 6:
                read_until(proc, r"shard-1 exited; restarted it", 30, seen)
        read_until(proc, r"shard-1 GIVEN UP: it exited 6 times within 60 s", 30, seen)

        # Everything but shard-1 is the process it was: the broker above all.
        alive = {p.pid for p in up.children(recursive=True) if p.is_running()}
        assert {pid for pid in before if pid not in killed} <= alive, (before, alive)
        assert shard_process(up, "1", killed) is None, "shard-1 was restarted after being given up"

        with FeedretClient(root) as client:
            result = client.retrieve(vector=[0.1] * 128, k=5, timeout=5)
            assert result.partial and result.failed_shards == [1] and result.candidates
            # The broker, consumer and shard 0 still take new posts: one routed to shard 0.
            post_id = next(i for i in range(9_200_000_000, 9_200_000_100) if shard_of(i, 2) == 0)
            publish = subprocess.run(
                [sys.executable, "-m", "feedret.clients.cli", "publish", "-", "--bootstrap", f"127.0.0.1:{base}"],
                input=post_line(post_id, "posted after shard 1 was given up") + "\n",
                capture_output=True, text=True, timeout=60,
            )
            assert publish.returncode == 0, publish.stderr
            assert wait_for(lambda: client.lookup(post_id, timeout=2).found, timeout=30)

        # Still running, still printing nothing fatal; Ctrl-C stops it cleanly.
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        output = "".join(seen) + rest
        assert "Traceback" not in output and "embedded broker exited" not in output

        # The launcher's log says it too, as an event.
        assert re.search(r"process_given_up .*process=shard-1", output), output
        # --workdir was taken from where `feedret up` ran; nothing in it was deleted; this run
        # wrote its snapshots beside the earlier run's, in a directory of its own.
        assert (workdir / "logs" / "shard-1.log").exists()
        assert keep.read_text() == "mine" and earlier.read_bytes() == b"an earlier run's snapshot"
        runs = sorted(p.name for p in (workdir / "snapshots").glob("run-*"))
        assert len(runs) == 2 and runs[0] == "run-20000101T000000Z", runs
        assert "not restarting it again" in (workdir / "logs" / "shard-1.log").read_text()
        assert not (Path(__file__).resolve().parents[1] / "rel").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
