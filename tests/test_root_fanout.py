"""The root's fan-out over in-process shard servers: merged answers, partial replies, and no thread per request.

A grpc future on an idle channel starts a polling thread for each call; the root
runs shard calls on a long-lived pool instead (benchmarks/results/search_latency_1m.md
has what that cost).
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from feedret.config import RootConfig, ShardConfig
from feedret.indexer.replica import ShardState
from feedret.server import root as root_server
from feedret.server import root_metrics
from feedret.server import shard as shard_server
from feedret.server.grpc_common import build_server
from feedret.server.shard import ShardServicer
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

from conftest import free_port

DIM = 16


@pytest.fixture
def two_shards():
    """Two shard servers on free ports; post ids 0..199 on shard 0, 1000..1199 on shard 1."""
    servers, addresses, _, vectors = recording_shards(np.random.default_rng(1), (200, 200))
    yield addresses, vectors
    for server in servers:
        server.stop(0)


def start_root(addresses: list[str], next_addresses: list[str] = (), **settings):
    """A root over the shards (and a rollout's next fleet): (server, address, servicer)."""
    servicer = root_server.RootServicer(
        RootConfig(shard_addresses=",".join(addresses), next_shard_addresses=",".join(next_addresses),
                   member_address=f"127.0.0.1:{free_port()}", **settings)
    )
    server, _, port = build_server("127.0.0.1", 0, 4,
                                   [lambda s: pb_grpc.add_RetrievalServiceServicer_to_server(servicer, s)],
                                   root_server.SERVICE_NAMES)
    server.start()
    return server, f"127.0.0.1:{port}", servicer


def test_the_root_merges_both_shards_exactly_and_starts_no_thread_per_request(two_shards, monkeypatch):
    addresses, vectors = two_shards
    ids = np.array(sorted(vectors))
    matrix = np.stack([vectors[i] for i in ids])
    server, root, _ = start_root(addresses)
    try:
        with grpc.insecure_channel(root) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)

            def retrieve(q, k):
                return stub.Retrieve(pb.RetrieveRequest(k=k, vector=pb.QueryVector(values=q.tolist())), timeout=5)

            for q in matrix[:5]:  # warm up: pools and channels
                retrieve(q, 10)
            started = []
            original = threading.Thread.start
            monkeypatch.setattr(threading.Thread, "start", lambda self: (started.append(self.name), original(self))[1])
            for q in matrix[10:40]:
                reply = retrieve(q, 50)
                expected = ids[np.argsort(-(matrix @ q), kind="stable")[:50]]
                assert list(reply.candidates.post_ids) == expected.tolist()
                assert set(reply.candidates.shards) == {0, 1} and not reply.partial
            monkeypatch.undo()
            # The servers' own bounded worker pools may still add a worker; nothing may start per request.
            # (grpc futures started 2 polling threads per request here: 60 in 30 requests).
            assert len(started) < 10, started
    finally:
        server.stop(0)


