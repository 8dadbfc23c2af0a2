"""Root retrieval server: stateless fan-out to every shard under the caller's deadline, then merge.

A shard that fails or misses the deadline costs completeness, not the answer:
the reply carries the other shards' merged top-K with partial=true.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import grpc
import numpy as np
import structlog

from feedret.server import root_metrics
from feedret.config import GrpcSecurityConfig, RootConfig
from feedret.grpc_client import MAX_MESSAGE_BYTES
from feedret.logging import bound
from feedret.merge import ShardHits, merge_topk, shard_depth
from feedret.microbatch import MicroBatcher, NotStarted
from feedret.routing import shard_of
from feedret.server.grpc_security import open_channel
from feedret.server.member_pool import DeadlineBeforeCall, MemberPool, NoMemberPods, NoMemberService
from feedret.server.generations import FleetSpec, Topology, fleets_to_ask, read_topology
from feedret.server.replicas import MAX_IN_FLIGHT, Fatal, HedgeBudget, Outcome, ReplicaSet, call_replicas
from feedret.shard_targets import ROUND_ROBIN, is_pool, parse_shard_targets
from feedret.server.grpc_common import (
    InvalidRequest,
    RpcFailure,
    build_server,
    failure_status,
    check_filters,
    check_k,
    check_member,
    connection_age_options,
    deadline_remaining,
    fill_candidates,
    query_vector,
    rpc_scope,
    serving,
)
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["RetrievalService"].full_name,
    pb.DESCRIPTOR.services_by_name["IndexAdmin"].full_name,
)

# A fleet or member service a new topology dropped is closed this long after: requests
# that read the old topology finish first (a caller's deadline is rarely over a minute).
RETIRED_LINGER_S = 60.0


@dataclass(frozen=True)
class _ShardQuery:
    """One query's first round to every shard of a fleet, for the coalescer."""

    fleet: "ShardFleet"
    search: pb.SearchRequest
    deadline: float


@dataclass(frozen=True)
class _Query:
    """A checked request with its query vector and that vector's model."""

    request: pb.RetrieveRequest
    rid: str
    which: str  # "member" or "vector"
    raw: np.ndarray
    model_version: str


def _search_request(vec: np.ndarray, k: int, filters: pb.Filters, rid: str) -> pb.SearchRequest:
    return pb.SearchRequest(k=k, filters=filters, request_id=rid, vector=vec.tolist())


class ShardFleet:
    """One generation's shards as the root calls them: per shard, its replicas' stubs and
    rotation, and what the root has learned from their answers (width, model)."""

    def __init__(self, name: str, targets: list[list[str]], cooldown_s: float,
                 security: GrpcSecurityConfig | None) -> None:
        self.name = name
        self.addresses = ["|".join(replicas) for replicas in targets]  # per shard, for Stats and logs
        # TLS to shards when this root serves TLS (one internal PKI).
        self.targets = targets
        self.channels = [[open_channel(t, security, shard_channel_options(t)) for t in replicas] for replicas in targets]
        channels = self.channels
        self.search_stubs = [[pb_grpc.ShardServiceStub(c) for c in chans] for chans in channels]
        self.admin_stubs = [[pb_grpc.IndexAdminStub(c) for c in chans] for chans in channels]
        self.replica_sets = [ReplicaSet(shard, replicas, cooldown_s=cooldown_s) for shard, replicas in enumerate(targets)]
        # Learned from shard answers so wrong-width vectors are refused before fan-out:
        # the width the shards serve, and the model's full width when they serve a
        # Matryoshka prefix of it (such queries are truncated here, before fan-out);
        # and the model they serve, so a query goes to the fleet of its model.
        self.dimension = 0
        self.vector_dimension = 0
        self.model_version = ""

    def __len__(self) -> int:
        return len(self.replica_sets)

    def close(self) -> None:
        for chans in self.channels:
            for channel in chans:
                channel.close()


@dataclass(frozen=True)
class Routing:
    """What one query is served from, swapped whole when the topology changes: a request
    reads it once, so it never mixes an old fleet list with a new member service."""

    fleets: list[ShardFleet]
    member: MemberPool
    topology: Topology


def topology_of(config: RootConfig) -> Topology:
    """The root's topology: its generations file, else its shard, next-shard and member settings."""
    if config.generations_file:
        return read_topology(Path(config.generations_file))
    fleets = [FleetSpec(name="serving", shard_addresses=config.shard_addresses)]
    if config.next_shard_addresses:
        fleets.append(FleetSpec(name="next", shard_addresses=config.next_shard_addresses))
    return Topology(member_address=config.member_address, fleets=fleets)


