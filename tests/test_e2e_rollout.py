"""A model rollout on a real stack, mid-way: generation A (the shipped model, 2 shards) serves;
generation B (another model and 3 shards: its own consumer, vectors topic and shards) is brought up beside it under
continuous publishing; a root holds both fleets while the member service runs one pod of
each model. Every query is answered whole by the fleet of its member vector's model, and
both generations end with every live post, those published during the rollout included.

Then the same done by commands: `feedret rollout start|promote` on a running `feedret up`,
under continuous publishing and member queries, none of which fails or mixes models."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from feedret.clients.client import FeedretClient
from feedret.config import KafkaConfig
from feedret.members import ActivityItem, MemberProfile
from feedret.server.launcher import Stack, free_port_block, is_serving
from feedret.topics import ensure_topics
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

from conftest import ROOT, RunningStack, feedret_cli, post_line, read_until, sample_lines, stack_config, wait_for

pytestmark = pytest.mark.e2e

N_POSTS = 100
MODEL_B = ROOT / "models" / "feedret-tiny-llama"
VERSION_B = json.loads((MODEL_B / "feedret.json").read_text())["model_version"]


def serve(stack: Stack, name: str, role: str, env: dict[str, str]) -> None:
    base = {"KAFKA_BOOTSTRAP_SERVERS": stack.kafka.bootstrap_servers, "FEEDRET_NUM_SHARDS": "2",
            "FEEDRET_HOST": "127.0.0.1", "FEEDRET_METRICS_PORT": "0"}
    stack._spawn(name, [sys.executable, "-m", "feedret.clients.cli", "serve", role], {**base, **env})


def indexed(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            return pb_grpc.IndexAdminStub(channel).Stats(pb.StatsRequest(), timeout=2).total_indexed
        except grpc.RpcError:
            return -1


def found(address: str, post_id: int) -> bool:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.IndexAdminStub(channel).Lookup(pb.LookupRequest(post_id=post_id), timeout=2).found


def test_mid_rollout_each_query_is_answered_by_its_models_generation_and_both_keep_up(tmp_path):
    config = stack_config(tmp_path)
    with Stack(config) as stack:
        running = RunningStack(stack)
        running.publish(sample_lines(N_POSTS))
        assert wait_for(lambda: running.indexed() >= N_POSTS, timeout=120, interval=0.2)
        version_a = running.client.stats().model_version

        # Generation B beside A: its own topic, consumer group, model and shard count (a reshard too).
        ensure_topics(KafkaConfig(KAFKA_BOOTSTRAP_SERVERS=stack.kafka.bootstrap_servers,
                                  vectors_topic="post-vectors-b"), 3)
        port = free_port_block(5)
        b_shards = [f"127.0.0.1:{port + i}" for i in range(3)]
        member_b, root_ab = f"127.0.0.1:{port + 3}", f"127.0.0.1:{port + 4}"
        generation_b = {"FEEDRET_VECTORS_TOPIC": "post-vectors-b", "FEEDRET_MODEL_VERSION": VERSION_B,
                        "FEEDRET_NUM_SHARDS": "3"}
        serve(stack, "consumer-b", "consumer", {"FEEDRET_MODEL_DIR": str(MODEL_B), "FEEDRET_VECTORS_TOPIC": "post-vectors-b",
                                               "FEEDRET_CONSUMER_GROUP": "feedret-embedder-b", "FEEDRET_NUM_SHARDS": "3"})
        for i, address in enumerate(b_shards):
            serve(stack, f"shard-b-{i}", "shard", {**generation_b, "FEEDRET_SHARD_ID": str(i),
                                                   "FEEDRET_PORT": address.rsplit(":", 1)[1]})
        serve(stack, "member-b", "member", {"FEEDRET_MODEL_DIR": str(MODEL_B), "FEEDRET_PORT": member_b.rsplit(":", 1)[1]})
        # A root mid-rollout: both fleets, and one member pod of each model.
        serve(stack, "root-ab", "root", {"FEEDRET_PORT": root_ab.rsplit(":", 1)[1],
                                         "FEEDRET_SHARD_ADDRESSES": config.shard_addresses,
                                         "FEEDRET_NEXT_SHARD_ADDRESSES": ",".join(b_shards),
                                         "FEEDRET_MEMBER_ADDRESS": f"{config.member_address}|{member_b}"})

        # Publishing goes on throughout: new posts, and deletes of old ones.
        sample_ids = [json.loads(line)["post_id"] for line in sample_lines(N_POSTS)]
        deleted = sample_ids[:10]
        new_ids = [9_600_000_000 + i for i in range(60)]
        stop = threading.Event()

        def publish() -> None:
            for i, post in enumerate(new_ids):
                lines = [post_line(post, f"rollout post {post} about topic {post % 7}")]
                if i < len(deleted):
                    lines.append(json.dumps({"post_id": deleted[i], "op": "delete"}))
                running.publish(lines)
                if stop.wait(0.1):
                    return

        publisher = threading.Thread(target=publish)
        publisher.start()
        try:
            assert wait_for(lambda: all(is_serving(a) for a in [*b_shards, member_b, root_ab]), timeout=120, interval=0.3), (
                "\n".join(stack.log_tail(n) for n in ("consumer-b", "shard-b-0", "member-b", "root-ab")))
            client = FeedretClient(root_ab)
            seen: dict[str, int] = {}
            deadline = time.monotonic() + 60
            members = [MemberProfile(f"member-{i}", "s", recent_activity=[ActivityItem(1, "Alien (1979). Genres: Horror")])
                       for i in range(24)]
            while time.monotonic() < deadline and (len(seen) < 2 or publisher.is_alive()):
                for member in members:
                    result = client.retrieve(member=member, k=20, timeout=5)
                    # Whole: every shard of the fleet serving the member vector's model answered.
                    assert not result.partial, (result.model_version, result.failed_shards)
                    assert result.model_version in (version_a, VERSION_B)
                    seen[result.model_version] = seen.get(result.model_version, 0) + 1
            assert set(seen) == {version_a, VERSION_B}, seen  # both member pods, both fleets, answered
        finally:
            stop.set()
            publisher.join(30)

        # `feedret rollout status` checks that B holds every live post before it says ready.
        env = {"KAFKA_BOOTSTRAP_SERVERS": stack.kafka.bootstrap_servers, "FEEDRET_ROOT_ADDRESS": config.root_address}

        def status() -> dict:
            proc = feedret_cli("rollout", "status", "--next-shards", ",".join(b_shards), "--next-group",
                               "feedret-embedder-b", "--interval", "0.2", "--json", env=env)
            assert proc.returncode == 0, proc.stderr
            return json.loads(proc.stdout)

        assert wait_for(lambda: status()["ready"], timeout=60, interval=0.5), status()
        final = status()
        assert (final["serving"]["models"], final["next"]["models"]) == ([version_a], [VERSION_B])
        assert final["to_embed"] == 0 and final["next"]["indexed"] >= final["serving"]["indexed"]
        text = feedret_cli("rollout", "status", "--next-shards", ",".join(b_shards), "--next-group",
                           "feedret-embedder-b", env=env).stdout
        assert "ready to promote: yes" in text and f"next     model {VERSION_B}, 3/3 shards answering" in text

        # Both generations end with every live post: the sample's, and those published meanwhile.
        live = (set(sample_ids) - set(deleted)) | set(new_ids)
        a_shards = config.shard_addresses.split(",")
        for fleet in (a_shards, b_shards):
            assert wait_for(lambda: sum(indexed(a) for a in fleet) == len(live), timeout=60, interval=0.3), (
                fleet, [indexed(a) for a in fleet], len(live))
        for post in [*deleted, *new_ids[::10]]:
            in_a = any(found(a, post) for a in a_shards)
            in_b = any(found(a, post) for a in b_shards)
            assert in_a == in_b == (post in live), post
        client.close()


def test_a_consumer_given_another_generations_model_refuses_to_start_before_writing_a_vector():
    # A consumer redeployed with a new model into the serving generation would write vectors the
    # shards reject, and compaction would keep them in place of the posts' good ones.
    proc = subprocess.run([sys.executable, "-m", "feedret.clients.cli", "serve", "consumer"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "FEEDRET_MODEL_DIR": str(MODEL_B),
                                                       "FEEDRET_MODEL_VERSION": "feedret-movielens-tiny-v2",
                                                       "FEEDRET_METRICS_PORT": "0",
                                                       "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert proc.returncode != 0
    assert f"the model in FEEDRET_MODEL_DIR is {VERSION_B!r}, but this generation's FEEDRET_MODEL_VERSION is " \
           "'feedret-movielens-tiny-v2'" in proc.stderr


def readme_rollout() -> tuple[str, str, str, list[str]]:
    """The README's rollout commands (start, status, promote) and the status output it shows."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index("**A new model, without a gap.**"):]
    block, rest = after.split("```sh\n", 1)[1].split("```", 1)
    lines = [re.sub(r"\s+#\s.*$", "", line) for line in block.splitlines() if line.strip()]
    shown = rest.split("```\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split()[:3] for line in lines] == [["feedret", "rollout", w] for w in ("start", "status", "promote")]
    assert shown[0] == "$ " + lines[1]
    return lines[0], lines[1], lines[2], shown[1:]


def readme_line(command: str, cwd) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "PATH": path})


