from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Activity(_message.Message):
    __slots__ = ("post_id", "text", "action", "timestamp")
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    post_id: int
    text: str
    action: str
    timestamp: float
    def __init__(self, post_id: _Optional[int] = ..., text: _Optional[str] = ..., action: _Optional[str] = ..., timestamp: _Optional[float] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("member_id", "session_id", "profile", "features", "recent_activity")
    class ProfileEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    RECENT_ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    session_id: str
    profile: _containers.ScalarMap[str, str]
    features: _containers.ScalarMap[str, float]
    recent_activity: _containers.RepeatedCompositeFieldContainer[Activity]
    def __init__(self, member_id: _Optional[str] = ..., session_id: _Optional[str] = ..., profile: _Optional[_Mapping[str, str]] = ..., features: _Optional[_Mapping[str, float]] = ..., recent_activity: _Optional[_Iterable[_Union[Activity, _Mapping]]] = ...) -> None: ...

class Filters(_message.Message):
    __slots__ = ("exclude_post_ids", "max_age_seconds", "languages")
    EXCLUDE_POST_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LANGUAGES_FIELD_NUMBER: _ClassVar[int]
    exclude_post_ids: _containers.RepeatedScalarFieldContainer[int]
    max_age_seconds: int
    languages: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, exclude_post_ids: _Optional[_Iterable[int]] = ..., max_age_seconds: _Optional[int] = ..., languages: _Optional[_Iterable[str]] = ...) -> None: ...

class QueryVector(_message.Message):
    __slots__ = ("values", "model_version")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    model_version: str
    def __init__(self, values: _Optional[_Iterable[float]] = ..., model_version: _Optional[str] = ...) -> None: ...

