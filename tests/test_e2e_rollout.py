"""A model rollout on a real stack, mid-way: generation A (the shipped model, 2 shards) serves;
generation B (another model and 3 shards: its own consumer, vectors topic and shards) is brought up beside it under
continuous publishing; a root holds both fleets while the member service runs one pod of
each model. Every query is answered whole by the fleet of its member vector's model, and
both generations end with every live post, those published during the rollout included. Then B
is promoted (a root serving it alone, A's processes stopped) and goes on taking new posts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from feedret.clients.client import FeedretClient
from feedret.config import KafkaConfig
from feedret.members import ActivityItem, MemberProfile
from feedret.server.launcher import Stack, free_port_block, is_serving
from feedret.topics import ensure_topics
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

from conftest import ROOT, RunningStack, feedret_cli, post_line, sample_lines, stack_config, wait_for

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

        # Promote, as the Deployments' updates would: a root serving B alone (its member pods all on
        # B's model), then generation A's processes retired. B keeps taking new posts.
        root_b = f"127.0.0.1:{free_port_block(1)}"
        serve(stack, "root-b", "root", {"FEEDRET_PORT": root_b.rsplit(":", 1)[1], "FEEDRET_SHARD_ADDRESSES": ",".join(b_shards),
                                        "FEEDRET_MEMBER_ADDRESS": member_b})
        assert wait_for(lambda: is_serving(root_b), timeout=60, interval=0.2), stack.log_tail("root-b")
        for name in ("consumer", "member", "shard-0", "shard-1", "root-ab"):
            stack.kill(name, signal.SIGTERM)
        with FeedretClient(root_b) as promoted:
            for member in members:
                result = promoted.retrieve(member=member, k=20, timeout=5)
                assert not result.partial and result.model_version == VERSION_B
            running.publish([post_line(9_600_001_000, "a post published after the promotion")])
            assert wait_for(lambda: promoted.lookup(9_600_001_000).found, timeout=30)
            assert promoted.stats().model_version == VERSION_B


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