def digits(lines: list[str]) -> list[str]:
    """Lines with their numbers blanked: post counts and rates differ from stack to stack."""
    return [re.sub(r"\d+(\.\d+)?", "N", line) for line in lines]


def config_shards(base: int) -> list[str]:
    """The first generation's shards of a `feedret up` started on the port block at `base`."""
    return [f"127.0.0.1:{base + 3}", f"127.0.0.1:{base + 4}"]


def processes_of(up: subprocess.Popen, topic: str) -> list[psutil.Process]:
    """`feedret up`'s live children that read this vectors topic."""
    out = []
    for child in psutil.Process(up.pid).children():
        try:
            if child.environ().get("FEEDRET_VECTORS_TOPIC") == topic:
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def rollout(workdir, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "feedret.clients.cli", "rollout", *args, "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=timeout)


def test_feedret_up_rolls_out_a_new_model_and_shard_count_by_command_without_a_failed_or_mixed_reply(tmp_path):
    posts = tmp_path / "posts.jsonl"
    posts.write_text("\n".join(sample_lines(N_POSTS)) + "\n")
    sample_ids = [json.loads(line)["post_id"] for line in sample_lines(N_POSTS)]
    workdir = tmp_path / "var"
    base = free_port_block(5)
    root, kafka = f"127.0.0.1:{base + 1}", KafkaConfig(KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{base}")
    up = subprocess.Popen(
        [sys.executable, "-m", "feedret.clients.cli", "up", "--posts", str(posts), "--workdir", str(workdir),
         "--broker-port", str(base), "--root-port", str(base + 1), "--member-port", str(base + 2),
         "--shard-base-port", str(base + 3), "--metrics-base-port", "0", "--snapshot-interval", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "FEEDRET_TORCH_THREADS": "1"},
    )
    stop, publishing, publish_lock = threading.Event(), threading.Event(), threading.Lock()
    publishing.set()
    published: list[int] = []
    deleted = sample_ids[:10]
    replies: list[str] = []  # each member query's model, in order
    failures: list[str] = []

    def publish() -> None:
        from feedret.clients.publish import publish_lines

        i = 0
        while not stop.is_set():
            if not publishing.wait(0.1):
                continue
            with publish_lock:  # a pause (publishing cleared under this lock) sees no send in flight
                if not publishing.is_set():
                    continue
                post = 9_700_000_000 + i
                lines = [post_line(post, f"rollout post {post} about topic {post % 7}")]
                if i < len(deleted):
                    lines.append(json.dumps({"post_id": deleted[i], "op": "delete"}))
                publish_lines(kafka, lines)
                published.append(post)
            i += 1
            stop.wait(0.2)

    def query() -> None:
        members = [MemberProfile(f"member-{i}", "s", recent_activity=[ActivityItem(1, "Alien (1979). Genres: Horror")])
                   for i in range(16)]
        with FeedretClient(root) as client:
            while not stop.is_set():
                for member in members:
                    try:
                        result = client.retrieve(member=member, k=20, timeout=5)
                    except grpc.RpcError as exc:
                        failures.append(f"{exc.code().name}: {exc.details()}")
                        continue
                    if result.partial:
                        failures.append(f"partial from {result.model_version}: {result.failed_shards}")
                    replies.append(result.model_version)

    threads = [threading.Thread(target=publish), threading.Thread(target=query)]
    try:
        read_until(up, "Ctrl-C stops every process", timeout=180)
        for t in threads:
            t.start()
        assert wait_for(lambda: len(replies) >= 10, timeout=60), failures[:3]
        version_a = replies[0]

        # A request `feedret up` cannot read is answered as such, and the stack serves on.
        (workdir / "rollout-request.json").write_bytes(b"\xff not a request")
        up.send_signal(signal.SIGUSR1)
        read_until(up, "unreadable rollout request", timeout=30)
        # Nothing to promote or abort yet; a directory without a model is one line.
        assert "no generation is rolling out" in rollout(workdir, "promote").stderr
        bad = rollout(workdir, "start", "--model", str(tmp_path))
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "config.json missing" in bad.stderr

        # A start that is aborted leaves generation A as it was, and B's processes gone. (An index
        # of another type, too: a generation may change the model, the shard count or the index.)
        # It also takes posts older than `posts` holds from a bulk file, embedded before its consumer starts.
        old_ids = [9_800_000_000 + i for i in range(20)]
        export = tmp_path / "export.jsonl"
        export.write_text("\n".join([*(post_line(i, f"an old post {i}") for i in old_ids), "{not json"]) + "\n")
        started = rollout(workdir, "start", "--model", str(MODEL_B), "--index", "HNSW16,Flat",
                          "--posts-file", str(export))
        assert started.returncode == 0, started.stderr
        assert f"generation g2 (model feedret-tiny-llama-v0, 2 shards) is up beside g1; it embeds {export}" \
            in started.stdout
        read_until(up, "g2-consumer started", timeout=120)
        assert len(processes_of(up, "post-vectors-g2")) == 4  # its member service, consumer and 2 shards
        g2 = next(g for g in json.loads((workdir / "up.json").read_text())["generations"] if g["name"] == "g2")
        assert g2["backfill"].startswith("done: backfilled 20 posts and 0 deletes") and "1 bad line" in g2["backfill"]
        g2_shards = g2["shard_addresses"].split(",")
        with grpc.insecure_channel(g2_shards[0]) as channel:
            stats = pb_grpc.IndexAdminStub(channel).Stats(pb.StatsRequest(), timeout=5).shards[0]
        assert stats.index_type.startswith("HNSW"), stats.index_type
        assert wait_for(lambda: all(any(found(a, i) for a in g2_shards) for i in old_ids[::5]), timeout=60)
        assert not any(found(a, old_ids[0]) for a in config_shards(base))  # only the new generation has them
        aborted = rollout(workdir, "abort")
        assert aborted.returncode == 0 and "generation g2 aborted" in aborted.stdout, aborted.stderr
        assert not processes_of(up, "post-vectors-g2")

        # The README's commands, as written (in a directory whose var/ is this stack's): another
        # model on 3 shards (a reshard too), beside A, while posts arrive and are deleted.
        (tmp_path / "models").symlink_to(ROOT / "models")
        start_line, status_line, promote_line, shown = readme_rollout()
        started = readme_line(start_line, tmp_path)
        assert started.returncode == 0, started.stderr
        assert "generation g3 (model feedret-tiny-llama-v0, 3 shards)" in started.stdout

        def status() -> dict:
            proc = rollout(workdir, "status", "--json", "--interval", "0.2", timeout=60)
            assert proc.returncode == 0, proc.stderr
            return json.loads(proc.stdout)

        assert wait_for(lambda: status()["next"]["indexed"] > 0, timeout=120, interval=0.5), status()
        with publish_lock:
            publishing.clear()  # a pause, so that "holds every live post" can be checked exactly
        live = (set(sample_ids) - set(deleted[:len(published)])) | set(published)
        assert wait_for(lambda: status()["ready"], timeout=120, interval=0.5), status()
        final = status()
        assert (final["serving"]["models"], final["next"]["models"]) == ([version_a], [VERSION_B])
        assert final["serving"]["indexed"] == final["next"]["indexed"] == len(live), (final, len(live))
        said = readme_line(status_line, tmp_path)
        assert said.returncode == 0 and digits(said.stdout.splitlines()) == digits(shown), said.stdout
        promoted = readme_line(promote_line, tmp_path)
        assert promoted.returncode == 0, promoted.stderr
        assert "generation g3 serves now" in promoted.stdout
        publishing.set()
        assert wait_for(lambda: replies[-1] == VERSION_B, timeout=30)
        read_until(up, "generation g1 retired", timeout=60)  # the README's promote: 10 s of grace
        count = len(replies)
        assert wait_for(lambda: len(replies) >= count + 20, timeout=60)
        stop.set()
        for t in threads:
            t.join(timeout=60)

        # No reply failed or mixed models; the member service and the root switched together, once.
        assert not failures, failures[:5]
        switch = replies.index(VERSION_B)
        assert set(replies[:switch]) == {version_a} and set(replies[switch:]) == {VERSION_B}
        # B holds every live post, those published during and after the rollout included, and no deleted one.
        live = (set(sample_ids) - set(deleted[:len(published)])) | set(published)
        with FeedretClient(root) as client:
            assert wait_for(lambda: client.stats().total_indexed == len(live), timeout=60)
            assert client.stats().model_version == VERSION_B and len(client.stats().shards) == 3
            for post in [*deleted[:len(published)], *published[::5], *sample_ids[-5:]]:
                assert client.lookup(post).found == (post in live), post
        state = json.loads((workdir / "up.json").read_text())
        assert [(g["name"], g["role"]) for g in state["generations"]] == [("g3", "serving")]
    finally:
        stop.set()
        up.send_signal(signal.SIGINT)
        try:
            up.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
    assert up.returncode == 0
