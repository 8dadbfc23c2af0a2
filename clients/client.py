"""FeedretClient: the feed backend's view of feedret, blocking and asyncio.

    with FeedretClient("127.0.0.1:50051") as client:   # or "dns:///feedret-root-pods:50051" in Kubernetes
        result = client.retrieve(member=MemberProfile("m1", "s1", ...), k=2000, timeout=0.05)
        for c in result.candidates: ...
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from feedret.grpc_client import MAX_MESSAGE_BYTES, AioBearerToken, with_token
from feedret.members import MemberProfile
from feedret.shard_targets import ROUND_ROBIN
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

DEFAULT_ROOT_ADDRESS = "127.0.0.1:50051"
_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def channel_options(address: str) -> list[tuple[str, object]]:
    """Options for a channel to the root at `address`.

    Roots are stateless, so a `dns:///name:port` address (a headless Service listing
    the root pods) or a static `ipv4:host:port,host:port` list gets round_robin:
    every call goes to the next pod. Any other
    address keeps gRPC's pick_first: one connection, which the root ends after
    FEEDRET_MAX_CONNECTION_AGE_S so that callers behind a virtual IP move over time.
    """
    options = list(_OPTIONS)
    if address.split(":", 1)[0] in ("dns", "ipv4", "ipv6"):  # name resolving to pods, or a static list
        options.append(("grpc.service_config", ROUND_ROBIN))
    return options


def _open(module, address: str, credentials: grpc.ChannelCredentials | None, server_name: str | None,
          interceptors=None):
    """A channel from `module` (grpc or grpc.aio): TLS with credentials, else plaintext."""
    options = channel_options(address)
    extra = {"interceptors": interceptors} if interceptors else {}
    if credentials is None:
        return module.insecure_channel(address, options=options, **extra)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return module.secure_channel(address, credentials, options=options, **extra)


def _token_source(token: str | Callable[[], str] | None) -> Callable[[], str] | None:
    if token is None or callable(token):
        return token
    return lambda: token


@dataclass(frozen=True)
class Candidate:
    post_id: int
    score: float
    shard: int


@dataclass(frozen=True, eq=False)
class RetrieveResult:
    """One retrieval. The candidates arrive as packed arrays and stay numpy arrays
    (`ids`, `scores`, `shards`): building 2,000 `Candidate` objects per request costs
    milliseconds, so `candidates` is only built when first read."""

    ids: np.ndarray  # int64, best first
    scores: np.ndarray  # float32
    shards: np.ndarray  # int32: the shard each candidate came from
    partial: bool
    failed_shards: list[int]
    model_version: str
    request_id: str

    @cached_property
    def candidates(self) -> list[Candidate]:
        return [Candidate(p, s, sh) for p, s, sh in zip(self.ids.tolist(), self.scores.tolist(), self.shards.tolist())]

    @property
    def post_ids(self) -> list[int]:
        return self.ids.tolist()


def build_request(
    *,
    member: MemberProfile | None,
    vector: Sequence[float] | np.ndarray | None,
    k: int,
    exclude_post_ids: Sequence[int] = (),
    max_age_seconds: int = 0,
    languages: Sequence[str] = (),
    request_id: str = "",
    model_version: str = "",
) -> pb.RetrieveRequest:
    req = pb.RetrieveRequest(k=k, request_id=request_id or uuid.uuid4().hex[:16])
    if member is not None:
        member.fill_proto(req.member)
    if vector is not None:
        req.vector.values.extend(np.asarray(vector, dtype=np.float32).tolist())
        req.vector.model_version = model_version  # only shards of this model are merged
    req.filters.exclude_post_ids.extend(int(p) for p in exclude_post_ids)
    req.filters.max_age_seconds = int(max_age_seconds)
    req.filters.languages.extend(languages)
    return req


@dataclass(frozen=True)
class Query:
    """One request of a batch (`retrieve_batch`): the arguments `retrieve` takes."""

    member: MemberProfile | None = None
    vector: Sequence[float] | np.ndarray | None = None
    k: int = 100
    exclude_post_ids: Sequence[int] = ()
    max_age_seconds: int = 0
    languages: Sequence[str] = ()
    request_id: str = ""
    model_version: str = ""

    def request(self) -> pb.RetrieveRequest:
        return build_request(member=self.member, vector=self.vector, k=self.k, exclude_post_ids=self.exclude_post_ids,
                             max_age_seconds=self.max_age_seconds, languages=self.languages,
                             request_id=self.request_id, model_version=self.model_version)


@dataclass(frozen=True)
class RetrieveError:
    """A request of a batch that was not answered: the status `retrieve` would have raised."""

    code: grpc.StatusCode
    message: str


_STATUS = {code.value[0]: code for code in grpc.StatusCode}


def to_batch_results(resp: pb.RetrieveBatchResponse) -> list[RetrieveResult | RetrieveError]:
    return [to_result(r.response) if r.code == 0 else RetrieveError(_STATUS.get(r.code, grpc.StatusCode.UNKNOWN), r.message)
            for r in resp.results]


def to_result(resp: pb.RetrieveResponse) -> RetrieveResult:
    c = resp.candidates
    return RetrieveResult(
        ids=np.asarray(c.post_ids, dtype=np.int64),
        scores=np.asarray(c.scores, dtype=np.float32),
        shards=np.asarray(c.shards, dtype=np.int32),
        partial=resp.partial,
        failed_shards=list(resp.failed_shards),
        model_version=resp.model_version,
        request_id=resp.request_id,
    )


class _RootCalls:
    """What both faces share: the stubs on one channel to the root, and every request they
    send. The faces differ only in how a call is made (blocking, or awaited)."""

    def __init__(self, address: str, channel: Any) -> None:
        self.address = address
        self._channel = channel
        self._retrieval = pb_grpc.RetrievalServiceStub(channel)
        self._admin = pb_grpc.IndexAdminStub(channel)

    @staticmethod
    def _lookup_request(post_id: int, include_vector: bool) -> pb.LookupRequest:
        return pb.LookupRequest(post_id=post_id, include_vector=include_vector)


class FeedretClient(_RootCalls):
    """Blocking client for the root server (RetrievalService and IndexAdmin)."""

    def __init__(
        self,
        address: str = DEFAULT_ROOT_ADDRESS,
        *,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
        token: str | Callable[[], str] | None = None,
    ) -> None:
        """`credentials`: TLS to a root that serves it (`grpc.ssl_channel_credentials(ca, key, cert)`);
        `server_name`: the name to expect in the root's certificate when the address's host is not in it;
        `token`: a bearer token sent with every call (or a function returning the current one)."""
        super().__init__(address, with_token(channel or _open(grpc, address, credentials, server_name), _token_source(token)))

    def retrieve(
        self,
        *,
        member: MemberProfile | None = None,
        vector: Sequence[float] | np.ndarray | None = None,
        k: int = 100,
        exclude_post_ids: Sequence[int] = (),
        max_age_seconds: int = 0,
        languages: Sequence[str] = (),
        timeout: float | None = 1.0,
        request_id: str = "",
        model_version: str = "",
    ) -> RetrieveResult:
        req = build_request(member=member, vector=vector, k=k, exclude_post_ids=exclude_post_ids,
                            max_age_seconds=max_age_seconds, languages=languages, request_id=request_id,
                            model_version=model_version)
        return to_result(self._retrieval.Retrieve(req, timeout=timeout))

    def retrieve_batch(self, queries: Sequence[Query], *, timeout: float | None = 5.0) -> list[RetrieveResult | RetrieveError]:
        """Many retrievals in one call, answered in order, each on its own: a RetrieveResult,
        or a RetrieveError with the status `retrieve` would have raised for it."""
        req = pb.RetrieveBatchRequest(requests=[q.request() for q in queries])
        return to_batch_results(self._retrieval.RetrieveBatch(req, timeout=timeout))

    def lookup(self, post_id: int, *, include_vector: bool = False, timeout: float | None = 2.0) -> pb.LookupResponse:
        return self._admin.Lookup(self._lookup_request(post_id, include_vector), timeout=timeout)

    def stats(self, *, timeout: float | None = 5.0) -> pb.StatsResponse:
        return self._admin.Stats(pb.StatsRequest(), timeout=timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "FeedretClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncFeedretClient(_RootCalls):
    """asyncio client with the same methods, for grpc.aio-based backends."""

    def __init__(
        self,
        address: str = DEFAULT_ROOT_ADDRESS,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
        token: str | Callable[[], str] | None = None,
    ) -> None:
        source = _token_source(token)
        interceptors = [AioBearerToken(source)] if source is not None else None
        super().__init__(address, _open(grpc.aio, address, credentials, server_name, interceptors))

    async def retrieve(
        self,
        *,
        member: MemberProfile | None = None,
        vector: Sequence[float] | np.ndarray | None = None,
        k: int = 100,
        exclude_post_ids: Sequence[int] = (),
        max_age_seconds: int = 0,
        languages: Sequence[str] = (),
        timeout: float | None = 1.0,
        request_id: str = "",
        model_version: str = "",
    ) -> RetrieveResult:
        req = build_request(member=member, vector=vector, k=k, exclude_post_ids=exclude_post_ids,
                            max_age_seconds=max_age_seconds, languages=languages, request_id=request_id,
                            model_version=model_version)
        return to_result(await self._retrieval.Retrieve(req, timeout=timeout))

    async def retrieve_batch(self, queries: Sequence[Query], *,
                             timeout: float | None = 5.0) -> list[RetrieveResult | RetrieveError]:
        req = pb.RetrieveBatchRequest(requests=[q.request() for q in queries])
        return to_batch_results(await self._retrieval.RetrieveBatch(req, timeout=timeout))

    async def lookup(self, post_id: int, *, include_vector: bool = False, timeout: float | None = 2.0) -> pb.LookupResponse:
        return await self._admin.Lookup(self._lookup_request(post_id, include_vector), timeout=timeout)

    async def stats(self, *, timeout: float | None = 5.0) -> pb.StatsResponse:
        return await self._admin.Stats(pb.StatsRequest(), timeout=timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncFeedretClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