def test_a_dead_shard_makes_the_reply_partial_and_a_bad_request_is_refused(two_shards):
    addresses, vectors = two_shards
    server, root, _ = start_root([addresses[0], f"127.0.0.1:{free_port()}"])
    try:
        with grpc.insecure_channel(root) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            q = vectors[3]
            reply = stub.Retrieve(pb.RetrieveRequest(k=20, vector=pb.QueryVector(values=q.tolist())), timeout=5)
            assert reply.partial and list(reply.failed_shards) == [1] and reply.candidates.post_ids[0] == 3
            with pytest.raises(grpc.RpcError) as err:  # the shard refuses the width: INVALID_ARGUMENT passes through
                stub.Retrieve(pb.RetrieveRequest(k=20, vector=pb.QueryVector(values=[0.5] * (DIM + 1))), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(0)


def recording_shards(rng, sizes, models=None, id_base=0, dim=DIM, servicer_class=None):
    """In-process shard servers holding sizes[i] random posts (ids id_base + 1000·i + j),
    embedded by models[i] (default "m1"), recording each Search's k."""
    servers, addresses, shards, vectors = [], [], [], {}
    for shard, n in enumerate(sizes):
        model = models[shard] if models else "m1"
        state = ShardState(config=ShardConfig(shard_id=shard, num_shards=2), topic="post-vectors")
        vecs = rng.normal(size=(n, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        state.apply([(i, pb.PostVectorEvent(post_id=id_base + 1000 * shard + i, op=pb.PostVectorEvent.UPSERT, vector=v.tolist(),
                                            created_at=1e9, lang="en", model_version=model)) for i, v in enumerate(vecs)],
                    now=2e9)
        vectors.update({id_base + 1000 * shard + i: v for i, v in enumerate(vecs)})
        servicer = (servicer_class or RecordingShard)(state, "in-process")
        server, _, port = build_server("127.0.0.1", 0, 4, [lambda s, sv=servicer: pb_grpc.add_ShardServiceServicer_to_server(sv, s)],
                                       shard_server.SERVICE_NAMES)
        server.start()
        servers.append(server)
        shards.append(servicer)
        addresses.append(f"127.0.0.1:{port}")
    return servers, addresses, shards, vectors


def exact_top(vectors: dict, query: np.ndarray) -> np.ndarray:
    ids = np.array(sorted(vectors))
    scores = np.stack([vectors[i] for i in ids]) @ (query / np.linalg.norm(query))
    return ids[np.argsort(-scores, kind="stable")]


class RecordingShard(ShardServicer):
    """A shard that remembers the k of every Search it gets."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ks: list[int] = []
        self.batches: list[list[int]] = []  # each SearchBatch's searches' k

    def Search(self, request, context):
        self.ks.append(request.k)
        return super().Search(request, context)

    def SearchBatch(self, request, context):
        self.batches.append([s.k for s in request.searches])
        return super().SearchBatch(request, context)


class ShardWithoutSearchBatch(ShardServicer):
    """A shard of a release before SearchBatch."""

    def SearchBatch(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")


def test_each_shard_is_asked_for_its_share_and_one_that_may_hold_more_is_asked_again_for_k():
    # Shard 0 holds 20 posts, shard 1 holds 300: asked for their share of k=200 (136 each), shard 1's
    # 136 and shard 0's 20 make 156. Shard 1 returned all it was asked for, so it may hold more: it is
    # asked again for 200, and the reply has the exact top 200 of the 320.
    # (Shards of similar size rarely need a second round: see the next test.)
    rng = np.random.default_rng(3)
    servers, addresses, shards, vectors = recording_shards(rng, (20, 300))
    asked_before = root_metrics.ROOT_SHARDS_ASKED_AGAIN.labels(shard="1")._value.get()
    asked_before_0 = root_metrics.ROOT_SHARDS_ASKED_AGAIN.labels(shard="0")._value.get()
    root, address, _ = start_root(addresses)
    try:
        query = rng.normal(size=DIM).astype(np.float32)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            req = pb.RetrieveRequest(k=200)
            req.vector.values.extend(query.tolist())
            reply = stub.Retrieve(req, timeout=10)
            small = pb.RetrieveRequest(k=40)
            small.vector.values.extend(query.tolist())
            reply_small = stub.Retrieve(small, timeout=10)
        exact = exact_top(vectors, query)
        assert list(reply.candidates.post_ids) == exact[:200].tolist()
        assert shards[0].ks[:1] == [136] and shards[1].ks[:2] == [136, 200]
        # k=40: depth 36 each. Shard 0's 20 and shard 1's 36 make 56, but shard 1's 36th score is still
        # in the merged top 40, so it may hold more of them: it is asked again, and the answer stays exact.
        assert list(reply_small.candidates.post_ids) == exact[:40].tolist()
        assert shards[0].ks[1:] == [36] and shards[1].ks[2:] == [36, 40]
        assert root_metrics.ROOT_SHARDS_ASKED_AGAIN.labels(shard="1")._value.get() - asked_before == 2
        assert root_metrics.ROOT_SHARDS_ASKED_AGAIN.labels(shard="0")._value.get() == asked_before_0
    finally:
        root.stop(0)
        for server in servers:
            server.stop(0)


def test_shards_of_similar_size_are_asked_once_for_their_share_and_the_answer_is_exact():
    rng = np.random.default_rng(4)
    servers, addresses, shards, vectors = recording_shards(rng, (400, 400))
    root, address, _ = start_root(addresses)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            for _ in range(20):
                query = rng.normal(size=DIM).astype(np.float32)
                req = pb.RetrieveRequest(k=100)
                req.vector.values.extend(query.tolist())
                reply = stub.Retrieve(req, timeout=10)
                assert list(reply.candidates.post_ids) == exact_top(vectors, query)[:100].tolist()
        assert shards[0].ks == shards[1].ks == [75] * 20  # 50 + 5 sigmas each, one round
    finally:
        root.stop(0)
        for server in servers:
            server.stop(0)


def test_no_reply_merges_two_models_and_a_query_of_a_model_the_shards_do_not_serve_is_refused():
    # Shard 1 was rebuilt with another model (say, mid-rollout): its scores are not comparable.
    servers, addresses, _, vectors = recording_shards(np.random.default_rng(4), (100, 100, 100), ("m1", "m2", "m1"))
    root, address, _ = start_root(addresses)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            q = vectors[1005]  # a shard-1 post: its own top neighbour, were shard 1 merged

            def retrieve(model=""):
                return stub.Retrieve(pb.RetrieveRequest(k=20, vector=pb.QueryVector(values=q.tolist(), model_version=model)),
                                     timeout=5)

            for model in ("m1", ""):  # stated, or the model most shards serve
                reply = retrieve(model)
                assert reply.model_version == "m1" and reply.partial and list(reply.failed_shards) == [1]
                assert set(reply.candidates.shards) == {0, 2} and 1005 not in reply.candidates.post_ids
            # The fleet serves m1 (most of its shards do): a query of another model is refused.
            for model in ("m2", "m3"):
                with pytest.raises(grpc.RpcError) as err:
                    retrieve(model)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert f"'{model}'" in err.value.details() and "serving 'm1'" in err.value.details()
    finally:
        root.stop(0)
        for server in servers:
            server.stop(0)


def test_the_model_of_a_query_that_names_none_is_the_one_most_shards_serve():
    assert root_server.pick_model("m9", {0: "m1", 1: "m1"}, "m1") == "m9"
    assert root_server.pick_model("", {0: "m1", 1: "m2", 2: "m2"}, "m1") == "m2"
    assert root_server.pick_model("", {0: "m1", 1: "m2"}, "m2") == "m2"  # a tie: the one served last
    assert root_server.pick_model("", {0: "", 1: ""}, "m1") == "m1"  # empty shards name none


def test_during_a_rollout_each_query_goes_to_the_shards_of_its_vectors_model():
    # Generation A: 2 shards of model m1. Generation B, being rolled out: 3 shards of m2, its own posts.
    a_servers, a_addresses, _, a_vectors = recording_shards(np.random.default_rng(5), (100, 100), ("m1", "m1"))
    b_servers, b_addresses, _, b_vectors = recording_shards(np.random.default_rng(6), (80, 80, 80), ("m2",) * 3,
                                                            id_base=100_000)
    server, address, servicer = start_root(a_addresses, b_addresses)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)

            def retrieve(q, model):
                return stub.Retrieve(pb.RetrieveRequest(k=10, vector=pb.QueryVector(values=q.tolist(), model_version=model)),
                                     timeout=5)

            for _ in range(2):  # the first m2 query finds its fleet by asking; the second goes straight there
                for model, vectors, post in (("m2", b_vectors, 101_005), ("m1", a_vectors, 1005)):
                    reply = retrieve(vectors[post], model)
                    assert reply.model_version == model and not reply.partial
                    assert reply.candidates.post_ids[0] == post
                    assert set(reply.candidates.post_ids) <= set(vectors)  # never the other generation's posts
            assert [f.model_version for f in servicer.fleets] == ["m1", "m2"]
            answered = {(m.labels["fleet"], m.labels["model_version"]): m.value
                        for m in root_metrics.ROOT_FLEET_REPLIES.collect()[0].samples if m.name.endswith("_total")}
            assert answered[("serving", "m1")] >= 2 and answered[("next", "m2")] >= 2
            # A vector that names no model: the serving generation.
            assert set(retrieve(b_vectors[101_005], "").candidates.post_ids) <= set(a_vectors)
            with pytest.raises(grpc.RpcError) as err:
                retrieve(a_vectors[5], "m3")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "serving 'm1'" in err.value.details() and "next 'm2'" in err.value.details()
    finally:
        server.stop(0)
        for s in a_servers + b_servers:
            s.stop(0)


def test_a_fleet_known_to_serve_another_model_is_never_asked():
    from feedret.server.generations import fleets_to_ask

    assert fleets_to_ask("m2", ["m1", "m2"]) == [1]
    assert fleets_to_ask("m2", ["m1", ""]) == [1]  # not known yet: asked, and learned from its answer
    assert fleets_to_ask("m2", ["", ""]) == [0, 1]
    assert fleets_to_ask("m3", ["m1", "m2"]) == []
    assert fleets_to_ask("", ["m1", "m2"]) == [0]  # a vector that names no model: the serving fleet


def test_a_fleet_whose_model_is_not_known_yet_and_cannot_answer_hands_the_query_to_the_next():
    # A fresh root: neither fleet's model is known. B's vectors are wider than A's, so A's shards refuse
    # B's query for its width, before any answer could teach the root A's model; and then A goes down.
    a_servers, a_addresses, _, _ = recording_shards(np.random.default_rng(7), (50, 50), ("m1", "m1"))
    b_servers, b_addresses, _, b_vectors = recording_shards(np.random.default_rng(8), (50, 50), ("m2", "m2"),
                                                            id_base=100_000, dim=24)
    server, address, servicer = start_root(a_addresses, b_addresses)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            q = b_vectors[100_003]
            request = pb.RetrieveRequest(k=5, vector=pb.QueryVector(values=q.tolist(), model_version="m2"))
            reply = stub.Retrieve(request, timeout=5)
            assert reply.candidates.post_ids[0] == 100_003 and reply.model_version == "m2" and not reply.partial
            for s in a_servers:
                s.stop(0)
            assert stub.Retrieve(request, timeout=5).candidates.post_ids[0] == 100_003
    finally:
        server.stop(0)
        for s in b_servers:
            s.stop(0)


def test_a_generations_file_switches_the_serving_fleet_without_a_restart_or_a_failed_query(tmp_path):
    from feedret.server.generations import FleetSpec, Topology, write_topology

    a_servers, a_addresses, _, a_vectors = recording_shards(np.random.default_rng(9), (60, 60), ("m1", "m1"))
    b_servers, b_addresses, _, b_vectors = recording_shards(np.random.default_rng(10), (40, 40, 40), ("m2",) * 3,
                                                            id_base=100_000)
    a = FleetSpec(name="g1", shard_addresses=",".join(a_addresses))
    b = FleetSpec(name="g2", shard_addresses=",".join(b_addresses))
    path = tmp_path / "generations.json"
    write_topology(path, Topology(fleets=[a]))
    port = free_port()
    stop = threading.Event()
    root = threading.Thread(target=root_server.serve, daemon=True, args=(
        RootConfig(port=port, metrics_port=0, generations_file=str(path), generations_poll_s=0.05), stop))
    root.start()
    failures: list[str] = []
    answered = {"m1": 0, "m2": 0, "": 0}
    querying = threading.Event()
    querying.set()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb_grpc.RetrievalServiceStub(channel)

        def retrieve(model: str, post: int) -> pb.RetrieveResponse:
            q = (b_vectors if model == "m2" else a_vectors)[post]
            return stub.Retrieve(pb.RetrieveRequest(k=10, vector=pb.QueryVector(values=q.tolist(), model_version=model)),
                                 timeout=5)

        def serving_model() -> str:
            return retrieve("", 1005).model_version  # a query naming no model: the first fleet's

        def hammer() -> None:
            # Each generation's queries, throughout: both fleets are in every topology below.
            while querying.is_set():
                for model, post, vectors in (("m1", 1005, a_vectors), ("m2", 101_005, b_vectors)):
                    try:
                        reply = retrieve(model, post)
                    except grpc.RpcError as exc:
                        if model == "m1" or answered["m2"]:  # m2 is refused only before its fleet is added
                            failures.append(f"{model}: {exc.code().name} {exc.details()}")
                        continue
                    answered[model] += 1
                    if reply.model_version != model or not set(reply.candidates.post_ids) <= set(vectors):
                        failures.append(f"{model}: answered from {reply.model_version}")

        assert serving_model() == "m1"
        write_topology(path, Topology(fleets=[a, b]))  # a rollout starts: B beside A
        worker = threading.Thread(target=hammer, daemon=True)
        worker.start()
        assert wait_for(lambda: answered["m2"] >= 3)
        write_topology(path, Topology(fleets=[b, a]))  # promote: B serves, A answers its own queries still
        assert wait_for(lambda: serving_model() == "m2")
        path.write_text("{not json")  # a broken file is logged and changes nothing
        time.sleep(0.3)
        assert serving_model() == "m2"
        count = answered["m1"]
        assert wait_for(lambda: answered["m1"] >= count + 3)
        querying.clear()
        worker.join(timeout=30)
        assert not failures, failures[:5]
        write_topology(path, Topology(fleets=[b]))  # A retired: its model is refused, not scored against B
        assert wait_for(lambda: _code(lambda: retrieve("m1", 1005)) == grpc.StatusCode.FAILED_PRECONDITION)
        assert set(retrieve("m2", 101_005).candidates.post_ids) <= set(b_vectors)
        channel.close()
    finally:
        querying.clear()
        stop.set()
        root.join(timeout=30)
        for s in a_servers + b_servers:
            s.stop(0)


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _code(call) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return None


def test_a_batch_answers_each_request_as_retrieve_would_each_with_its_own_status(two_shards):
    from feedret.clients.client import FeedretClient, Query, RetrieveError

    addresses, vectors = two_shards
    ids = np.array(sorted(vectors))
    matrix = np.stack([vectors[i] for i in ids])
    server, root, _ = start_root([addresses[0], addresses[1]])
    try:
        with FeedretClient(root) as client:
            queries = [Query(vector=q, k=30, exclude_post_ids=[int(ids[i])]) for i, q in enumerate(matrix[:20])]
            queries.insert(5, Query(vector=[0.5] * (DIM + 1), k=30))  # another width: refused, alone
            queries.insert(9, Query(vector=matrix[0], k=0))  # k out of range: refused, alone
            queries.insert(12, Query(k=30))  # neither member nor vector
            results = client.retrieve_batch(queries)
            assert len(results) == len(queries)
            for query, result in zip(queries, results):
                one_at_a_time = None
                try:
                    one_at_a_time = client.retrieve(vector=query.vector, k=query.k, exclude_post_ids=query.exclude_post_ids)
                except grpc.RpcError as exc:
                    assert isinstance(result, RetrieveError) and result.code == exc.code(), (result, exc)
                    assert result.message == exc.details()
                    continue
                assert not isinstance(result, RetrieveError), result
                assert result.post_ids == one_at_a_time.post_ids and not result.partial
                assert int(query.exclude_post_ids[0]) not in result.post_ids  # filters per query
            assert sum(isinstance(r, RetrieveError) for r in results) == 3

            async def batch_async():
                from feedret.clients.client import AsyncFeedretClient

                async with AsyncFeedretClient(root) as aclient:
                    return await aclient.retrieve_batch(queries[:3])

            import asyncio

            assert [r.post_ids for r in asyncio.run(batch_async())] == [r.post_ids for r in results[:3]]
            for empty_or_too_many in ([], [Query(vector=matrix[0], k=5)] * 257):
                with pytest.raises(grpc.RpcError) as err:
                    client.retrieve_batch(empty_or_too_many)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1 to 256" in err.value.details()
    finally:
        server.stop(0)


def test_a_batch_reports_a_dead_shard_per_request_as_partial(two_shards):
    from feedret.clients.client import FeedretClient, Query

    addresses, vectors = two_shards
    server, root, _ = start_root([addresses[0], f"127.0.0.1:{free_port()}"])
    try:
        with FeedretClient(root) as client:
            for _ in range(2):  # a fresh root's batch (each searched alone), then a warm one's (packed)
                results = client.retrieve_batch([Query(vector=vectors[i], k=10) for i in (3, 4, 5)])
                assert all(r.partial and r.failed_shards == [1] for r in results)
                assert [r.post_ids[0] for r in results] == [3, 4, 5]
    finally:
        server.stop(0)


@pytest.mark.parametrize("old_shards", [False, True])
def test_a_batch_goes_to_each_shard_in_one_call_and_answers_exactly_as_single_queries(old_shards):
    # Shards of unequal size (20 and 300 posts): some queries need shard 1 asked again for k.
    from feedret.clients.client import FeedretClient, Query

    rng = np.random.default_rng(11)
    servers, addresses, shards, vectors = recording_shards(
        rng, (20, 300), servicer_class=ShardWithoutSearchBatch if old_shards else None)
    root, address, _ = start_root(addresses)
    try:
        with FeedretClient(address) as client:
            client.retrieve(vector=vectors[5], k=10)  # the root learns the fleet's model and width
            queries = [rng.normal(size=DIM).astype(np.float32) for _ in range(24)]
            ks = [10, 40, 200] * 8
            excluded = [[int(exact_top(vectors, q)[0])] for q in queries]  # each query's own filter
            results = client.retrieve_batch([Query(vector=q, k=k, exclude_post_ids=x) for q, k, x in zip(queries, ks, excluded)])
            for q, k, x, result in zip(queries, ks, excluded, results):
                want = [p for p in exact_top(vectors, q).tolist() if p not in x][:k]
                assert result.post_ids == want and not result.partial and result.model_version == "m1"
                assert result.post_ids == client.retrieve(vector=q, k=k, exclude_post_ids=x).post_ids
        if not old_shards:
            # One SearchBatch per shard for all 24 queries, each asked for its share of its k;
            # Search only for the warm-up, the single queries above and the rounds asking again for k.
            assert [len(b) for s in shards for b in s.batches] == [24, 24]
            from feedret.merge import shard_depth

            assert shards[0].batches[0] == shards[1].batches[0] == [shard_depth(k, 2, 5.0) for k in ks]
    finally:
        root.stop(0)
        for server in servers:
            server.stop(0)


class DelayedShard(RecordingShard):
    """A shard whose every search takes `delay_s` longer (a subclass sets it)."""

    delay_s = 0.0

    def Search(self, request, context):
        time.sleep(self.delay_s)
        return super().Search(request, context)

    def SearchBatch(self, request, context):
        time.sleep(self.delay_s)
        return super().SearchBatch(request, context)


class SlowShard(DelayedShard):
    """50 ms a search: concurrent queries queue at the root meanwhile."""

    delay_s = 0.05


class HungShard(DelayedShard):
    """A shard that answers nothing before its caller's deadline."""

    delay_s = 3.0


def test_concurrent_retrieves_are_sent_to_each_shard_together_and_answered_exactly():
    from concurrent.futures import ThreadPoolExecutor

    from feedret.clients.client import FeedretClient

    rng = np.random.default_rng(12)
    servers, addresses, shards, vectors = recording_shards(rng, (150, 150), servicer_class=SlowShard)
    # Queries wait for the batch in flight (50 ms a search) rather than going alone after 50 ms.
    root, address, _ = start_root(addresses, coalesce_wait_ms=5000)
    try:
        queries = [rng.normal(size=DIM).astype(np.float32) for _ in range(24)]
        with FeedretClient(address) as client:
            assert client.retrieve(vector=queries[0], k=20).post_ids == exact_top(vectors, queries[0])[:20].tolist()
            assert shards[0].batches == []  # a lone query: a plain Search, at once
            with ThreadPoolExecutor(12) as pool:
                results = list(pool.map(lambda q: client.retrieve(vector=q, k=20, timeout=10), queries))
        for q, result in zip(queries, results):
            assert result.post_ids == exact_top(vectors, q)[:20].tolist() and not result.partial
        together = [len(b) for b in shards[0].batches]
        assert together and max(together) > 1, together  # queries that arrived meanwhile went out together
        assert len(shards[0].ks) + sum(together) == 1 + len(queries)  # each query searched once per shard
    finally:
        root.stop(0)
        for server in servers:
            server.stop(0)


def test_a_hung_shard_costs_concurrent_queries_completeness_not_the_answer():
    # Coalescing must not queue queries behind a batch that waits on a hung shard until its deadline.
    from concurrent.futures import ThreadPoolExecutor

    from feedret.clients.client import FeedretClient

    rng = np.random.default_rng(13)
    fine, fine_addresses, _, vectors = recording_shards(rng, (100,))
    hung, hung_addresses, _, _ = recording_shards(rng, (100,), id_base=1000, servicer_class=HungShard)
    # A margin that a loaded test machine's merge and reply fit in, before the caller's deadline.
    root, address, _ = start_root(fine_addresses + hung_addresses, deadline_margin_s=0.3)
    try:
        # As many at once as the test root has worker threads (4): each holds one until its deadline.
        with FeedretClient(address) as client, ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: client.retrieve(vector=vectors[i], k=10, timeout=1.0), range(8)))
        assert all(r.partial and r.failed_shards == [1] and r.post_ids[0] == i for i, r in enumerate(results))
    finally:
        root.stop(0)
        for server in fine + hung:
            server.stop(0)


def test_the_root_keeps_back_a_tenth_of_the_callers_time_or_10_ms_whichever_is_more():
    class Context:
        def __init__(self, remaining):
            self.remaining = remaining

        def time_remaining(self):
            return self.remaining

    root = root_server.RootServicer(RootConfig(shard_addresses="127.0.0.1:1", member_address="127.0.0.1:2"))
    for remaining, margin in ((1.0, 0.1), (0.05, 0.01), (None, 0.1)):  # None: no deadline, default_timeout_s 1.0
        before = time.monotonic()
        deadline = root._deadline(Context(remaining))
        left = (remaining or 1.0) - (deadline - before)
        assert margin - 0.005 <= left <= margin + 0.05, (remaining, left)
