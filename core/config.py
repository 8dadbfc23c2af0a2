"""Typed configuration, one object per role, read from the environment.

Every setting has an environment variable `FEEDRET_<NAME>` (the broker address
also answers to the standard `KAFKA_BOOTSTRAP_SERVERS`). Objects are built once
at process start and passed in; nothing reads the environment later.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from feedret.shard_targets import parse_member_targets, parse_shard_targets

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent  # a checkout's root; for an installed wheel, site-packages
IN_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file()
# Where runs, reports and `feedret up`'s work go by default: var/ of the checkout, else of the
# directory the command runs in (never inside site-packages).
WORK_ROOT = REPO_ROOT if IN_CHECKOUT else Path.cwd()


def _shipped(in_checkout: Path, in_package: Path) -> Path:
    """A file feedret ships: the checkout's copy when run from one, else the copy installed
    inside the package (pyproject's package-data)."""
    return in_checkout if IN_CHECKOUT else in_package


# Trained on MovieLens by `feedret train --config training/configs/movielens-tiny.json`.
DEFAULT_MODEL_DIR = _shipped(REPO_ROOT / "models" / "feedret-movielens-tiny", PACKAGE_DIR / "models" / "feedret-movielens-tiny")
# The sample feed `feedret up` publishes (MovieLens-derived; research use only, see its NOTICE.md).
SAMPLE_DIR = _shipped(REPO_ROOT / "data" / "sample", PACKAGE_DIR / "sample")

DEFAULT_ROOT_PORT = 50051
DEFAULT_MEMBER_PORT = 50052
DEFAULT_SHARD_BASE_PORT = 50061
DEFAULT_BROKER_PORT = 19092
# Prometheus /metrics of each role (FEEDRET_METRICS_PORT; 0: off). In a pod every
# shard uses the same port; `feedret up` gives shard i base + i on one host.
DEFAULT_ROOT_METRICS_PORT = 9451
DEFAULT_MEMBER_METRICS_PORT = 9452
DEFAULT_CONSUMER_METRICS_PORT = 9453
DEFAULT_SHARD_METRICS_BASE_PORT = 9461


class _Settings(BaseSettings):
    # populate_by_name: code passes settings by field name, whatever their variable's name.
    model_config = SettingsConfigDict(env_prefix="FEEDRET_", extra="ignore", frozen=True, populate_by_name=True)


def _kafka_setting(default, name: str):
    """A KafkaConfig field read from FEEDRET_KAFKA_<NAME>."""
    return Field(default=default, validation_alias=AliasChoices(f"FEEDRET_KAFKA_{name.upper()}"))


class KafkaConfig(_Settings):
    bootstrap_servers: str = Field(
        default=f"127.0.0.1:{DEFAULT_BROKER_PORT}",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "FEEDRET_KAFKA_BOOTSTRAP_SERVERS"),
    )
    posts_topic: str = "posts"
    vectors_topic: str = "post-vectors"
    dlq_topic: str = "posts-dlq"
    # Partitions of `posts` bound how many embedding consumers can work in parallel.
    posts_partitions: int = Field(default=4, ge=1)
    consumer_group: str = "feedret-embedder"
    # kafka-python's defaults make a group join take ~20 s; these keep
    # rebalances short without being broker-specific.
    session_timeout_ms: int = Field(default=6000, ge=1000)
    heartbeat_interval_ms: int = Field(default=1000, ge=100)
    max_poll_interval_ms: int = Field(default=60000, ge=1000)
    # The longest a fetch waits at the broker when the partition has nothing new, for
    # the shard appliers and the embedding consumer. Apache Kafka answers a waiting fetch
    # as soon as a record lands, so this costs nothing there; brokers that do not (the
    # embedded tansu, and some Kafka-protocol gateways) hold it to the end, which added
    # ~80 ms p50 from publish to searchable at kafka-python's 500 (benchmarks/results/
    # freshness.md). 100 ms bounds that for ~10 empty fetches a second per idle partition.
    fetch_max_wait_ms: int = Field(
        default=100, ge=1, le=60000, validation_alias=AliasChoices("FEEDRET_KAFKA_FETCH_MAX_WAIT_MS")
    )
    # Connection security, as a Strimzi (or any) Kafka with a TLS or SCRAM listener asks:
    # PLAINTEXT, SSL (TLS; mutual with ssl_certfile + ssl_keyfile), SASL_PLAINTEXT or SASL_SSL.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = _kafka_setting("PLAINTEXT", "security_protocol")
    # PEM files; ssl_cafile: the cluster CA (Strimzi's <cluster>-cluster-ca-cert Secret, ca.crt).
    ssl_cafile: Path | None = _kafka_setting(None, "ssl_cafile")
    ssl_certfile: Path | None = _kafka_setting(None, "ssl_certfile")
    ssl_keyfile: Path | None = _kafka_setting(None, "ssl_keyfile")
    ssl_check_hostname: bool = _kafka_setting(True, "ssl_check_hostname")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = _kafka_setting(None, "sasl_mechanism")
    sasl_username: str | None = _kafka_setting(None, "sasl_username")
    sasl_password: SecretStr | None = _kafka_setting(None, "sasl_password")

    @model_validator(mode="after")
    def _security(self) -> "KafkaConfig":
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and not (self.sasl_mechanism and self.sasl_username and self.sasl_password):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs FEEDRET_KAFKA_SASL_MECHANISM, "
                "FEEDRET_KAFKA_SASL_USERNAME and FEEDRET_KAFKA_SASL_PASSWORD"
            )
        if not sasl and (self.sasl_mechanism or self.sasl_username):
            raise ValueError(f"SASL settings are given but security_protocol is {self.security_protocol}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("a Kafka client certificate needs both FEEDRET_KAFKA_SSL_CERTFILE and FEEDRET_KAFKA_SSL_KEYFILE")
        tls_files = [f for f in (self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile) if f is not None]
        if tls_files and not self.security_protocol.endswith("SSL"):
            raise ValueError(f"TLS files are given but security_protocol is {self.security_protocol} (SSL or SASL_SSL?)")
        for f in tls_files:
            if not f.is_file():
                raise ValueError(f"Kafka TLS file {f} does not exist")
        return self

    def client_options(self) -> dict:
        """Keyword arguments every kafka-python client (producer, consumer, admin) is built with."""
        opts: dict = {"bootstrap_servers": self.bootstrap_servers, "security_protocol": self.security_protocol}
        if self.security_protocol.endswith("SSL"):
            opts["ssl_check_hostname"] = self.ssl_check_hostname
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                if getattr(self, name) is not None:
                    opts[name] = str(getattr(self, name))
        if self.security_protocol.startswith("SASL_"):
            opts["sasl_mechanism"] = self.sasl_mechanism
            opts["sasl_plain_username"] = self.sasl_username  # kafka-python's name for PLAIN and SCRAM alike
            opts["sasl_plain_password"] = self.sasl_password.get_secret_value()
        return opts


ENCODER_BACKENDS = ("torch", "onnx")


class EncoderConfig(_Settings):
    model_dir: Path = DEFAULT_MODEL_DIR
    # torch: the Hugging Face model itself; onnx: its ONNX export run by onnxruntime
    # (exported on first use when missing).
    backend: str = "torch"
    device: str = "cpu"
    pooling: str = ""  # empty: the model's own feedret.json decides
    # None: what the model was trained with (its feedret.json), else 128 tokens.
    max_length: int | None = Field(default=None, ge=8)
    batch_size: int = Field(default=64, ge=1)
    torch_threads: int = Field(default=0, ge=0)  # 0: the backend's default; onnx: intra-op threads
    # Whether idle intra-op threads spin a while for the next piece of work (OpenMP's and
    # onnxruntime's own default) or sleep at once (torch: OMP_WAIT_POLICY=PASSIVE; onnxruntime:
    # allow_spinning 0). Spinning's cost is a gap's worth of CPU per request; its gain grows
    # with the model. Member requests 5 ms apart (benchmarks/results/encoder_idle_cpu.md): on
    # the committed demo model spinning took 3.0x (torch) / 3.9x (onnxruntime) the CPU for a
    # p50 ~0.4 / ~0.3 ms lower; on a model 4 layers x 512 wide, still far smaller than any
    # production one, 1.0x / 1.2x the CPU for a p50 1.3-1.8x lower; back-to-back batches (the
    # consumer's backlog) ran 1.6x / 1.25x faster on the demo model. So both roles spin;
    # false suits a tiny model in a pod with a tight CPU limit.
    spin_wait: bool = True
    # onnx backend only; None: <model_dir>/onnx/model.onnx (model-<pooling>.onnx for a pooling override).
    onnx_path: Path | None = None

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        if value not in ENCODER_BACKENDS:
            raise ValueError(f"unknown encoder backend {value!r}; available: {', '.join(ENCODER_BACKENDS)}")
        return value

    @field_validator("onnx_path", mode="before")
    @classmethod
    def _onnx_path(cls, value: object) -> object:
        return None if value == "" else value  # FEEDRET_ONNX_PATH= (empty) means the default


class ConsumerConfig(_Settings):
    num_shards: int = Field(default=2, ge=1)
    # The generation's model, as its shards read it (FEEDRET_MODEL_VERSION): a consumer whose
    # model is another refuses to start, before it writes a vector the shards would reject and
    # compaction would keep in place of the post's good one. Empty: any model.
    model_version: str = ""
    # The consumer serves no gRPC, only its metrics endpoint on host:metrics_port.
    host: str = "127.0.0.1"
    metrics_port: int = Field(default=DEFAULT_CONSUMER_METRICS_PORT, ge=0, le=65535)
    # A micro-batch closes at whichever comes first: it is full, batch_max_wait_ms have
    # passed since its first post, or no post came for batch_linger_ms. The linger keeps a
    # quiet stream from waiting the whole max wait for posts that are not coming (265 ->
    # ~80 ms from publish to searchable, benchmarks/results/freshness.md); under load posts
    # keep coming, or are already fetched, and batches fill as before.
    batch_max_size: int = Field(default=64, ge=1)
    batch_max_wait_ms: int = Field(default=200, ge=1)
    batch_linger_ms: int = Field(default=20, ge=1)
    # How often the lag gauge asks the broker for the partitions' end offsets (one
    # ListOffsets request); between asks it follows this consumer's own commits.
    lag_refresh_ms: int = Field(default=1000, ge=0)


def is_exact(index_factory: str) -> bool:
    """Whether a faiss index-factory string is the exact index, Flat (or FlatIP; any case or
    spacing): searched by brute force, trained on nothing, and the one the torch backend serves."""
    return index_factory.strip().replace(" ", "").lower() in ("flat", "flatip")


VECTOR_CODECS = ("float32", "float16", "int8", "binary")  # feedret.indexer.codecs.CODECS


class IndexSettings(_Settings):
    """How a shard indexes, declared once: each field is a FEEDRET_* variable of ShardConfig,
    which is an IndexSettings, and feedret.indexer.shard_index.IndexOptions is made from
    these fields (index_backend and index_device are its backend and device)."""

    # Any faiss index-factory string, always inner product: Flat, IVF4096,Flat,
    # IVF4096,PQ32, HNSW32, SQ8, ... (feedret.indexer.shard_index).
    index_factory: str = "Flat"
    # faiss, or torch: exact brute force (index_factory Flat) on index_device.
    index_backend: str = "faiss"
    # auto, cpu, cuda or cuda:N. The torch backend searches there (auto: CUDA when torch sees
    # it). The faiss backend: IVF…,Flat / SQ… / PQ… indexes search through a copy on that
    # GPU (auto: when faiss-gpu sees one), Flat through the torch store on it (auto: when
    # faiss and torch see one); others stay on the CPU (auto) or refuse to start (cuda).
    index_device: str = "auto"
    # Matryoshka: serve the first N dimensions of every vector and query, re-normalised;
    # queries must be N or the full width wide. 0: the full width.
    serve_dimension: int = Field(default=0, ge=0)
    # Vectors an index that needs training (IVF, PQ) trains on, searched exactly meanwhile;
    # 0: 40 per centroid (nlist or PQ codebook size), at least 1000.
    train_size: int = Field(default=0, ge=0)
    nprobe: int = Field(default=16, ge=1)  # IVF lists searched per query
    ef_search: int = Field(default=64, ge=1)  # HNSW search breadth; raised to k per query
    # OpenMP threads faiss may use for one search. Concurrent searches already spread over
    # the gRPC workers; a second thread on one HNSW query spent twice the CPU and was slower
    # (benchmarks/results/grpc_floor_1m.md). Builds and rebuilds keep every core.
    search_threads: int = Field(default=1, ge=1)
    # HNSW cannot remove ids: deleted posts stay as filtered-out tombstones until more than
    # this fraction of the index is tombstones, then it is rebuilt in the background.
    rebuild_fraction: float = Field(default=0.2, gt=0, le=1)
    # A filter passing fewer than this fraction of the shard's posts is searched exactly.
    exact_filter_fraction: float = Field(default=0.05, ge=0, le=1)
    retention_s: float = Field(default=0.0, ge=0)  # evict posts created longer ago; 0: keep forever
    # How the shard keeps each vector (feedret.indexer.codecs), the faiss backend's choice of
    # memory per post: float32 (4 bytes a dimension), float16 (2), int8 (1; each dimension's
    # range learned from the first codec_train_size vectors, held as float32 until then) or
    # binary (sign bits searched by Hamming distance, binary_rescore x k candidates rescored
    # from int8 in memory: 1/8 + 1 byte a dimension; or, with rescore_dir, from float32 in a
    # memory-mapped file there: 1/8 byte a dimension in memory). The torch backend keeps
    # float16, int8 or binary (rescored from int8) tensors, on its device.
    vector_codec: str = "float32"
    codec_train_size: int = Field(default=10_000, ge=1)
    binary_rescore: int = Field(default=8, ge=1)
    rescore_dir: str = ""
    # binary: how the sign bits are searched before rescoring: asymmetric (the float query
    # against each post's signs), hamming (popcounts of the query's own sign bits: faster,
    # lower recall at the same binary_rescore) or rabitq (RaBitQ codes, 8 bytes a post more:
    # asymmetric's ranking at a sixth of its scan time, so a binary_rescore of 32-64 is
    # affordable; the faiss backend's).
    binary_search: str = "asymmetric"

    @field_validator("index_backend")
    @classmethod
    def _index_backend(cls, value: str) -> str:
        if value not in ("faiss", "torch"):
            raise ValueError(f"unknown index backend {value!r}; available: faiss, torch")
        return value

    @model_validator(mode="after")
    def _index_combination(self) -> "IndexSettings":
        if self.index_backend == "torch" and not is_exact(self.index_factory):
            raise ValueError(f"index_backend torch searches exactly: index_factory must be Flat, not {self.index_factory!r}")
        if self.vector_codec not in VECTOR_CODECS:
            raise ValueError(f"unknown vector_codec {self.vector_codec!r}; one of {', '.join(VECTOR_CODECS)}")
        if self.rescore_dir and self.index_backend == "torch":
            raise ValueError("rescore_dir (binary rescored from disk) is the faiss backend's, not the torch backend's")
        if self.binary_search not in ("asymmetric", "hamming", "rabitq"):
            raise ValueError(f"unknown binary_search {self.binary_search!r}; one of asymmetric, hamming, rabitq")
        if self.binary_search == "rabitq" and self.index_backend == "torch":
            raise ValueError("binary_search rabitq is the faiss backend's; the torch backend searches sign bits")
        if self.rescore_dir and self.vector_codec != "binary":
            raise ValueError("rescore_dir is where binary codes are rescored from: set vector_codec binary")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.index_device):
            raise ValueError(f"index_device {self.index_device!r}: one of auto, cpu, cuda, cuda:N")
        return self