class RootServicer(pb_grpc.RetrievalServiceServicer, pb_grpc.IndexAdminServicer):
    def __init__(self, config: RootConfig, security: GrpcSecurityConfig | None = None,
                 topology: Topology | None = None) -> None:
        self.config = config
        self.security = security
        self.hedge_after_s = config.hedge_after_ms / 1000
        # One budget for all Searches: hedges add at most hedge_budget extra calls per first call.
        self.hedge_budget = HedgeBudget(config.hedge_budget, config.hedge_burst)
        # RetrieveBatch's requests, each waiting on its shard calls (made on _shard_calls).
        self._batch_calls = ThreadPoolExecutor(max_workers=config.batch_parallelism, thread_name_prefix="batch-item")
        # Concurrent Retrieves' first rounds to one fleet's shards go out together, one SearchBatch
        # per shard (feedret.microbatch: a lone query goes at once, as a plain Search, from its own
        # thread; batches form only while one is in flight, i.e. under load).
        self._coalescer = (MicroBatcher(self._search_together, config.coalesce_max_batch, "shard-fan-out",
                                        group=lambda q: id(q.fleet), inline=True)
                           if config.coalesce_max_batch > 1 else None)
        self._shard_calls: ThreadPoolExecutor | None = None
        self._shard_call_threads = 0
        self._apply_lock = threading.Lock()
        self._routing: Routing | None = None
        self.apply_topology(topology if topology is not None else topology_of(config))

    # ------------------------------------------------------------ topology

    @property
    def fleets(self) -> list[ShardFleet]:
        """The serving generation's shards and, during a model rollout, the other's: a
        query goes to the fleet serving its vector's model (feedret.server.generations)."""
        return self._routing.fleets

    @property
    def serving(self) -> ShardFleet:
        """The first fleet: queries that name no model, Lookup and Stats."""
        return self._routing.fleets[0]

    @property
    def member(self) -> MemberPool:
        return self._routing.member

    def apply_topology(self, topology: Topology) -> None:
        """Serve from `topology` from the next request on. Fleets and the member service
        that did not change keep their channels and what was learned from their answers;
        those that left are closed once requests already using them have had their deadline."""
        with self._apply_lock:
            old = self._routing
            kept = {tuple(map(tuple, f.targets)): f for f in (old.fleets if old else [])}
            fleets: list[ShardFleet] = []
            created: list[ShardFleet] = []
            try:  # all or nothing: a channel that cannot be opened (a TLS file mid-rotation) changes nothing
                for spec in topology.fleets:
                    targets = parse_shard_targets(spec.shard_addresses)
                    fleet = kept.pop(tuple(map(tuple, targets)), None)
                    if fleet is None:
                        fleet = ShardFleet(spec.name, targets, self.config.replica_cooldown_s, self.security)
                        created.append(fleet)
                    fleets.append(fleet)
                if old is not None and old.topology.member_address == topology.member_address:
                    member, retired_member = old.member, None
                else:
                    member = MemberPool(topology.member_address, [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
                                        resolve_interval_s=self.config.member_resolve_interval_s,
                                        open_channel=lambda target, options: open_channel(target, self.security, options))
                    retired_member = old.member if old else None
            except BaseException:
                for fleet in created:
                    fleet.close()
                raise
            for spec, fleet in zip(topology.fleets, fleets):
                fleet.name = spec.name
            # Shard calls are blocking calls made on these long-lived threads. A grpc future
            # (`stub.Search.future`) on a channel with no call in flight starts a new polling
            # thread and waits for it to run, i.e. a thread per shard per request: on a busy
            # 2-core machine that cost ~2 ms of a request (benchmarks/results/search_latency_1m.md).
            # Up to MAX_IN_FLIGHT calls per shard per request (the attempt and a hedge). A call
            # overtaken by a hedge cannot be interrupted (blocking calls cannot); its answer is
            # dropped and it ends by its own deadline.
            # (Threads start as calls need them: the bound is what concurrent Retrieves and
            # RetrieveBatch's requests could use at once.)
            retrievals = self.config.grpc_workers + self.config.batch_parallelism
            threads = max(4, retrievals * max(len(f) for f in fleets) * MAX_IN_FLIGHT)
            retired_pool = None
            if threads > self._shard_call_threads:
                retired_pool, self._shard_calls = self._shard_calls, ThreadPoolExecutor(
                    max_workers=threads, thread_name_prefix="shard-call")
                self._shard_call_threads = threads
            self._routing = Routing(fleets, member, topology)
        if old is not None:
            log.info("topology_applied", fleets=[f"{f.name}={f.shard_addresses}" for f in topology.fleets],
                     member=topology.member_address)
            gone = list(kept.values())

            def close() -> None:
                for f in gone:
                    f.close()
                if retired_member is not None:
                    retired_member.close()
                if retired_pool is not None:
                    retired_pool.shutdown(wait=False)

            timer = threading.Timer(RETIRED_LINGER_S, close)
            timer.daemon = True
            timer.start()

    # ------------------------------------------------------------ Retrieve

    def _deadline(self, context: grpc.ServicerContext) -> float:
        remaining = deadline_remaining(context)
        if remaining is None:
            remaining = self.config.default_timeout_s
        margin = max(self.config.deadline_margin_s, self.config.deadline_margin_fraction * remaining)
        return time.monotonic() + max(remaining - margin, 0.0)

    def _member_vector(
        self, member: MemberPool, request: pb.RetrieveRequest, rid: str, deadline: float
    ) -> tuple[np.ndarray, str]:
        if not request.member.member_id:
            raise InvalidRequest("member.member_id is required")
        check_member(request.member, self.config)  # refused here, not after a call to a member pod
        try:
            reply = member.embed(pb.EmbedRequest(member=request.member, request_id=rid), deadline)
        except NoMemberService as exc:
            raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
        except NoMemberPods as exc:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        except DeadlineBeforeCall as exc:
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from exc
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequest(exc.details()) from exc
            # Without a member vector there is nothing to search with: say why, keep the code.
            # Member pods shedding load (RESOURCE_EXHAUSTED) are UNAVAILABLE to the caller:
            # a retry can succeed, and it is not this root that is out of capacity.
            code = exc.code() if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else grpc.StatusCode.UNAVAILABLE
            raise RpcFailure(code, f"member embedding service ({member.address}) failed: {exc.details()}") from exc
        return np.asarray(reply.vector, dtype=np.float32), reply.model_version

    def Retrieve(self, request: pb.RetrieveRequest, context: grpc.ServicerContext) -> pb.RetrieveResponse:
        with rpc_scope(context, "Retrieve", request.request_id) as rid:
            return self._retrieve(request, rid, self._deadline(context))

    def RetrieveBatch(self, request: pb.RetrieveBatchRequest, context: grpc.ServicerContext) -> pb.RetrieveBatchResponse:
        """Each request answered as Retrieve would answer it, on its own (its own status), all
        under the call's deadline. Member vectors are fetched side by side (batch_parallelism
        at once); then the requests bound for one fleet go to each of its shards in one
        SearchBatch call, not one Search each (a shard that does not know SearchBatch, or a
        request whose fleet is not known yet, is searched on its own)."""
        with rpc_scope(context, "RetrieveBatch"):
            n = len(request.requests)
            if not 1 <= n <= self.config.max_batch:
                raise InvalidRequest(f"a batch holds 1 to {self.config.max_batch} requests, got {n}")
            deadline = self._deadline(context)
            routing = self._routing
            rids = [r.request_id or uuid.uuid4().hex[:16] for r in request.requests]
            results: list[pb.RetrieveResponse | Exception | None] = [None] * n

            def query(i: int) -> _Query | Exception:
                with bound(request_id=rids[i], method="RetrieveBatch"):
                    try:
                        return self._query(routing, request.requests[i], rids[i], deadline)
                    except Exception as exc:  # noqa: BLE001 - one request's failure is its own
                        return exc

            queries = list(self._batch_calls.map(query, range(n)))
            by_fleet: dict[int, list[int]] = {}
            alone: list[int] = []
            for i, q in enumerate(queries):
                if isinstance(q, Exception):
                    results[i] = q
                    continue
                order = fleets_to_ask(q.model_version, [f.model_version for f in routing.fleets])
                if order and routing.fleets[order[0]].model_version:  # known to serve the query's model
                    by_fleet.setdefault(order[0], []).append(i)
                else:
                    alone.append(i)  # no fleet (the error says so) or one still to learn about
            for f, members in by_fleet.items():
                packed = self._retrieve_packed(routing.fleets[f], [queries[i] for i in members], deadline)
                for i, answer in zip(members, packed):
                    if answer is None:
                        alone.append(i)
                    else:
                        results[i] = answer

            def single(i: int) -> pb.RetrieveResponse | Exception:
                with bound(request_id=rids[i], method="RetrieveBatch"):
                    try:
                        return self._route(routing, queries[i], deadline)
                    except Exception as exc:  # noqa: BLE001
                        return exc

            for i, answer in zip(alone, self._batch_calls.map(single, alone)):
                results[i] = answer
            out = pb.RetrieveBatchResponse()
            for rid, answer in zip(rids, results):
                if isinstance(answer, pb.RetrieveResponse):
                    out.results.add(code=0, response=answer)
                else:
                    with bound(request_id=rid, method="RetrieveBatch"):
                        code, message = failure_status(answer, "Retrieve")
                    out.results.add(code=code.value[0], message=message)
            return out

    def _retrieve(self, request: pb.RetrieveRequest, rid: str, deadline: float) -> pb.RetrieveResponse:
        """One retrieval, or InvalidRequest/RpcFailure saying why not (the status it answers with)."""
        routing = self._routing  # once: a topology change applies from the next request
        return self._route(routing, self._query(routing, request, rid, deadline), deadline)

    def _query(self, routing: Routing, request: pb.RetrieveRequest, rid: str, deadline: float) -> "_Query":
        """The request checked, with its query vector (the member service's, for a member) and its model."""
        check_k(request.k, self.config.max_k)
        check_filters(request.filters, self.config.max_exclude_post_ids, self.config.max_languages)
        which = request.WhichOneof("query")
        if which is None:
            raise InvalidRequest("a query needs either member or vector")
        if which == "vector":
            raw, model_version = np.asarray(request.vector.values, dtype=np.float32), request.vector.model_version
        else:
            raw, model_version = self._member_vector(routing.member, request, rid, deadline)
        return _Query(request, rid, which, raw, model_version)

    def _route(self, routing: Routing, q: "_Query", deadline: float) -> pb.RetrieveResponse:
        """The query answered by the fleet serving its model (trying the next on failure)."""
        fleets = routing.fleets
        order = fleets_to_ask(q.model_version, [f.model_version for f in fleets])
        if not order:
            raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, self._no_fleet(fleets, q.model_version))
        errors: list[Exception] = []
        for i in order:
            try:
                return self._retrieve_from(fleets[i], q, deadline)
            except (RpcFailure, InvalidRequest) as exc:
                # Another model (learned just now), another width, or down: the next fleet in
                # the order may serve the query's model. Only the last error is not worth saying.
                errors.append(exc)
                log.info("fleet_declined", fleet=fleets[i].name, query_model=q.model_version,
                         error=str(exc), other_model=isinstance(exc, OtherModel))
        # Every fleet declined: say why the one most likely meant for it did.
        raise next((e for e in errors if not isinstance(e, OtherModel)), errors[-1])

    def _no_fleet(self, fleets: list[ShardFleet], model_version: str) -> str:
        serving = ", ".join(f"{f.name} {f.model_version!r}" for f in fleets)
        return f"no shards serve model {model_version!r}, the query vector's (shards: {serving})"

    def _retrieve_from(self, fleet: ShardFleet, q: "_Query", deadline: float) -> pb.RetrieveResponse:
        """The query answered by one fleet's shards; OtherModel when none of them serves its model."""
        vec, depth = self._prepare(fleet, q)
        hits, failed, why, models = self._fan_out(fleet, vec, q.request, q.rid, deadline, depth)
        return self._answer(fleet, q, vec, depth, deadline, hits, failed, why, models)

    def _retrieve_packed(self, fleet: ShardFleet, queries: list["_Query"],
                         deadline: float) -> list[pb.RetrieveResponse | Exception | None]:
        """Queries of one fleet's model answered with one SearchBatch call per shard (the
        coalescer's batch, `_search_together`); per query, its answer, its error, or None: to
        be searched on its own (a fleet that turned out to serve another model)."""
        answers: list[pb.RetrieveResponse | Exception | None] = [None] * len(queries)
        ready: list[tuple[int, np.ndarray, int]] = []
        for j, q in enumerate(queries):
            try:
                vec, depth = self._prepare(fleet, q)
                ready.append((j, vec, depth))
            except InvalidRequest as exc:
                answers[j] = exc
        if not ready:
            return answers
        searched = self._search_together([_ShardQuery(fleet, _search_request(vec, depth, queries[j].request.filters, queries[j].rid), deadline)
                                          for j, vec, depth in ready])
        shards = list(range(len(fleet)))
        for (j, vec, depth), outcomes in zip(ready, searched):
            with bound(request_id=queries[j].rid):
                try:
                    if isinstance(outcomes, Exception):
                        raise outcomes
                    hits, failed, why, models = self._collect(fleet, shards, outcomes, lambda reply: reply)
                    answers[j] = self._answer(fleet, queries[j], vec, depth, deadline, hits, failed, why, models)
                except OtherModel:
                    answers[j] = None
                except (RpcFailure, InvalidRequest) as exc:
                    answers[j] = exc
        return answers

    def _prepare(self, fleet: ShardFleet, q: "_Query") -> tuple[np.ndarray, int]:
        """The query vector as the fleet's shards take it, and how many candidates to ask each for."""
        vec = query_vector(q.raw, fleet.dimension, fleet.vector_dimension)
        if fleet.dimension and len(vec) > fleet.dimension:
            vec = vec[: fleet.dimension]  # full width, the shards serve a prefix (they re-normalise)
        return vec, shard_depth(q.request.k, len(fleet), self.config.shard_depth_sigmas)

    def _answer(self, fleet: ShardFleet, q: "_Query", vec: np.ndarray, depth: int, deadline: float,
                hits: list[ShardHits], failed: list[int], why: list[str], models: dict[int, str]) -> pb.RetrieveResponse:
        """The reply from the shards' answers: one model's candidates merged, shards whose share
        may hold more asked again for k."""
        request, rid, which, model_version = q.request, q.rid, q.which, q.model_version
        # One model's scores only: a shard serving another is left out as if it had failed.
        fleet.model_version = pick_model("", models, fleet.model_version)
        if model_version and fleet.model_version and model_version != fleet.model_version:
            # The fleet serves another model (most of its shards say so): not this query's fleet.
            raise OtherModel(grpc.StatusCode.FAILED_PRECONDITION, self._no_fleet(self.fleets, model_version))
        model_version = model_version or fleet.model_version
        hits = self._one_model(hits, models, model_version, failed, why)
        merged = merge_topk(hits, request.k)
        if depth < request.k:
            # A shard that returned all it was asked for, down to a score that still makes
            # the merged top k (or the merge came up short), may hold more of the top k:
            # ask it again for k. Rare with shards of similar size (shard_depth's margin);
            # what keeps the answer exact when they are not.
            again = [h.shard for h in hits if len(h.post_ids) >= depth and (
                len(merged.post_ids) < request.k or h.scores[-1] >= merged.scores[-1])]
            if again and time.monotonic() < deadline:
                more, _, _, again_models = self._fan_out(fleet, vec, request, rid, deadline, request.k, again)
                more = [h for h in more if again_models[h.shard] in ("", model_version)]
                fuller = {h.shard: h for h in more}
                hits = [fuller.get(h.shard, h) for h in hits]
                merged = merge_topk(hits, request.k)
                for shard in again:
                    root_metrics.ROOT_SHARDS_ASKED_AGAIN.labels(shard=str(shard)).inc()
                log.info("shards_asked_again", shards=again, depth=depth, k=request.k, answered=len(more))
        if not hits and why and set(why) == {OTHER_MODEL}:
            raise OtherModel(grpc.StatusCode.FAILED_PRECONDITION, self._no_fleet(self.fleets, model_version))
        if not hits:
            # No shard answered: an empty list would read as "nothing to show".
            raise RpcFailure(
                grpc.StatusCode.UNAVAILABLE if time.monotonic() < deadline else grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no shard answered ({'; '.join(f'shard {sh}: {w}' for sh, w in zip(failed, why))})",
            )
        resp = pb.RetrieveResponse(
            partial=bool(failed),
            model_version=model_version,
            failed_shards=sorted(failed),
            request_id=rid,
        )
        fill_candidates(resp.candidates, merged.post_ids, merged.scores, merged.shards)
        root_metrics.observe_retrieve(len(merged.post_ids), failed)
        root_metrics.ROOT_FLEET_REPLIES.labels(fleet=fleet.name, model_version=model_version).inc()
        # Every answer is counted (feedret_root_*, grpc_server_*); a line for each would cost
        # the root more than its merge at thousands of queries a second. A partial one, which
        # someone may need to trace, is logged at info with its request id.
        (log.info if failed else log.debug)(
            "retrieved",
            query=which,
            k=request.k,
            returned=len(merged.post_ids),
            partial=bool(failed),
            failed_shards=failed,
            fleet=fleet.name,
            model_version=model_version,
        )
        return resp

    def _submit(self, call, request, timeout: float) -> Future:
        """A blocking shard call started on the pool; the future's result() raises grpc.RpcError as the call would.

        The timeout runs from submission: time spent queued for a thread counts against it.
        """
        deadline = time.monotonic() + timeout
        return self._shard_calls.submit(lambda: call(request, timeout=max(deadline - time.monotonic(), 0.001)))

    def _fan_out(
        self, fleet: ShardFleet, vec: np.ndarray, request: pb.RetrieveRequest, rid: str, deadline: float, k: int,
        shards: list[int] | None = None,
    ) -> tuple[list[ShardHits], list[int], list[str], dict[int, str]]:
        """Search `shards` (default: all) for `k` each; (answers, failed shards, their codes,
        the model each answering shard serves)."""
        search = _search_request(vec, k, request.filters, rid)
        if shards is None and self._coalescer is not None:
            outcomes = self._coalesced(_ShardQuery(fleet, search, deadline))
            if outcomes is not None:
                return self._collect(fleet, list(range(len(fleet))), outcomes, lambda reply: reply)
        shards = list(range(len(fleet))) if shards is None else shards
        return self._collect(fleet, shards, self._search_alone(fleet, shards, search, deadline), lambda reply: reply)

    def _search_alone(self, fleet: ShardFleet, shards: list[int], search: pb.SearchRequest,
                      deadline: float) -> list[Outcome]:
        """One Search to each of `shards` by `deadline` (replicas, hedging); InvalidRequest when
        the shards refuse it."""
        try:
            return call_replicas(
                [fleet.replica_sets[s] for s in shards],
                lambda shard, replica, timeout: self._submit(fleet.search_stubs[shard][replica].Search, search, timeout),
                deadline, self.hedge_after_s, fatal=_is_invalid_argument, budget=self.hedge_budget,
            )
        except Fatal as exc:
            raise InvalidRequest(exc.error.details()) from exc

    def _coalesced(self, query: _ShardQuery) -> list[Outcome] | None:
        """The query's first round through the coalescer; None when it was not taken into a batch
        before the batch in flight stalled (ran past coalesce_wait_ms and several times the
        recent batches' time: a shard hanging until the deadline) or half its time went, so
        that it goes on its own and still gets the other shards' answers in time."""
        remaining = max(query.deadline - time.monotonic(), 0.0)
        try:
            # Its batch's shard calls end by the batch's earliest deadline, at most this query's:
            # the backstop is only for a batch that could not even start its calls.
            outcomes = self._coalescer.call(query, timeout=remaining + 0.25,
                                            start_within=remaining / 2,
                                            stalled_after=self.config.coalesce_wait_ms / 1000)
        except NotStarted:
            return None
        except TimeoutError:
            outcomes = [Outcome(shard, timed_out=True) for shard in range(len(query.fleet))]
        if isinstance(outcomes, Exception):
            raise outcomes
        return outcomes

    def _search_together(self, queries: list[_ShardQuery]) -> list[list[Outcome] | Exception]:
        """The coalescer's batch (one fleet's): per query, every shard's outcome, its reply that
        query's SearchResponse; or the InvalidRequest a shard refused it with. One query goes
        as a plain Search; shards without SearchBatch, or one refusing a query, get each alone."""
        fleet = queries[0].fleet
        shards = list(range(len(fleet)))
        if len(queries) > 1:
            batch = pb.SearchBatchRequest(searches=[q.search for q in queries])
            try:
                outcomes = call_replicas(
                    [fleet.replica_sets[s] for s in shards],
                    lambda shard, replica, timeout: self._submit(fleet.search_stubs[shard][replica].SearchBatch, batch, timeout),
                    # The earliest deadline: a query must get the shards that answered by its own,
                    # partial, not wait on a slow shard for a later query's.
                    min(q.deadline for q in queries), self.hedge_after_s, fatal=_is_invalid_argument,
                    budget=self.hedge_budget,
                )
            except Fatal:
                outcomes = None  # a query the shards refuse: each alone, so only that one fails
            if outcomes is not None and not any(
                    not o.ok and _failure_code(o) == grpc.StatusCode.UNIMPLEMENTED.name for o in outcomes):
                return [[dataclasses.replace(o, reply=o.reply.results[n]) if o.ok else o for o in outcomes]
                        for n in range(len(queries))]
        out: list[list[Outcome] | Exception] = []
        for q in queries:
            try:
                out.append(self._search_alone(fleet, shards, q.search, q.deadline))
            except InvalidRequest as exc:
                out.append(exc)
        return out

    def _collect(self, fleet: ShardFleet, shards: list[int], outcomes: list[Outcome],
                 answer: Callable[[object], pb.SearchResponse]) -> tuple[list[ShardHits], list[int], list[str], dict[int, str]]:
        """(answers, failed shards, their codes, the model each answering shard serves) of one
        query, from each shard's outcome (`answer` picks the query's part of a reply)."""
        hits: list[ShardHits] = []
        models: dict[int, str] = {}
        failed: list[int] = []
        why: list[str] = []  # per failed shard, its status code: the caller sees it when no shard answered
        for shard, outcome in zip(shards, outcomes):
            root_metrics.observe_replica_attempts(shard, outcome.attempts)
            if outcome.hedge_denied:
                root_metrics.ROOT_HEDGES_DENIED.labels(shard=str(shard)).inc()
            if outcome.hedged or outcome.failed_over:
                log.info("shard_replicas_tried", shard=shard, attempts=self._attempts(fleet, shard, outcome))
            if not outcome.ok:
                code = _failure_code(outcome)
                failed.append(shard)
                why.append(code)
                root_metrics.ROOT_SHARD_FAILURES.labels(shard=str(shard), code=code).inc()
                log.warning("shard_failed", shard=shard, code=code, attempts=self._attempts(fleet, shard, outcome),
                            details=_failure_details(outcome))
                continue
            reply: pb.SearchResponse = answer(outcome.reply)
            if reply.dimension:
                fleet.dimension = reply.dimension
                fleet.vector_dimension = reply.vector_dimension
            models[shard] = reply.model_version
            hits.append(
                ShardHits(
                    shard=shard,
                    post_ids=np.asarray(reply.candidates.post_ids, dtype=np.int64),
                    scores=np.asarray(reply.candidates.scores, dtype=np.float32),
                )
            )
        return hits, failed, why, models

    def _one_model(self, hits: list[ShardHits], models: dict[int, str], model_version: str,
                   failed: list[int], why: list[str]) -> list[ShardHits]:
        """`hits` of shards serving `model_version` (or none yet); the others join `failed`."""
        kept = []
        for h in hits:
            served = models.get(h.shard, "")
            if not served or not model_version or served == model_version:
                kept.append(h)
                continue
            failed.append(h.shard)
            why.append(OTHER_MODEL)
            root_metrics.ROOT_SHARD_FAILURES.labels(shard=str(h.shard), code=OTHER_MODEL).inc()
            log.warning("shard_other_model", shard=h.shard, shard_model=served, query_model=model_version)
        return kept

    def _attempts(self, fleet: ShardFleet, shard: int, outcome: Outcome) -> list[str]:
        """The attempts for a log line: "target kind result"."""
        targets = fleet.replica_sets[shard].targets
        return [f"{targets[r]} {kind} {how}" for r, kind, how in outcome.attempts]

    # ------------------------------------------------------------ IndexAdmin

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        with rpc_scope(context, "Lookup", f"lookup-{request.post_id}"):
            if request.post_id < 0:
                raise InvalidRequest(f"post_id must be >= 0, got {request.post_id}")
            serving = self.serving
            shard = shard_of(request.post_id, len(serving.replica_sets))
            # The shard's replicas as for a search: a replica that is down or still
            # catching up (UNAVAILABLE) is skipped for the next.
            try:
                (outcome,) = call_replicas(
                    [serving.replica_sets[shard]],
                    lambda _shard, replica, timeout: self._submit(serving.admin_stubs[shard][replica].Lookup, request, timeout),
                    time.monotonic() + self.config.default_timeout_s,
                    self.hedge_after_s,
                    fatal=_is_invalid_argument,
                )
            except Fatal as exc:
                raise InvalidRequest(exc.error.details()) from exc
            if not outcome.ok:
                raise RpcFailure(
                    grpc.StatusCode.UNAVAILABLE,
                    f"shard {shard} ({serving.addresses[shard]}) did not answer: {_failure_details(outcome)}",
                )
            reply: pb.LookupResponse = outcome.reply
            reply.shard = shard
            return reply

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        """Every replica's Stats; per shard, its most caught-up ready replica's, with all of them under `replicas`."""
        with rpc_scope(context, "Stats"):
            timeout = self.config.default_timeout_s
            serving = self.serving
            calls = [
                [self._submit(stub.Stats, pb.StatsRequest(), timeout) for stub in stubs] for stubs in serving.admin_stubs
            ]
            resp = pb.StatsResponse()
            for shard, futures in enumerate(calls):
                replicas = []
                for target, future in zip(serving.replica_sets[shard].targets, futures):
                    try:
                        part = future.result().shards[0]
                    except grpc.RpcError as exc:
                        part = pb.ShardStats(reachable=False, error=exc.details() or exc.code().name)
                    part.shard = shard
                    part.address = target  # the target the root calls, not the address the replica binds
                    replicas.append(part)
                entry = shard_summary(shard, serving.addresses[shard], replicas)
                resp.shards.append(entry)
                resp.total_indexed += entry.indexed
                resp.model_version = resp.model_version or entry.model_version
            return resp


