"""`feedret up` as a user runs it: reaches its ready line with real retrievals; Ctrl-C leaves no process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from feedret.clients.client import FeedretClient

from conftest import SAMPLE_POSTS, free_port_block, read_until, wait_for

pytestmark = pytest.mark.e2e


def _total(client: FeedretClient) -> int:
    try:
        stats = client.stats(timeout=2)
    except Exception:
        return -1
    # `ready`, not just `reachable`: a restarted shard reports its snapshot's count while it
    # still replays its partition, and refuses searches (UNAVAILABLE) until it has caught up.
    return stats.total_indexed if all(s.reachable and s.ready for s in stats.shards) else -1


def test_up_serves_real_retrievals_and_ctrl_c_stops_every_process(tmp_path: Path):
    posts = tmp_path / "posts.jsonl"
    posts.write_text("".join(SAMPLE_POSTS.read_text().splitlines(keepends=True)[:400]))
    base = free_port_block(5)
    proc = subprocess.Popen(
        [sys.executable, "-m", "feedret.clients.cli", "up", "--posts", str(posts), "--workdir", str(tmp_path / "var"),
         "--broker-port", str(base), "--root-port", str(base + 1), "--member-port", str(base + 2),
         "--shard-base-port", str(base + 3), "--metrics-base-port", str(free_port_block(12)),
         "--snapshot-interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "FEEDRET_TORCH_THREADS": "1"},
    )
    try:
        out = read_until(proc, r"Ctrl-C stops every process", timeout=180)
        assert re.search(r"feedret is up in [\d.]+s: 400 posts searchable", out)
        assert f"127.0.0.1:{base + 1}" in out
        # Demo retrievals name real sample posts, with scores and shards.
        assert re.search(r"\n\s+1\s+\d+\s+0\.\d{4}\s+shard [01]\s+\S", out)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 6  # broker, consumer, member, root, 2 shards

        # A crashed shard is restarted from its newest snapshot and replays the rest of its
        # partition: everything is searchable again.
        # This run's own directory: the embedded broker starts empty, so no run loads another's.
        snapshots = tmp_path / "var" / "snapshots"
        assert wait_for(lambda: any(snapshots.glob("run-*/shard-1/*.snap")), timeout=30), "feedret up wrote no shard snapshot"
        shard_1 = next(p for p in children if p.environ().get("FEEDRET_SHARD_ID") == "1")
        shard_1.kill()
        read_until(proc, r"shard-1 exited; restarted it", timeout=10)
        with FeedretClient(f"127.0.0.1:{base + 1}") as client:
            assert wait_for(lambda: _total(client) == 400, timeout=30)
            assert not client.retrieve(vector=[0.1] * 128, k=10).partial
        assert "snapshot_loaded" in (tmp_path / "var" / "logs" / "shard-1.log").read_text()
        children = psutil.Process(proc.pid).children(recursive=True)

        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        assert "stopped" in rest
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