class ShardConfig(IndexSettings):
    shard_id: int = Field(default=0, ge=0)
    num_shards: int = Field(default=2, ge=1)
    host: str = "127.0.0.1"
    port: int = DEFAULT_SHARD_BASE_PORT
    metrics_port: int = Field(default=DEFAULT_SHARD_METRICS_BASE_PORT, ge=0, le=65535)  # 0: no /metrics
    dimension: int = Field(default=0, ge=0)  # 0: learn it from the first vector
    # The one model whose vectors this shard indexes: an index never mixes two models' vector
    # spaces, so upserts embedded by any other are rejected (reason other_model) and a snapshot
    # of another model is not restored. Empty: the model of the first vector applied.
    model_version: str = ""
    # The index settings (index_factory, index_backend, index_device, serve_dimension,
    # train_size, nprobe, ef_search, search_threads, rebuild_fraction, exact_filter_fraction,
    # retention_s, vector_codec, codec_train_size, binary_rescore, rescore_dir, binary_search) are
    # IndexSettings' fields, above.
    sweep_interval_s: float = Field(default=1.0, gt=0)  # retention sweep and rebuild check
    # Snapshots of the index, its ids and attributes and the applied offset, so a restart
    # loads the newest intact one and replays only the partition's tail. A local directory,
    # or an fsspec URL (s3://bucket/prefix) that every replica of every shard shares, so a
    # replica on a new node starts from its shard's newest snapshot. Empty: off.
    snapshot_dir: str = ""
    # Where a snapshot for a remote snapshot_dir is staged while written or read: room for
    # one snapshot. Empty: the system's temporary directory.
    snapshot_staging_dir: str = ""
    snapshot_interval_s: float = Field(default=300.0, gt=0)  # also one at shutdown
    snapshot_keep: int = Field(default=2, ge=1)  # newest snapshots kept per shard
    # A snapshot older than this is not restored (the shard replays its partition instead)
    # and is pruned:
    # it could predate a delete whose tombstone compaction has dropped since (the topic keeps
    # tombstones 7 days, feedret.topics.DELETE_RETENTION_MS), and would bring that post back.
    # Keep it below the post-vector topic's delete.retention.ms. 0: any age.
    snapshot_max_age_s: float = Field(default=6 * 24 * 3600.0, ge=0)
    max_k: int = Field(default=10_000, ge=1)
    apply_batch_max: int = Field(default=512, ge=1)
    grpc_workers: int = Field(default=8, ge=1)
    # Calls (Search, Lookup, Stats) handled at once; one more is refused at once with
    # RESOURCE_EXHAUSTED and the root asks another replica, instead of queueing past its
    # deadline. Above the root's burst (16 workers x up to 2 calls per shard); health checks
    # and reflection are never refused. 0: no limit.
    max_concurrent_rpcs: int = Field(default=64, ge=0)
    # Concurrent searches are answered together, up to this many per pass over the torch
    # store's rows (one matmul) or per search of a faiss index's GPU copy; a lone query is
    # never held back. 1: one at a time. Indexes that cannot batch (faiss on the CPU) ignore it.
    search_batch_max: int = Field(default=32, ge=1)
    # Connections are closed (gracefully) after this long, so a root whose channel
    # round-robins over a dns: pool re-resolves it and finds replicas added since; gRPC
    # re-resolves only when a connection ends. 0: never.
    max_connection_age_s: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _widths(self) -> "ShardConfig":
        if self.dimension and self.serve_dimension > self.dimension:
            raise ValueError(f"serve_dimension {self.serve_dimension} exceeds dimension {self.dimension}")
        return self