# The code a shard serving another model than the query's is counted and reported under.
OTHER_MODEL = "OTHER_MODEL"


class OtherModel(RpcFailure):
    """No shard of a fleet serves the query's model (FAILED_PRECONDITION unless another fleet does)."""


def pick_model(stated: str, served: dict[int, str], learned: str) -> str:
    """The model a query's candidates must come from.

    The query's own (the member service's model, or the one a vector query names) when
    it has one; else the model most answering shards serve, ties going to the one the
    root served last (`learned`), then to the name. "" when nothing names a model.
    """
    if stated:
        return stated
    counts: dict[str, int] = {}
    for model in served.values():
        if model:
            counts[model] = counts.get(model, 0) + 1
    if not counts:
        return learned
    return max(counts, key=lambda m: (counts[m], m == learned, m))


def shard_channel_options(target: str) -> list[tuple[str, object]]:
    """Channel options for one shard replica target.

    A dns: pool gets round_robin: calls spread over every address it resolves to
    (pick_first, the default, would send them all to one replica). A plain
    host:port keeps pick_first: round_robin would also reconnect eagerly while the
    replica is down, backing off so that it stays unreachable for seconds after it
    is back. Either way reconnection backs off to at most 2 s (default 120 s), so a
    restarted replica is asked again soon after it listens.
    """
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if is_pool(target):
        options.append(("grpc.service_config", ROUND_ROBIN))
    return options


