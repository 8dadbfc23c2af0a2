"""End to end on a real stack: tansu broker, consumer, 2 shards, member and root, each its own process."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from feedret.config import DEFAULT_MODEL_DIR
from feedret.members import MemberProfile
from feedret.routing import shard_of
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

from conftest import SAMPLE_MEMBERS, feedret_cli, post_line, sample, scrape, wait_for

pytestmark = pytest.mark.e2e

DEFAULT_MODEL_VERSION = json.loads((DEFAULT_MODEL_DIR / "feedret.json").read_text())["model_version"]


def test_new_post_is_found_within_5s_and_is_its_own_nearest_neighbour(running_stack):
    post_id = 9_100_000_001
    published = time.monotonic()
    running_stack.publish([post_line(post_id, "Sourdough bread at home: starter, folds and a hot oven")])
    assert wait_for(lambda: running_stack.found(post_id), timeout=5)
    assert time.monotonic() - published < 5
    info = running_stack.client.lookup(post_id, include_vector=True)
    assert info.shard == shard_of(post_id, 2) and len(info.vector) == 128
    result = running_stack.client.retrieve(vector=info.vector, k=5)
    assert result.candidates[0].post_id == post_id
    assert not result.partial and result.model_version == DEFAULT_MODEL_VERSION


def test_upsert_replaces_the_vector_and_delete_removes_the_post_within_5s(running_stack):
    post_id = 9_100_000_002
    client = running_stack.client
    running_stack.publish([post_line(post_id, "first version of a post about chess openings")])
    assert wait_for(lambda: running_stack.found(post_id), timeout=5)
    before = np.array(client.lookup(post_id, include_vector=True).vector)
    running_stack.publish([post_line(post_id, "second version, now about growing tomatoes on a balcony")])
    assert wait_for(
        lambda: not np.allclose(np.array(client.lookup(post_id, include_vector=True).vector), before), timeout=5
    )
    vector = client.lookup(post_id, include_vector=True).vector
    running_stack.publish([json.dumps({"post_id": post_id, "op": "delete"})])
    assert wait_for(lambda: not running_stack.found(post_id), timeout=5)
    assert post_id not in client.retrieve(vector=vector, k=50).post_ids

    # On post-vectors the delete is a tombstone (key, no value), so compaction can drop the
    # post's records from every later replay. (The embedded broker neither compacts nor
    # describes topic configs; test_k8s checks the topic settings match feedret.topics.)
    kafka = running_stack.stack.kafka
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest",
                             max_partition_fetch_bytes=4 << 20)
    tp = TopicPartition(kafka.vectors_topic, shard_of(post_id, 2))
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    ours = []
    deadline = time.monotonic() + 10
    while len(ours) < 3 and time.monotonic() < deadline:
        for rec in consumer.poll(timeout_ms=500).get(tp, []):
            if rec.key == str(post_id).encode():
                ours.append(rec.value)
    consumer.close()
    assert len(ours) == 3 and ours[0] and ours[1] and ours[2] is None



def test_malformed_messages_go_to_the_dead_letter_topic_and_good_ones_around_them_are_indexed(running_stack):
    good = [9_100_000_010, 9_100_000_011, 9_100_000_012]
    bad = [
        "this is not json",
        json.dumps({"post_id": "nine", "op": "upsert", "author_id": "a", "text": "t", "created_at": 1, "lang": "en"}),
        json.dumps({"op": "upsert", "author_id": "a", "text": "no post id", "created_at": 1, "lang": "en"}),
        json.dumps({"post_id": 9_100_000_013, "op": "upsert", "author_id": "a", "text": "t", "created_at": 1,
                    "lang": "en", "features": {"likes": "many"}}),
        json.dumps({"post_id": 9_100_000_014, "op": "explode"}),
    ]
    lines = [post_line(good[0], "a good post about jazz piano"), *bad[:3],
             post_line(good[1], "a good post about mountain biking"), *bad[3:],
             post_line(good[2], "a good post about tax returns")]
    running_stack.publish(lines)
    assert wait_for(lambda: all(running_stack.found(p) for p in good), timeout=10)
    assert not running_stack.found(9_100_000_013)

    consumer = KafkaConsumer(bootstrap_servers=running_stack.stack.kafka.bootstrap_servers,
                             consumer_timeout_ms=3000, auto_offset_reset="earliest")
    tp = TopicPartition(running_stack.stack.kafka.dlq_topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    letters = []
    deadline = time.monotonic() + 10
    while len(letters) < len(bad) and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            letters.extend(json.loads(r.value) for r in records)
    consumer.close()
    assert sorted(l["value"] for l in letters) == sorted(bad)
    reasons = " | ".join(l["reason"] for l in letters)
    for expected in ("JSON", "post_id", "features", "op"):
        assert expected in reasons


def read_dead_letters(running_stack, expect: int, ours=lambda letter: True, timeout: float = 60) -> list[dict]:
    """The dead letters `ours` picks (other tests of the module write some too), once `expect` are there."""
    consumer = KafkaConsumer(bootstrap_servers=running_stack.stack.kafka.bootstrap_servers,
                             auto_offset_reset="earliest", max_partition_fetch_bytes=4 << 20)
    tp = TopicPartition(running_stack.stack.kafka.dlq_topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    letters: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(letters) < expect and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            letters.extend(letter for letter in (json.loads(r.value) for r in records) if ours(letter))
    consumer.close()
    return letters


def test_no_hostile_record_stops_ingestion_each_is_dead_lettered_and_every_good_one_indexed(running_stack):
    """Each of these once stopped all ingestion for good, or (keyless) lost a delete."""
    from kafka import KafkaProducer

    base = 9_200_000_000
    good = {base + i: f"a good post number {i} about gardening" for i in range(12)}
    hostile = {  # offset-free labels -> raw value (keyed by its post id where it has one)
        "surrogate_text": b'{"post_id": 9200000100, "author_id": "a", "created_at": 1, "text": "x \\ud800"}',
        "surrogate_author": b'{"post_id": 9200000101, "author_id": "\\udfff", "created_at": 1, "text": "x"}',
        "surrogate_lang": b'{"post_id": 9200000102, "author_id": "a", "created_at": 1, "text": "x", "lang": "\\ud800"}',
        "nested": b'{"post_id": 9200000103, "x": ' + b"[" * 100_000 + b"}",
        "digits": b'{"post_id": ' + b"9" * 5000 + b"}",
        "huge_author": json.dumps({"post_id": 9200000104, "author_id": "x" * 900_000, "created_at": 1,
                                   "text": "x"}).encode(),
        "huge_feature": b'{"post_id": 9200000105, "author_id": "a", "created_at": 1, "text": "x", '
                        b'"features": {"f": 1' + b"0" * 400 + b"}}",
    }
    keys = {"surrogate_text": 9200000100, "surrogate_author": 9200000101, "surrogate_lang": 9200000102,
            "nested": 9200000103, "huge_author": 9200000104, "huge_feature": 9200000105}
    producer = KafkaProducer(bootstrap_servers=running_stack.stack.kafka.bootstrap_servers, max_request_size=4 << 20)
    topic = running_stack.stack.kafka.posts_topic
    goods = iter(good.items())
    # A good post between every two hostile ones, on every partition their keys reach.
    for label, value in hostile.items():
        key = str(keys[label]).encode() if label in keys else b"1"
        producer.send(topic, key=key, value=value)
        post_id, text = next(goods)
        producer.send(topic, key=str(post_id).encode(), value=post_line(post_id, text).encode())
    # A keyless delete of a post upserted with its key: dead-lettered, the post stays.
    producer.send(topic, key=None, value=json.dumps({"post_id": base, "op": "delete"}).encode())
    for post_id, text in goods:
        producer.send(topic, key=str(post_id).encode(), value=post_line(post_id, text).encode())
    producer.flush()
    producer.close()

    assert wait_for(lambda: all(running_stack.found(p) for p in good), timeout=60), (
        [p for p in good if not running_stack.found(p)], running_stack.stack.log_tail("consumer"))
    ours = read_dead_letters(running_stack, expect=len(hostile) + 1, ours=lambda l: (
        "920000" in l["value"][:40] or l["value"].startswith('{"post_id": 9999')))
    kinds = sorted(l["kind"] for l in ours)
    assert kinds == sorted(["text", "author_id", "lang", "invalid_json", "invalid_json", "too_large", "features",
                            "no_key"]), [(l["kind"], l["reason"][:80]) for l in ours]
    for p in (9200000100, 9200000101, 9200000102, 9200000103, 9200000104, 9200000105):
        assert not running_stack.found(p)
    assert running_stack.found(base)  # the keyless delete did not apply


@pytest.mark.parametrize(
    "request_, message",
    [
        (pb.RetrieveRequest(k=0, vector=pb.QueryVector(values=[0.1] * 128)), "k must be"),
        (pb.RetrieveRequest(k=10_001, vector=pb.QueryVector(values=[0.1] * 128)), "k must be"),
        (pb.RetrieveRequest(k=10, vector=pb.QueryVector(values=[0.1] * 7)), "128"),
        (pb.RetrieveRequest(k=10), "either member or vector"),
        (pb.RetrieveRequest(k=10, vector=pb.QueryVector(values=[float("nan")] * 128)), "NaN"),
    ],
    ids=["k=0", "k>limit", "wrong-width", "no-query", "nan"],
)
def test_invalid_requests_get_invalid_argument_with_a_reason(running_stack, request_, message):
    with grpc.insecure_channel(running_stack.stack.config.root_address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.RetrievalServiceStub(channel).Retrieve(request_, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_a_member_query_returns_k_candidates_honouring_filters(running_stack):
    member = MemberProfile.from_json(json.loads(SAMPLE_MEMBERS.read_text().splitlines()[0]))
    client = running_stack.client
    full = client.retrieve(member=member, k=20)
    assert len(full.candidates) == 20 and not full.partial
    scores = [c.score for c in full.candidates]
    assert scores == sorted(scores, reverse=True)
    assert {c.shard for c in full.candidates} == {0, 1}
    excluded = full.post_ids[:5]
    filtered = client.retrieve(member=member, k=20, exclude_post_ids=excluded)
    assert len(filtered.candidates) == 20 and not set(excluded) & set(filtered.post_ids)
    assert client.retrieve(member=member, k=20, languages=["fr"]).candidates == []
    # The sample posts were created in 1996-2018: none is younger than a day.
    recent = client.retrieve(member=member, k=20, max_age_seconds=86_400)
    assert all(c.post_id >= 9_100_000_000 for c in recent.candidates)


def test_stats_add_up_over_shards(running_stack):
    stats = running_stack.client.stats()
    assert len(stats.shards) == 2 and all(s.reachable for s in stats.shards)
    assert stats.total_indexed == sum(s.indexed for s in stats.shards) >= 300


def test_cli_talks_to_the_stack_with_json_output(running_stack):
    env = {"FEEDRET_ROOT_ADDRESS": running_stack.stack.config.root_address,
           "KAFKA_BOOTSTRAP_SERVERS": running_stack.stack.kafka.bootstrap_servers}
    post_id = 9_100_000_020
    published = feedret_cli("publish", "-", "--json", env=env, input=post_line(post_id, "CLI post about kites") + "\n")
    assert published.returncode == 0, published.stderr
    assert json.loads(published.stdout)["sent"] == 1
    assert wait_for(lambda: running_stack.found(post_id), timeout=5)

    looked = feedret_cli("lookup", str(post_id), "--json", env=env)
    assert looked.returncode == 0 and json.loads(looked.stdout)["found"] is True
    queried = feedret_cli("query", "--post-id", str(post_id), "--k", "3", "--json", env=env)
    assert json.loads(queried.stdout)["candidates"][0]["post_id"] == post_id
    member = SAMPLE_MEMBERS.read_text().splitlines()[1]
    by_member = feedret_cli("query", member, "--k", "7", "--json", env=env)
    assert len(json.loads(by_member.stdout)["candidates"]) == 7
    stats = feedret_cli("stats", "--json", env=env)
    assert json.loads(stats.stdout)["total_indexed"] >= 300
    # The root answers for the index; the consumer's committed offsets come from Kafka.
    committed = json.loads(stats.stdout)["consumer_offsets"]
    assert committed and {o["topic"] for o in committed} == {running_stack.stack.kafka.posts_topic}
    missing = feedret_cli("lookup", "8888888888", "--json", env=env)
    assert missing.returncode == 1 and json.loads(missing.stdout)["found"] is False
    bad = feedret_cli("query", "--post-id", str(post_id), "--k", "0", env=env)
    assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr


def test_async_client_retrieves_and_looks_up(running_stack):
    import asyncio

    from feedret.clients.client import AsyncFeedretClient

    async def go():
        async with AsyncFeedretClient(running_stack.stack.config.root_address) as client:
            info = await client.lookup(356, include_vector=True)
            results = await asyncio.gather(*[client.retrieve(vector=info.vector, k=10) for _ in range(8)])
            stats = await client.stats()
        return info, results, stats

    info, results, stats = asyncio.run(go())
    assert info.found
    assert all(r.candidates[0].post_id == 356 and len(r.candidates) == 10 for r in results)
    assert stats.total_indexed >= 300


def test_every_server_answers_health_and_reflection(running_stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for name, address in running_stack.stack.addresses().items():
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert health.status == health_pb2.HealthCheckResponse.SERVING, name
            replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=2
            )
            services = {s.name for r in replies for s in r.list_services_response.service}
            assert "grpc.reflection.v1alpha.ServerReflection" in services, name


def test_every_process_serves_prometheus_metrics_that_match_the_stack(running_stack):
    urls = running_stack.stack.metrics_urls()
    assert set(urls) == {"root", "member", "consumer", "shard-0", "shard-1"}
    client = running_stack.client
    before = {name: scrape(url) for name, url in urls.items()}
    for name, samples in before.items():
        role = name.split("-")[0]
        assert any(n == "feedret_build_info" and dict(l)["role"] == role for n, l in samples), name
        assert sample(samples, "process_resident_memory_bytes") > 0, name

    posts = [9_100_000_030, 9_100_000_031, 9_100_000_032]
    running_stack.publish([post_line(p, f"metrics post {p} about birdwatching") for p in posts] + ["{not json"])
    assert wait_for(lambda: all(running_stack.found(p) for p in posts), timeout=10)
    member = dataclasses.replace(
        MemberProfile.from_json(json.loads(SAMPLE_MEMBERS.read_text().splitlines()[2])), session_id="metrics-session"
    )
    for _ in range(2):
        assert len(client.retrieve(member=member, k=30).candidates) == 30
    with pytest.raises(grpc.RpcError):
        client.retrieve(member=member, k=0)

    # Each shard's index-size gauge is what it serves: Stats agrees, and the shards add up to the total.
    def shards_agree() -> bool:
        stats = client.stats(timeout=2)
        gauges = [sample(scrape(urls[f"shard-{s.shard}"]), "feedret_shard_indexed_posts", shard=str(s.shard))
                  for s in stats.shards]
        return gauges == [s.indexed for s in stats.shards] and sum(gauges) == stats.total_indexed
    assert wait_for(shards_agree, timeout=10)
    stats = client.stats()
    after = {name: scrape(url) for name, url in urls.items()}
    assert sum(sample(after[f"shard-{i}"], "feedret_shard_indexed_posts", shard=str(i)) for i in (0, 1)) >= 300 + len(posts)
    for shard in stats.shards:
        shard_samples = after[f"shard-{shard.shard}"]
        assert sample(shard_samples, "feedret_shard_applied_offset", shard=str(shard.shard)) == shard.applied[0].offset
        assert sample(shard_samples, "feedret_shard_vector_dimension", shard=str(shard.shard)) == 128
        assert sample(shard_samples, "feedret_shard_partition_lag_records", shard=str(shard.shard)) == 0

    def delta(name: str, metric: str, **labels: str) -> float:
        return sample(after[name], metric, **labels) - sample(before[name], metric, **labels)

    # The consumer embedded the new posts and dead-lettered the bad line, by reason.
    assert delta("consumer", "feedret_consumer_posts_embedded_total") >= len(posts)
    assert delta("consumer", "feedret_consumer_dead_letters_total", reason="invalid_json") == 1
    produced = sum(delta("consumer", "feedret_consumer_vectors_produced_total", partition=str(p)) for p in (0, 1))
    assert produced >= len(posts)
    assert delta("consumer", "feedret_consumer_embed_seconds_count") >= 1
    assert delta("consumer", "feedret_consumer_batch_records_sum") >= len(posts) + 1
    # The root answered two member queries and refused one, and the member service cached the session.
    retrieve = dict(grpc_type="unary", grpc_service="feedret.v1.RetrievalService", grpc_method="Retrieve")
    assert delta("root", "grpc_server_handled_total", **retrieve, grpc_code="OK") == 2
    assert delta("root", "grpc_server_handled_total", **retrieve, grpc_code="INVALID_ARGUMENT") == 1
    assert delta("root", "feedret_root_candidates_returned_sum") == 60
    assert delta("member", "feedret_member_cache_lookups_total", result="miss") == 1
    assert delta("member", "feedret_member_cache_lookups_total", result="hit") == 1
    assert delta("member", "feedret_member_embed_seconds_count") == 1
    assert sample(after["member"], "feedret_model_info", model_version=DEFAULT_MODEL_VERSION, backend="torch", device="cpu") == 1


def test_vectors_embedded_elsewhere_are_imported_and_another_models_are_refused_by_the_shards(running_stack, tmp_path):
    # A batch embedded by another model first: the shards index one model and reject it.
    rng = np.random.default_rng(11)
    vecs = rng.normal(size=(40, 128))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(9_300_000_000, 9_300_000_040)
    np.savez(tmp_path / "other.npz", post_id=ids[:20], vector=vecs[:20], created_at=np.full(20, time.time()))
    bad = vecs[20:].copy()
    bad[0] = np.nan
    np.savez(tmp_path / "ours.npz", post_id=ids[20:], vector=bad, created_at=np.full(20, time.time()),
             lang=np.array(["en"] * 20), model_version=np.array(DEFAULT_MODEL_VERSION))
    env = {"KAFKA_BOOTSTRAP_SERVERS": running_stack.stack.kafka.bootstrap_servers,
           "FEEDRET_ROOT_ADDRESS": running_stack.stack.config.root_address}
    # Refused: the root says the shards index another model (the records would also replace good ones).
    refused = feedret_cli("import-vectors", str(tmp_path / "other.npz"), "--model-version", "elsewhere-v9", env=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"index model {DEFAULT_MODEL_VERSION}, not elsewhere-v9: they would reject" in refused.stderr
    other = feedret_cli("import-vectors", str(tmp_path / "other.npz"), "--model-version", "elsewhere-v9", "--force",
                        "--json", env=env)
    assert other.returncode == 0, other.stderr
    ours = feedret_cli("import-vectors", str(tmp_path / "ours.npz"), "--json", env=env)
    assert ours.returncode == 0, ours.stderr
    report = json.loads(ours.stdout)
    assert (report["sent"], report["rejected"], report["model_version"]) == (19, {"non_finite": 1}, DEFAULT_MODEL_VERSION)

    assert wait_for(lambda: all(running_stack.found(int(p)) for p in ids[21:]), timeout=10)
    client = running_stack.client
    result = client.retrieve(vector=vecs[25], k=3)
    assert result.ids[0] == ids[25] and result.model_version == DEFAULT_MODEL_VERSION and not result.partial
    # Applied before ours on the same partitions, and refused: the shards hold one model only.
    assert not any(running_stack.found(int(p)) for p in ids[:21])
    assert client.lookup(int(ids[30])).model_version == DEFAULT_MODEL_VERSION


def test_the_readmes_import_example_runs_as_written_with_the_output_it_shows(running_stack, tmp_path):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text[text.index("**Vectors embedded elsewhere**"):]
    commands = section.split("```sh\n", 1)[1].split("```", 1)[0].strip().splitlines()
    shown = section.split("```sh\n", 1)[1].split("```", 1)[1].split("```\n", 1)[1].split("```", 1)[0].strip()
    (tmp_path / "var").mkdir()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": running_stack.stack.kafka.bootstrap_servers,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    outputs = [subprocess.run(["bash", "-c", c], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
               for c in commands]
    assert all(o.returncode == 0 for o in outputs), [o.stderr for o in outputs]
    assert outputs[-1].stdout.strip() == shown.replace("feedret-movielens-tiny-v2", DEFAULT_MODEL_VERSION)
    assert wait_for(lambda: running_stack.found(9_100_000_999), timeout=10)