class GrpcSecurityConfig(_Settings):
    """TLS and bearer tokens for feedret's gRPC servers and the root's calls to shards and member pods.

    With a certificate and key, a server listens with TLS only; with a CA as well it
    asks callers for a certificate signed by that CA (mutual TLS, `tls_client_auth`).
    The root calls shards and member pods with TLS too, trusting the CA (the system's
    roots when none) and presenting its own certificate. The kubelet's native gRPC
    probes cannot speak TLS: `health_port` serves grpc.health.v1, and nothing else,
    in plaintext for them.

    With `auth_tokens_file`, a server answers feedret's services only for calls that
    carry `authorization: Bearer <token>` with a token in that file (health and
    reflection stay open); the root sends the token in `auth_token_file` to shards and
    member pods. Both files are read again when they change (a rotated Secret).
    """

    tls_cert_file: Path | None = None  # PEM certificate chain of this process
    tls_key_file: Path | None = None  # its private key, PEM
    tls_ca_file: Path | None = None  # PEM CA that peers' certificates are checked against
    tls_client_auth: bool = True  # with a CA: a server refuses callers without a certificate it signed
    # The name checked in the shards' and member pods' certificates, when the hosts the root
    # dials (e.g. feedret-shard-0) are not in them: one internal certificate for every pod.
    tls_server_name: str | None = None
    health_port: int = Field(default=0, ge=0, le=65535)  # plaintext health only; 0: none
    auth_tokens_file: Path | None = None  # tokens this server accepts, one per line ('#' comments)
    auth_token_file: Path | None = None  # the token this process sends (the root, to shards and members)

    @model_validator(mode="after")
    def _files(self) -> "GrpcSecurityConfig":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("gRPC TLS needs both FEEDRET_TLS_CERT_FILE and FEEDRET_TLS_KEY_FILE")
        for f in (self.tls_cert_file, self.tls_key_file, self.tls_ca_file, self.auth_tokens_file, self.auth_token_file):
            if f is not None and not f.is_file():
                raise ValueError(f"gRPC security file {f} does not exist")
        if self.health_port and not self.enabled:
            raise ValueError("FEEDRET_HEALTH_PORT is for TLS servers (the kubelet cannot probe TLS); "
                             "without FEEDRET_TLS_CERT_FILE health is served on the main port")
        return self

    @property
    def enabled(self) -> bool:
        return self.tls_cert_file is not None