def shard_summary(shard: int, address: str, replicas: list[pb.ShardStats]) -> pb.ShardStats:
    """One shard's Stats entry from its replicas': the most caught-up ready replica's
    (else the most caught-up reachable one's), searches summed, every replica listed."""

    def rank(r: pb.ShardStats) -> tuple:
        return (r.reachable, r.ready, sum(o.offset for o in r.applied))

    entry = pb.ShardStats()
    best = max(replicas, key=rank)
    if best.reachable:
        entry.CopyFrom(best)
    else:
        entry.error = "; ".join(f"{r.address}: {r.error}" for r in replicas)
    entry.shard = shard
    entry.address = address
    entry.reachable = any(r.reachable for r in replicas)
    entry.ready = any(r.ready for r in replicas)
    entry.searches = sum(r.searches for r in replicas)
    del entry.replicas[:]
    entry.replicas.extend(replicas)
    return entry


def _is_invalid_argument(exc: BaseException) -> bool:
    # The request is wrong: every replica would say so; the caller gets it, not a partial answer.
    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.INVALID_ARGUMENT


def _failure_code(outcome: Outcome) -> str:
    if outcome.timed_out or outcome.error is None:
        return grpc.StatusCode.DEADLINE_EXCEEDED.name
    code = getattr(outcome.error, "code", None)
    return code().name if callable(code) else grpc.StatusCode.UNKNOWN.name