class Candidates(_message.Message):
    __slots__ = ("post_ids", "scores", "shards")
    POST_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    post_ids: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    shards: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, post_ids: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ..., shards: _Optional[_Iterable[int]] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("member", "vector", "k", "filters", "request_id")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    member: Member
    vector: QueryVector
    k: int
    filters: Filters
    request_id: str
    def __init__(self, member: _Optional[_Union[Member, _Mapping]] = ..., vector: _Optional[_Union[QueryVector, _Mapping]] = ..., k: _Optional[int] = ..., filters: _Optional[_Union[Filters, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("candidates", "partial", "model_version", "failed_shards", "request_id")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FAILED_SHARDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    candidates: Candidates
    partial: bool
    model_version: str
    failed_shards: _containers.RepeatedScalarFieldContainer[int]
    request_id: str
    def __init__(self, candidates: _Optional[_Union[Candidates, _Mapping]] = ..., partial: _Optional[bool] = ..., model_version: _Optional[str] = ..., failed_shards: _Optional[_Iterable[int]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RetrieveBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RetrieveRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[RetrieveRequest, _Mapping]]] = ...) -> None: ...

class RetrieveBatchResult(_message.Message):
    __slots__ = ("code", "message", "response")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    response: RetrieveResponse
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., response: _Optional[_Union[RetrieveResponse, _Mapping]] = ...) -> None: ...

class RetrieveBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RetrieveBatchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[RetrieveBatchResult, _Mapping]]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("member", "request_id")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    member: Member
    request_id: str
    def __init__(self, member: _Optional[_Union[Member, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("vector", "model_version", "cached")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    vector: _containers.RepeatedScalarFieldContainer[float]
    model_version: str
    cached: bool
    def __init__(self, vector: _Optional[_Iterable[float]] = ..., model_version: _Optional[str] = ..., cached: _Optional[bool] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("vector", "k", "filters", "request_id")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    vector: _containers.RepeatedScalarFieldContainer[float]
    k: int
    filters: Filters
    request_id: str
    def __init__(self, vector: _Optional[_Iterable[float]] = ..., k: _Optional[int] = ..., filters: _Optional[_Union[Filters, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("candidates", "shard", "indexed", "dimension", "model_version", "vector_dimension")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    INDEXED_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    candidates: Candidates
    shard: int
    indexed: int
    dimension: int
    model_version: str
    vector_dimension: int
    def __init__(self, candidates: _Optional[_Union[Candidates, _Mapping]] = ..., shard: _Optional[int] = ..., indexed: _Optional[int] = ..., dimension: _Optional[int] = ..., model_version: _Optional[str] = ..., vector_dimension: _Optional[int] = ...) -> None: ...

class SearchBatchRequest(_message.Message):
    __slots__ = ("searches",)
    SEARCHES_FIELD_NUMBER: _ClassVar[int]
    searches: _containers.RepeatedCompositeFieldContainer[SearchRequest]
    def __init__(self, searches: _Optional[_Iterable[_Union[SearchRequest, _Mapping]]] = ...) -> None: ...

class SearchBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResponse, _Mapping]]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("post_id", "include_vector")
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTOR_FIELD_NUMBER: _ClassVar[int]
    post_id: int
    include_vector: bool
    def __init__(self, post_id: _Optional[int] = ..., include_vector: _Optional[bool] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("found", "shard", "indexed_at", "created_at", "lang", "model_version", "vector")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    INDEXED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LANG_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    found: bool
    shard: int
    indexed_at: float
    created_at: float
    lang: str
    model_version: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, found: _Optional[bool] = ..., shard: _Optional[int] = ..., indexed_at: _Optional[float] = ..., created_at: _Optional[float] = ..., lang: _Optional[str] = ..., model_version: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ...) -> None: ...

class PartitionOffset(_message.Message):
    __slots__ = ("topic", "partition", "offset")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    topic: str
    partition: int
    offset: int
    def __init__(self, topic: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class ShardStats(_message.Message):
    __slots__ = ("shard", "address", "reachable", "indexed", "dimension", "index_type", "applied", "upserts", "deletes", "error", "model_version", "rejected", "vector_dimension", "index_state", "buffered", "tombstones", "evicted", "rebuilds", "retention_s", "searches", "ready", "replicas", "end_offset", "index_device", "vector_codec", "vector_bytes")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    INDEXED_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    UPSERTS_FIELD_NUMBER: _ClassVar[int]
    DELETES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    VECTOR_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_STATE_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_FIELD_NUMBER: _ClassVar[int]
    TOMBSTONES_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    REBUILDS_FIELD_NUMBER: _ClassVar[int]
    RETENTION_S_FIELD_NUMBER: _ClassVar[int]
    SEARCHES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    INDEX_DEVICE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_CODEC_FIELD_NUMBER: _ClassVar[int]
    VECTOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    shard: int
    address: str
    reachable: bool
    indexed: int
    dimension: int
    index_type: str
    applied: _containers.RepeatedCompositeFieldContainer[PartitionOffset]
    upserts: int
    deletes: int
    error: str
    model_version: str
    rejected: int
    vector_dimension: int
    index_state: str
    buffered: int
    tombstones: int
    evicted: int
    rebuilds: int
    retention_s: float
    searches: int
    ready: bool
    replicas: _containers.RepeatedCompositeFieldContainer[ShardStats]
    end_offset: int
    index_device: str
    vector_codec: str
    vector_bytes: int
    def __init__(self, shard: _Optional[int] = ..., address: _Optional[str] = ..., reachable: _Optional[bool] = ..., indexed: _Optional[int] = ..., dimension: _Optional[int] = ..., index_type: _Optional[str] = ..., applied: _Optional[_Iterable[_Union[PartitionOffset, _Mapping]]] = ..., upserts: _Optional[int] = ..., deletes: _Optional[int] = ..., error: _Optional[str] = ..., model_version: _Optional[str] = ..., rejected: _Optional[int] = ..., vector_dimension: _Optional[int] = ..., index_state: _Optional[str] = ..., buffered: _Optional[int] = ..., tombstones: _Optional[int] = ..., evicted: _Optional[int] = ..., rebuilds: _Optional[int] = ..., retention_s: _Optional[float] = ..., searches: _Optional[int] = ..., ready: _Optional[bool] = ..., replicas: _Optional[_Iterable[_Union[ShardStats, _Mapping]]] = ..., end_offset: _Optional[int] = ..., index_device: _Optional[str] = ..., vector_codec: _Optional[str] = ..., vector_bytes: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("shards", "total_indexed", "model_version")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_INDEXED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardStats]
    total_indexed: int
    model_version: str
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardStats, _Mapping]]] = ..., total_indexed: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class PostVectorEvent(_message.Message):
    __slots__ = ("post_id", "op", "vector", "created_at", "lang", "model_version", "source_partition", "source_offset", "embedded_at")
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OP_UNSPECIFIED: _ClassVar[PostVectorEvent.Op]
        UPSERT: _ClassVar[PostVectorEvent.Op]
        DELETE: _ClassVar[PostVectorEvent.Op]
    OP_UNSPECIFIED: PostVectorEvent.Op
    UPSERT: PostVectorEvent.Op
    DELETE: PostVectorEvent.Op
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LANG_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PARTITION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EMBEDDED_AT_FIELD_NUMBER: _ClassVar[int]
    post_id: int
    op: PostVectorEvent.Op
    vector: _containers.RepeatedScalarFieldContainer[float]
    created_at: float
    lang: str
    model_version: str
    source_partition: int
    source_offset: int
    embedded_at: float
    def __init__(self, post_id: _Optional[int] = ..., op: _Optional[_Union[PostVectorEvent.Op, str]] = ..., vector: _Optional[_Iterable[float]] = ..., created_at: _Optional[float] = ..., lang: _Optional[str] = ..., model_version: _Optional[str] = ..., source_partition: _Optional[int] = ..., source_offset: _Optional[int] = ..., embedded_at: _Optional[float] = ...) -> None: ...