class MemberLimits(_Settings):
    """How large a member query may be. The root checks before it calls the member service
    and the member service checks again; both read these same variables. Beyond a limit:
    INVALID_ARGUMENT naming the field, its size and the limit.

    The prompt is cut to the model's token limit (128: ~500 characters for the demo
    model) only after all of it is tokenized, so text beyond that costs tokenizer time
    and changes nothing. With the demo model on a 2-core CPU a sample member took ~3 ms
    to embed, the largest these defaults allow (32 K characters of profile) ~20 ms, 16 of
    them tokenizing, and a 5 MB profile 6-10 s, while every member queued behind it waited.
    """

    max_id_chars: int = Field(default=256, ge=1)  # member_id and session_id, each
    # The name of a profile field or a feature, and an activity's action.
    max_name_chars: int = Field(default=128, ge=1)
    max_profile_fields: int = Field(default=64, ge=0)
    max_profile_chars: int = Field(default=4096, ge=1)  # one profile field's value
    max_features: int = Field(default=256, ge=0)
    # The encoder reads only the newest few (its max_activity, 10 for the demo model).
    max_activity_items: int = Field(default=100, ge=0)
    max_activity_chars: int = Field(default=20_000, ge=1)  # one item's text: a post's own limit
    # Every string of the member together: ids, profile, feature names, activity.
    max_member_chars: int = Field(default=32_768, ge=1)