def _failure_details(outcome: Outcome) -> str:
    if outcome.timed_out or outcome.error is None:
        return "no replica answered before the deadline"
    details = getattr(outcome.error, "details", None)
    return (details() if callable(details) else None) or str(outcome.error)


def watch_topology(servicer: RootServicer, path: Path, poll_s: float, stop: threading.Event) -> None:
    """Apply the generations file whenever it changes (its content, not only its time: a
    ConfigMap update replaces a symlink). A file that cannot be read or is invalid is
    logged and the root keeps serving what it served."""
    seen, said = servicer._routing.topology, ""
    while not stop.wait(poll_s):
        try:
            topology = read_topology(path)
            if topology != seen:
                servicer.apply_topology(topology)
                seen = topology
            said = ""
        except Exception as exc:  # noqa: BLE001 - keep serving, keep watching: the next poll retries
            if str(exc) != said:  # once per distinct problem, not every poll
                log.error("generations_file_not_applied", path=str(path), error=f"{type(exc).__name__}: {exc}")
                said = str(exc)


def serve(config: RootConfig, stop: threading.Event, security: GrpcSecurityConfig | None = None) -> None:
    try:
        topology = topology_of(config)
    except ValueError as exc:
        raise SystemExit(f"FEEDRET_GENERATIONS_FILE: {exc}") from None
    servicer = RootServicer(config, security, topology)
    if config.generations_file:
        threading.Thread(target=watch_topology, name="generations-file", daemon=True,
                         args=(servicer, Path(config.generations_file), config.generations_poll_s, stop)).start()
    server, health_servicer, port = build_server(
        config.host,
        config.port,
        config.grpc_workers,
        [
            lambda s: pb_grpc.add_RetrievalServiceServicer_to_server(servicer, s),
            lambda s: pb_grpc.add_IndexAdminServicer_to_server(servicer, s),
        ],
        SERVICE_NAMES,
        connection_age_options(config.max_connection_age_s),
        security,
        max_concurrent_rpcs=config.max_concurrent_rpcs or config.grpc_workers,
    )
    with serving(server, health_servicer, SERVICE_NAMES):  # no state: it serves as soon as it listens
        log.info("root_listening", address=f"{config.host}:{port}", shards=servicer.serving.addresses,
                 next_shards=[a for f in servicer.fleets[1:] for a in f.addresses],
                 max_concurrent_rpcs=config.max_concurrent_rpcs or config.grpc_workers)
        stop.wait()
    log.info("root_stopped")