class MemberConfig(MemberLimits):
    host: str = "127.0.0.1"
    port: int = DEFAULT_MEMBER_PORT
    metrics_port: int = Field(default=DEFAULT_MEMBER_METRICS_PORT, ge=0, le=65535)  # 0: no /metrics
    cache_ttl_s: float = Field(default=900.0, ge=0)
    cache_max_entries: int = Field(default=100_000, ge=1)
    grpc_workers: int = Field(default=8, ge=1)
    # Cache misses that arrive while a forward pass runs are embedded together in the
    # next one, up to this many members (benchmarks/member_batching.py); 1: one at a time.
    embed_batch_max: int = Field(default=32, ge=1)
    # Embed calls handled at once (waiting for or in a forward pass); one more is refused
    # at once with RESOURCE_EXHAUSTED, and the root tries the member's next pod, instead of
    # queueing behind passes that outlast its deadline. Health checks and reflection are
    # never refused and have threads of their own. 0: the worker threads,
    # max(grpc_workers, 2 x embed_batch_max), 64 by default: two full passes.
    max_concurrent_rpcs: int = Field(default=0, ge=0)


class RootConfig(MemberLimits):
    host: str = "127.0.0.1"
    port: int = DEFAULT_ROOT_PORT
    metrics_port: int = Field(default=DEFAULT_ROOT_METRICS_PORT, ge=0, le=65535)  # 0: no /metrics
    # One entry per shard in shard order, separated by commas; a shard's replicas
    # separated by `|`; a dns:///name:port entry is a pool whose resolved addresses
    # are the replicas (feedret.shard_targets): "a:1|a:2,b:1|b:2", "dns:///svc-0:50061,...".
    shard_addresses: str = f"127.0.0.1:{DEFAULT_SHARD_BASE_PORT},127.0.0.1:{DEFAULT_SHARD_BASE_PORT + 1}"
    # During a model rollout, the next generation's shards (same syntax, any shard count):
    # each query goes to the shards of its vector's model (feedret.server.generations).
    # Empty: one generation.
    next_shard_addresses: str = ""
    # A JSON file naming the member service and the fleets (feedret.server.generations.Topology),
    # in place of the three settings above; re-read within generations_poll_s of a change, so
    # a rollout's promote switches every root at once, without a restart. "": those settings.
    generations_file: str = ""
    generations_poll_s: float = Field(default=1.0, gt=0)
    # A shard's replica that has not answered after this long gets the same request
    # sent to a second replica; the first answer wins. About the shards' p95; 0: never hedge.
    hedge_after_ms: float = Field(default=50.0, ge=0)
    # Hedges may add at most this many extra shard calls per first call, over time (a token
    # bucket of hedge_burst tokens): when every replica is slow, hedging stops instead of
    # doubling the load. 0: never hedge.
    hedge_budget: float = Field(default=0.1, ge=0)
    hedge_burst: float = Field(default=10.0, ge=1)
    # A replica that failed, missed the deadline or was overtaken by a hedge is tried
    # after the others for this long, so a hung replica stops costing every other query
    # a hedge delay. 0: plain rotation.
    replica_cooldown_s: float = Field(default=1.0, ge=0)
    # host:port, pods as host:port|host:port, or dns:///name:port (a headless Service:
    # the root re-resolves it and sends each member to the same pod, for its session cache).
    member_address: str = f"127.0.0.1:{DEFAULT_MEMBER_PORT}"
    member_resolve_interval_s: float = Field(default=5.0, gt=0)
    # Callers' connections are closed (gracefully) after this long, so a caller behind a
    # Service's virtual IP reconnects, possibly to a newer root pod, and one balancing
    # over a dns: pool re-resolves it. 0: never.
    max_connection_age_s: float = Field(default=60.0, ge=0)
    max_k: int = Field(default=10_000, ge=1)
    # RetrieveBatch: requests per call, and how many batch requests run at once, over all
    # calls (each holds a thread while its shards answer). A batch counts as one call
    # toward max_concurrent_rpcs.
    max_batch: int = Field(default=256, ge=1)
    batch_parallelism: int = Field(default=8, ge=1)
    # Concurrent Retrieves' searches are sent to each shard together, up to this many in one
    # SearchBatch (a lone query at once, as a plain Search; batches form only while one is in
    # flight); 1: every query its own Search calls.
    coalesce_max_batch: int = Field(default=16, ge=1)
    # A query waiting for a batch is sent on its own once the batch in flight has run this long
    # and several times longer than batches lately (a shard hanging, not busy), or once half its
    # time is gone: a hung shard costs completeness, not the answer. Queries queued behind
    # healthy batches wait (at 64 clients, going alone after a fixed 50 ms cost a third of the QPS).
    coalesce_wait_ms: float = Field(default=50.0, ge=0)
    # Each shard is asked for about its share of k plus this many standard deviations
    # (feedret.merge.shard_depth: 1,112 per shard for k=2,000 over 2 shards), not all k;
    # a shard whose last answer still makes the merged top k may hold more and is asked again for k.
    # 0: every shard is asked for k.
    shard_depth_sigmas: float = Field(default=5.0, ge=0)
    # Used when the caller sets no deadline.
    default_timeout_s: float = Field(default=1.0, gt=0)
    # Kept back from the caller's deadline for merging and the reply: the larger of
    # deadline_margin_s and deadline_margin_fraction of the time left. A fixed 10 ms was too
    # little on a loaded 2-core machine: with a shard hung, the partial answer reached the
    # caller after its deadline (DEADLINE_EXCEEDED instead of the other shards' results).
    deadline_margin_s: float = Field(default=0.01, ge=0)
    deadline_margin_fraction: float = Field(default=0.1, ge=0, lt=1)
    grpc_workers: int = Field(default=16, ge=1)
    # Calls (Retrieve, Lookup, Stats) handled at once; one more is refused at once with
    # RESOURCE_EXHAUSTED, so a caller can back off or try another root pod, instead of
    # queueing past its deadline. Health checks and reflection are never refused and have
    # threads of their own. 0: grpc_workers (a Retrieve holds its thread until the shards answer).
    max_concurrent_rpcs: int = Field(default=0, ge=0)
    # Retrieve's filters, checked here (shards see only what passed): each excluded id is
    # looked up by every shard, each language compared with every candidate's.
    max_exclude_post_ids: int = Field(default=10_000, ge=0)
    max_languages: int = Field(default=32, ge=0)

    @field_validator("shard_addresses")
    @classmethod
    def _shard_addresses(cls, value: str) -> str:
        parse_shard_targets(value)  # a malformed list fails at start, naming the bad entry
        return value

    @field_validator("next_shard_addresses")
    @classmethod
    def _next_shard_addresses(cls, value: str) -> str:
        if value.strip():
            parse_shard_targets(value)
        return value.strip()

    @field_validator("member_address")
    @classmethod
    def _member_address(cls, value: str) -> str:
        parse_member_targets(value)  # a malformed address fails at start, naming the bad entry
        return value

    def shard_replicas(self) -> list[list[str]]:
        """Per shard, in shard order, its replicas' gRPC targets."""
        return parse_shard_targets(self.shard_addresses)

    def next_shard_replicas(self) -> list[list[str]]:
        """The next generation's shards, as shard_replicas; [] when there is none."""
        return parse_shard_targets(self.next_shard_addresses) if self.next_shard_addresses else []

    def shard_list(self) -> list[str]:
        """Per shard, its entry as written (replicas joined by `|`): for Stats and logs."""
        return ["|".join(replicas) for replicas in self.shard_replicas()]
