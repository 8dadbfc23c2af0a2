"""The `feedret` command: bring the stack up, publish posts, query, look up, read stats."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import click
import grpc

from feedret.clients.client import DEFAULT_ROOT_ADDRESS, FeedretClient, RetrieveResult
from feedret.config import (
    DEFAULT_BROKER_PORT,
    DEFAULT_MEMBER_PORT,
    DEFAULT_ROOT_METRICS_PORT,
    DEFAULT_ROOT_PORT,
    DEFAULT_SHARD_BASE_PORT,
    SAMPLE_DIR,
    WORK_ROOT,
    KafkaConfig,
)
from feedret.events import MAX_POST_ID
from feedret.members import MemberProfile

SAMPLE_POSTS = SAMPLE_DIR / "posts.jsonl"
SAMPLE_MEMBERS = SAMPLE_DIR / "members.jsonl"

T = TypeVar("T")


class InputError(click.ClickException):
    """Bad input (a file, a JSON value): one line, exit code 2 like click's own usage errors."""

    exit_code = 2


def _address(ctx, param, value: str) -> str:
    # An empty target makes gRPC's C core print a multi-line trace before failing.
    if not value.strip():
        raise click.BadParameter("must be host:port, got an empty string")
    return value.strip()


def _seconds(ctx, param, value: float) -> float:
    # click's FloatRange lets nan and inf through; gRPC deadlines need a real number.
    if not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a positive number of seconds, got {value}")
    return value


root_option = click.option(
    "--root",
    default=lambda: os.environ.get("FEEDRET_ROOT_ADDRESS", DEFAULT_ROOT_ADDRESS),
    show_default=DEFAULT_ROOT_ADDRESS,
    callback=_address,
    help="Root server address (env FEEDRET_ROOT_ADDRESS).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
post_id_type = click.IntRange(0, MAX_POST_ID)


def _client(root: str) -> FeedretClient:
    """A client for `root`, with the TLS and token settings the servers read (FEEDRET_TLS_*,
    FEEDRET_AUTH_TOKEN_FILE), so the CLI reaches a root that requires them."""
    from feedret.config import GrpcSecurityConfig
    from feedret.server.grpc_security import client_security

    return FeedretClient(root, **client_security(GrpcSecurityConfig()))


def _grpc_call(fn: Callable[[], T]) -> T:
    """Run one RPC; turn a gRPC error into a one-line message and exit code 2."""
    try:
        return fn()
    except grpc.RpcError as exc:
        # Details can run to several lines (a C-core trace); the first says what went wrong.
        details = (exc.details() or "").strip().splitlines()
        click.echo(f"Error: {exc.code().name}: {details[0] if details else '-'}", err=True)
        sys.exit(2)


def _dump(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=None, sort_keys=False))


def _proto_value(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return _proto_dict(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    return value


def _proto_dict(msg: Any) -> dict:
    """Every field by its proto name, 64-bit ints as JSON numbers.

    (MessageToDict follows proto3 JSON and writes int64 as strings, which makes
    `jq '.total_indexed > 100'` silently wrong.)
    """
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _proto_value(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_proto_value(field, v) for v in value]
        else:
            out[field.name] = _proto_value(field, value)
    return out


def _result_dict(result: RetrieveResult) -> dict:
    return {
        "request_id": result.request_id,
        "model_version": result.model_version,
        "partial": result.partial,
        "failed_shards": result.failed_shards,
        "candidates": [{"post_id": c.post_id, "score": c.score, "shard": c.shard} for c in result.candidates],
    }


def _print_result(result: RetrieveResult, texts: dict[int, str] | None = None, limit: int | None = None) -> None:
    flag = "  PARTIAL (failed shards: %s)" % result.failed_shards if result.partial else ""
    n = len(result.candidates)
    click.echo(f"{n} candidate{'' if n == 1 else 's'}, model {result.model_version or '?'}{flag}")
    for rank, c in enumerate(result.candidates[:limit], 1):
        text = f"  {texts.get(c.post_id, '')[:70]}" if texts else ""
        click.echo(f"{rank:>5}  {c.post_id:>12}  {c.score:8.4f}  shard {c.shard}{text}")


@click.group()
def cli() -> None:
    """feedret: candidate retrieval for LLM-embedded feeds."""


# ---------------------------------------------------------------- serve


@cli.command()
@click.argument("role", type=click.Choice(["consumer", "shard", "root", "member"]))
def serve(role: str) -> None:
    """Run one role in the foreground; configured by FEEDRET_* environment variables."""
    from pydantic import ValidationError

    from feedret.server.roles import run

    try:
        run(role)
    except ValidationError as exc:
        # A bad FEEDRET_* value: say which, in one line, rather than pydantic's traceback.
        raise click.ClickException(f"invalid {role} configuration: {_validation_summary(exc)}") from None


def _validation_summary(exc: Any) -> str:
    """A pydantic ValidationError as `FEEDRET_PORT: Input should be a valid integer (got 'abc')`; ...."""
    parts = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err.get("loc") else ""
        # A field read through an alias is reported by the variable's own name (KAFKA_..., FEEDRET_KAFKA_...).
        name = field if field.isupper() else f"FEEDRET_{field.upper()}" if field else exc.title
        got = f" (got {err['input']!r})" if field and isinstance(err.get("input"), (str, int, float)) else ""
        parts.append(f"{name}: {err.get('msg', '')}{got}")
    return "; ".join(parts)


# ---------------------------------------------------------------- publish


@cli.command()
@click.argument("file", type=click.File("rb"))
@click.option("--bootstrap", envvar="KAFKA_BOOTSTRAP_SERVERS", default=f"127.0.0.1:{DEFAULT_BROKER_PORT}", show_default=True)
@json_option
def publish(file, bootstrap: str, as_json: bool) -> None:
    """Publish post events from FILE (JSON lines; '-' for stdin) to the posts topic.

    Lines that are not valid post events are still sent (the consumer moves them to the
    dead-letter topic, with the reason); each is named here as a warning.
    """
    from kafka.errors import KafkaError

    from feedret.clients.publish import publish_lines

    # Read it all and decode first: a file that is not UTF-8 publishes nothing, rather than
    # the lines before the bad byte.
    try:
        lines = file.read().decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{file.name} is not UTF-8 text: {exc}") from None
    try:
        report = publish_lines(KafkaConfig(KAFKA_BOOTSTRAP_SERVERS=bootstrap), lines, validate=True)
    except KafkaError as exc:
        raise click.ClickException(f"could not publish to Kafka at {bootstrap}: {exc}") from None
    for line_no, reason in report.invalid[:5]:
        click.echo(f"warning: line {line_no} is not a valid post event ({reason}); it goes to the dead-letter topic",
                   err=True)
    if len(report.invalid) > 5:
        click.echo(f"warning: {len(report.invalid) - 5} more invalid lines", err=True)
    if as_json:
        _dump({"sent": report.sent, "skipped_blank": report.skipped_blank, "invalid": len(report.invalid)})
    else:
        click.echo(f"published {report.sent} event{'' if report.sent == 1 else 's'} to {bootstrap}")


@cli.command("import-vectors")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model-version", default="", help="The model that embedded the vectors (else the file's model_version).")
@click.option("--bootstrap", envvar="KAFKA_BOOTSTRAP_SERVERS", default=f"127.0.0.1:{DEFAULT_BROKER_PORT}", show_default=True)
@click.option("--topic", default="", help="The post-vector topic (default: FEEDRET_VECTORS_TOPIC, post-vectors).")
@click.option("--force", is_flag=True, help="Send even when the serving shards index another model or width.")
@root_option
@json_option
def import_vectors(file: Path, model_version: str, bootstrap: str, topic: str, force: bool, root: str,
                   as_json: bool) -> None:
    """Import post vectors embedded elsewhere from FILE (.npz: post_id, vector, created_at[, lang]).

    Each sound row goes to the post-vector topic as the upsert the embedding consumer
    would write, on its shard's partition; rows that are not sound are counted and not
    sent. The shards take the vectors only if they index this model at this width.
    """
    from kafka import KafkaProducer
    from kafka.errors import KafkaError
    from tqdm import tqdm

    from feedret.consumer.vector_import import ImportFileError, import_vectors as send, read_vector_file
    from feedret.logging import configure_logging
    from feedret.topics import topic_partitions

    configure_logging("import", json=False)  # to stderr: stdout holds the report
    kafka = KafkaConfig(KAFKA_BOOTSTRAP_SERVERS=bootstrap)
    topic = topic or kafka.vectors_topic
    try:
        f = read_vector_file(file)
        model_version = model_version or f.model_version
        if not model_version:
            raise ImportFileError(f"{file} names no model_version: pass --model-version (the model that embedded it)")
    except ImportFileError as exc:
        raise InputError(str(exc)) from None
    if not force:
        _refuse_other_model(root, model_version, f.dimension, topic == KafkaConfig().vectors_topic)
    try:
        partitions = topic_partitions(kafka, topic)
        if partitions is None:
            raise InputError(f"topic {topic!r} does not exist at {bootstrap}: start the stack (or its consumer) first")
        producer = KafkaProducer(**kafka.client_options(), acks="all", linger_ms=20, batch_size=1 << 20,
                                 max_request_size=16 << 20, client_id="feedret-import")
        try:
            with tqdm(total=len(f), unit="post", disable=as_json, file=sys.stderr) as bar:
                report = send(f, model_version, producer, topic, partitions, progress=bar.update)
        finally:
            producer.close()
    except KafkaError as exc:
        raise click.ClickException(f"could not import to Kafka at {bootstrap}: {exc}") from None
    rejected = ", ".join(f"{reason} {n}" for reason, n in report.rejected.most_common())
    if as_json:
        _dump({"sent": report.sent, "rejected": dict(report.rejected), "topic": topic, "partitions": partitions,
               "model_version": model_version, "dimension": f.dimension, "posts_per_s": round(report.posts_per_s, 1)})
    else:
        click.echo(f"imported {report.sent} of {len(f)} vectors ({f.dimension}-d, model {model_version}) to {topic} "
                   f"({partitions} partitions)" + (f"; not sent: {rejected}" if rejected else ""))


@cli.command("backfill")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="The model to embed with (default: FEEDRET_MODEL_DIR, or the shipped model).")
@click.option("--topic", default="", help="The post-vector topic to fill (default: FEEDRET_VECTORS_TOPIC, post-vectors).")
@click.option("--bootstrap", envvar="KAFKA_BOOTSTRAP_SERVERS", default=f"127.0.0.1:{DEFAULT_BROKER_PORT}", show_default=True)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1, 4096))
@json_option
def backfill_posts(file: Path, model_dir: Path | None, topic: str, bootstrap: str, batch_size: int, as_json: bool) -> None:
    """Embed a bulk file of post events (as `feedret publish` takes) into a post-vector topic.

    For posts older than `posts`' retention, which a new generation's consumer cannot
    re-read: each line is checked, embedded and written as the consumer would (a delete as
    a tombstone), on its shard's partition. Run it before the generation's consumer starts,
    so that the stream's newer events of the same posts land after it (`feedret rollout
    start --posts-file` does both, in that order).
    """
    from kafka import KafkaProducer
    from kafka.errors import KafkaError
    from tqdm import tqdm

    from feedret.config import EncoderConfig
    from feedret.consumer.backfill import backfill
    from feedret.encoder.loader import load_encoder
    from feedret.encoder.model import open_model_dir
    from feedret.logging import configure_logging
    from feedret.topics import topic_partitions

    configure_logging("backfill", json=False)  # to stderr: stdout holds the report
    kafka = KafkaConfig(KAFKA_BOOTSTRAP_SERVERS=bootstrap)
    topic = topic or kafka.vectors_topic
    config = EncoderConfig(**({"model_dir": model_dir} if model_dir is not None else {}))
    try:
        open_model_dir(config.model_dir)
        text = file.read_text(encoding="utf-8")
    except (ValueError, OSError) as exc:
        raise InputError(f"{exc}") from None
    lines = text.splitlines()
    try:
        partitions = topic_partitions(kafka, topic)
        if partitions is None:
            raise InputError(f"topic {topic!r} does not exist at {bootstrap}: it is created with its generation "
                             "(`feedret rollout start`, or the stack)")
        encoder = load_encoder(config)
        producer = KafkaProducer(**kafka.client_options(), acks="all", linger_ms=20, batch_size=1 << 20,
                                 max_request_size=16 << 20, client_id="feedret-backfill")
        try:
            with tqdm(total=sum(1 for line in lines if line.strip()), unit="post", disable=as_json,
                      file=sys.stderr) as bar:
                report = backfill(
                    lines, encoder.embed_posts, encoder.model_version, partitions,
                    lambda partition, key, value: producer.send(topic, key=key, value=value, partition=partition),
                    batch_size=batch_size, source=file.name, progress=bar.update,
                )
        finally:
            producer.close()
    except KafkaError as exc:
        raise click.ClickException(f"could not backfill to Kafka at {bootstrap}: {exc}") from None
    if as_json:
        _dump({"lines": report.lines, "embedded": report.embedded, "deletes": report.deletes,
               "bad": [{"line": n, "reason": why} for n, why in report.bad], "topic": topic,
               "partitions": partitions, "model_version": encoder.model_version,
               "posts_per_s": round(report.posts_per_s, 1)})
        return
    bad = (f"; {len(report.bad)} bad line{'s' if len(report.bad) != 1 else ''} not sent (line {report.bad[0][0]}: "
           f"{report.bad[0][1]})" if report.bad else "")
    click.echo(f"backfilled {report.embedded} posts and {report.deletes} deletes from {file} into {topic} "
               f"({partitions} partitions, model {encoder.model_version}) in {report.seconds:.1f} s, "
               f"{report.posts_per_s:.0f} posts/s{bad}")


def _refuse_other_model(root: str, model_version: str, dimension: int, serving_topic: bool) -> None:
    """Refuse an import the serving shards would reject, another model's or width's: on the compacted
    topic each record would also replace the post's good one, and a later replay would lose the post.
    Asked of the root, best effort (the import needs no root); only for the serving generation's topic."""
    if not serving_topic:
        return
    try:
        with _client(root) as client:
            stats = client.stats(timeout=2)
    except grpc.RpcError:
        return
    why = ("on the compacted topic they would also replace these posts' current vectors; "
           "import into the next generation's topic (--topic), or --force")
    if stats.model_version and stats.model_version != model_version:
        raise InputError(f"the shards at {root} index model {stats.model_version}, not {model_version}: "
                         f"they would reject these vectors, and {why}")
    widths = {s.vector_dimension for s in stats.shards if s.reachable and s.vector_dimension}
    if widths and dimension not in widths:
        raise InputError(f"the shards at {root} take {'/'.join(map(str, sorted(widths)))}-d vectors, not "
                         f"{dimension}-d: they would reject these vectors, and {why}")


@cli.group()
def rollout() -> None:
    """A model rollout: a next generation (model, vectors topic, shards) beside the serving one."""


workdir_option = click.option(
    "--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("var"), show_default=True,
    help="The workdir of the `feedret up` that runs the rollout.")


def _up_state(workdir: Path):
    from feedret.server.up_control import NotRunning, read_state

    try:
        return read_state(workdir.absolute())
    except NotRunning as exc:
        raise InputError(f"{exc}; on Kubernetes a rollout is the manifests' (docs/kubernetes.md)") from None


def _rollout_request(workdir: Path, timeout: float, **request) -> str:
    from feedret.server.up_control import NotRunning, RolloutRequest, send

    try:
        reply = send(workdir.absolute(), RolloutRequest(**request), timeout)
    except (NotRunning, TimeoutError) as exc:
        raise InputError(str(exc)) from None
    if not reply.ok:
        raise click.ClickException(reply.message)
    return reply.message


@rollout.command("start")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="The new model's directory (a Hugging Face model with its feedret.json).")
@click.option("--shards", type=click.IntRange(1, 64), default=None,
              help="The new generation's shard count (resharding); default: the serving generation's.")
@click.option("--index", "index_factory", default="",
              help="The new generation's faiss index (FEEDRET_INDEX_FACTORY, e.g. HNSW32,Flat); default: the stack's.")
@click.option("--posts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Post events older than `posts` holds (an export of the source of truth): embedded first, "
                   "by `feedret backfill`, before the generation's consumer starts.")
@workdir_option
def rollout_start(model_dir: Path, shards: int | None, index_factory: str, posts_file: Path | None,
                  workdir: Path) -> None:
    """Start the next generation beside the serving one, in a running `feedret up`: another
    model, shard count or index (or all three).

    Its own consumer group embeds every post of `posts` with the new model into its own
    vectors topic and shards (the backfill), then keeps up with new posts; the serving
    generation serves throughout. Queries whose vector is of the new model already go to it.
    """
    from feedret.encoder.model import open_model_dir

    _up_state(workdir)  # before loading anything: is there a stack to ask?
    try:
        path, meta = open_model_dir(model_dir)
    except (ValueError, OSError) as exc:
        raise InputError(f"--model: {exc}") from None
    click.echo(f"starting generation with model {meta.model_version} ({path}) ...")
    click.echo(_rollout_request(workdir, 600, action="start", model_dir=str(path.absolute()),
                                model_version=meta.model_version, shards=shards or 0, index_factory=index_factory,
                                posts_file=str(posts_file.absolute()) if posts_file else ""))


@rollout.command("promote")
@click.option("--grace", "grace_s", default=10.0, show_default=True, type=click.FloatRange(0, 3600),
              help="Seconds the old generation still answers queries whose vectors are of its model, then stops.")
@click.option("--force", is_flag=True, help="Promote even if the next generation is not ready (it lacks posts).")
@click.option("--bootstrap", envvar="KAFKA_BOOTSTRAP_SERVERS", default=None,
              help="Kafka, for the readiness check (default: the stack's).")
@workdir_option
def rollout_promote(grace_s: float, force: bool, bootstrap: str | None, workdir: Path) -> None:
    """Switch the root and the member service to the next generation together, once it holds every live post."""
    state = _up_state(workdir)
    nxt = state.generation("next")
    if nxt is None:
        raise InputError("no generation is rolling out: `feedret rollout start --model DIR` first")
    if not force:
        verdict, _, _ = _rollout_readiness(nxt.shard_addresses, nxt.consumer_group, state.root_address,
                                           bootstrap or state.bootstrap_servers, interval=0)
        if not verdict.ready:
            raise click.ClickException(f"generation {nxt.name} is not ready to promote: {'; '.join(verdict.reasons)} "
                                       "(`feedret rollout status`; --force promotes anyway)")
    click.echo(_rollout_request(workdir, 60, action="promote", grace_s=grace_s))


@rollout.command("abort")
@workdir_option
def rollout_abort(workdir: Path) -> None:
    """Stop the next generation; the serving one serves on, untouched."""
    if _up_state(workdir).generation("next") is None:
        raise InputError("no generation is rolling out")
    click.echo(_rollout_request(workdir, 60, action="abort"))


@rollout.command("status")
@click.option("--next-shards", envvar="FEEDRET_NEXT_SHARD_ADDRESSES", default=None,
              help="The next generation's shards, as FEEDRET_SHARD_ADDRESSES (default: FEEDRET_NEXT_SHARD_ADDRESSES, "
                   "or the `feedret up` of --workdir's).")
@click.option("--next-group", default=None,
              help="The next generation's consumer group (its FEEDRET_CONSUMER_GROUP; default: as --next-shards).")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1, 60),
              help="Seconds between the two looks at the group's offsets that give its rate.")
@root_option
@click.option("--bootstrap", envvar="KAFKA_BOOTSTRAP_SERVERS", default=f"127.0.0.1:{DEFAULT_BROKER_PORT}", show_default=True)
@workdir_option
@json_option
def rollout_status(next_shards: str | None, next_group: str | None, interval: float, root: str, bootstrap: str,
                   workdir: Path, as_json: bool) -> None:
    """How far the next generation is, and whether it holds every live post (ready to promote)."""
    backfill = ""
    if not next_shards or not next_group:
        state = _up_state(workdir) if not (next_shards or next_group) else None
        nxt = state.generation("next") if state is not None else None
        if nxt is None:
            raise InputError("no generation is rolling out" if state is not None else
                             "give both --next-shards and --next-group, or neither (to ask `feedret up`)")
        next_shards, next_group, backfill = nxt.shard_addresses, nxt.consumer_group, nxt.backfill
        ctx = click.get_current_context()
        # The stack's own root and broker, unless given: `feedret up` may run on other ports.
        if ctx.get_parameter_source("root") in (click.core.ParameterSource.DEFAULT, None):
            root = state.root_address
        if ctx.get_parameter_source("bootstrap") in (click.core.ParameterSource.DEFAULT, None):
            bootstrap = state.bootstrap_servers
    verdict, rate, eta = _rollout_readiness(next_shards, next_group, root, bootstrap, interval)
    if as_json:
        _dump({"ready": verdict.ready, "reasons": list(verdict.reasons),
               "serving": dataclasses.asdict(verdict.serving), "next": dataclasses.asdict(verdict.next),
               "to_embed": verdict.to_embed, "embedding_per_s": round(rate, 1), "eta_s": eta, "backfill": backfill})
        return
    for name, fleet in (("serving", verdict.serving), ("next", verdict.next)):
        share = f" ({fleet.indexed / verdict.serving.indexed:.1%})" if name == "next" and verdict.serving.indexed else ""
        click.echo(f"{name:8} model {fleet.model or '/'.join(fleet.models) or '-'}, {fleet.reachable}/{fleet.shards} "
                   f"shards answering, {fleet.indexed} posts{share}")
    if backfill:
        click.echo(f"backfill: {backfill}")
    if verdict.to_embed is not None:
        click.echo(f"embedding: {verdict.to_embed} posts events left, {rate:.0f}/s"
                   + (f", about {math.ceil(eta)} s" if eta is not None else ""))
    click.echo(f"ready to promote: {'yes' if verdict.ready else 'no'}")
    for reason in verdict.reasons:
        click.echo(f"  - {reason}")


def _rollout_readiness(next_shards: str, next_group: str, root: str, bootstrap: str, interval: float):
    """(Readiness, embedding rate in events/s, ETA in s or None) of the next generation, from
    the root's Stats, the next shards' own, and the group's offsets looked at `interval` apart."""
    from feedret.clients.rollout import readiness
    from feedret.shard_targets import parse_shard_targets
    from feedret.topics import end_offsets, group_offsets

    try:
        targets = parse_shard_targets(next_shards)
    except ValueError as exc:
        raise InputError(f"--next-shards: {exc}") from None
    with _client(root) as client:
        serving = list(_grpc_call(lambda: client.stats()).shards)
    kafka = KafkaConfig(KAFKA_BOOTSTRAP_SERVERS=bootstrap)

    def committed() -> dict[int, int] | None:
        offsets = group_offsets(kafka, next_group)
        return {o.partition: o.offset for o in offsets if o.topic == kafka.posts_topic} if offsets else None

    first = committed()
    if interval:
        time.sleep(interval)
    second = committed() if interval else first
    try:
        ends = end_offsets(kafka, kafka.posts_topic) or None
    except Exception as exc:  # noqa: BLE001 - an unreachable broker: readiness says offsets are unknown
        click.echo(f"warning: could not read {kafka.posts_topic}'s end offsets at {bootstrap}: {exc}", err=True)
        ends = None
    verdict = readiness(serving, [_shard_stats(i, replicas) for i, replicas in enumerate(targets)], second, ends)
    rate = (sum(second.values()) - sum(first.values())) / interval if interval and first and second else 0.0
    eta = verdict.to_embed / rate if verdict.to_embed and rate > 0 else None
    return verdict, rate, eta


def _shard_stats(shard: int, replicas: list[str]):
    """A next-generation shard's Stats as the root summarises a shard's: its most caught-up
    ready replica's (unreachable, with each replica's error, when none answers)."""
    from feedret.config import GrpcSecurityConfig
    from feedret.server.grpc_security import client_security, open_channel
    from feedret.server.root import shard_summary
    from feedret.v1 import feedret_pb2 as pb
    from feedret.v1 import feedret_pb2_grpc as pb_grpc

    security = GrpcSecurityConfig()
    token = client_security(security)["token"]
    metadata = [("authorization", f"Bearer {token}")] if token else None
    parts = []
    for target in replicas:
        with open_channel(target, security) as channel:
            try:
                part = pb_grpc.IndexAdminStub(channel).Stats(pb.StatsRequest(), timeout=3, metadata=metadata).shards[0]
            except grpc.RpcError as exc:
                part = pb.ShardStats(reachable=False, error=exc.details() or exc.code().name)
        part.address = target
        parts.append(part)
    return shard_summary(shard, "|".join(replicas), parts)


# ---------------------------------------------------------------- query


def _load_member(spec: str) -> MemberProfile:
    """MEMBER as given: JSON, @file or '-' (stdin). Every mistake is one line (InputError)."""
    source = "member"
    try:
        if spec == "-":
            source = "member on stdin"
            text = sys.stdin.read()
        elif spec.startswith("@"):
            source = f"member file {spec[1:]}"
            text = Path(spec[1:]).read_text(encoding="utf-8")
        else:
            text = spec
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{source} is not UTF-8 text: {exc}") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        hint = "" if spec.lstrip().startswith(("@", "-", "{", "[")) else " (a file is given as @path)"
        raise InputError(f"{source} is not valid JSON: {exc}{hint}") from None
    try:
        return MemberProfile.from_json(obj)
    except ValueError as exc:
        raise InputError(f"{source}: {exc}") from None


@cli.command()
@click.argument("member", required=False)
@click.option("--post-id", type=post_id_type, help="Query with this indexed post's own vector.")
@click.option("--k", default=10, show_default=True, type=int)
@click.option("--exclude", multiple=True, type=post_id_type, help="Post id to exclude (repeatable).")
@click.option("--max-age", default=0, type=click.IntRange(min=0),
              help="Only posts created less than this many seconds ago, by their created_at; 0: any age. "
                   "(The sample posts were created 1996-2018.)")
@click.option("--lang", multiple=True, help="Only posts in this language (repeatable).")
@click.option("--timeout", default=2.0, show_default=True, type=float, callback=_seconds, help="Deadline in seconds.")
@root_option
@json_option
def query(member, post_id, k, exclude, max_age, lang, timeout, root, as_json) -> None:
    """Retrieve top-K posts for MEMBER (JSON, @file or '-') or for --post-id's vector."""
    if (member is None) == (post_id is None):
        raise click.UsageError("give either MEMBER (JSON) or --post-id")
    # Read and check the member before connecting: a typo should not wait on the network.
    profile = _load_member(member) if member is not None else None
    with _client(root) as client:
        kwargs: dict[str, Any] = dict(k=k, exclude_post_ids=exclude, max_age_seconds=max_age, languages=lang, timeout=timeout)
        if post_id is not None:
            found = _grpc_call(lambda: client.lookup(post_id, include_vector=True))
            if not found.found:
                click.echo(f"Error: post {post_id} is not indexed", err=True)
                sys.exit(1)
            result = _grpc_call(lambda: client.retrieve(vector=list(found.vector), **kwargs))
        else:
            result = _grpc_call(lambda: client.retrieve(member=profile, **kwargs))
    if as_json:
        _dump(_result_dict(result))
    else:
        _print_result(result)


@cli.command()
@click.argument("post_id", type=post_id_type)
@click.option("--vector", is_flag=True, help="Include the stored vector.")
@root_option
@json_option
def lookup(post_id: int, vector: bool, root: str, as_json: bool) -> None:
    """Is POST_ID indexed, on which shard, since when. Exit code 1 when not found."""
    with _client(root) as client:
        reply = _grpc_call(lambda: client.lookup(post_id, include_vector=vector))
    if as_json:
        _dump(_proto_dict(reply))
    elif reply.found:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(reply.indexed_at))
        click.echo(f"post {post_id}: indexed on shard {reply.shard} at {when} ({reply.model_version}, lang {reply.lang or '-'})")
        if vector:
            click.echo(f"vector[{len(reply.vector)}]: {list(reply.vector)[:8]} ...")
    else:
        click.echo(f"post {post_id}: not found (its shard would be {reply.shard})")
    sys.exit(0 if reply.found else 1)


@cli.command()
@root_option
@click.option("--bootstrap", envvar="KAFKA_BOOTSTRAP_SERVERS", default=f"127.0.0.1:{DEFAULT_BROKER_PORT}", show_default=True,
              help="Kafka, asked for the embedding consumer group's committed offsets.")
@click.option("--group", envvar="FEEDRET_CONSUMER_GROUP", default="feedret-embedder", show_default=True,
              help="The serving generation's consumer group (after a local rollout: feedret-embedder-g2, ...).")
@json_option
def stats(root: str, bootstrap: str, group: str, as_json: bool) -> None:
    """Posts per shard (from the root) and the consumer's committed offsets (from Kafka)."""
    from feedret.topics import group_offsets  # kafka-python: only for the commands that talk to Kafka

    with _client(root) as client:
        reply = _grpc_call(client.stats)
    # The root answers for the index only; the consumer group's offsets are Kafka's to tell.
    offsets = group_offsets(KafkaConfig(KAFKA_BOOTSTRAP_SERVERS=bootstrap), group)
    if as_json:
        _dump({**_proto_dict(reply), "consumer_offsets": [dataclasses.asdict(o) for o in offsets]})
        return
    click.echo(f"total indexed: {reply.total_indexed}  model: {reply.model_version or '-'}")
    for s in reply.shards:
        state = "up" if s.reachable else f"DOWN ({s.error})"
        applied = ", ".join(f"{o.topic}[{o.partition}]@{o.offset}" for o in s.applied)
        click.echo(
            f"  shard {s.shard} {s.address:<21} {state:<6} indexed {s.indexed:>9}  dim {s.dimension}  "
            f"{s.index_type}{' on ' + s.index_device if s.index_device else ''}"
            f"{f'  {s.vector_codec} {s.vector_bytes / 2**20:.1f} MiB' if s.vector_codec else ''}"
            f"  upserts {s.upserts} deletes {s.deletes} rejected {s.rejected}  applied {applied}"
        )
        if len(s.replicas) > 1:
            for r in s.replicas:
                status = ("ready" if r.ready else "catching up") if r.reachable else f"DOWN ({r.error})"
                at = ", ".join(str(o.offset) for o in r.applied) or "-"
                click.echo(f"    replica {r.address:<21} {status:<11} indexed {r.indexed:>9}  searches {r.searches}  applied {at}")
    shown = ", ".join(f"{o.topic}[{o.partition}]@{o.offset}" for o in offsets)
    click.echo(f"  consumer offsets: {shown or '-'}")


# ---------------------------------------------------------------- train


@cli.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=WORK_ROOT / "training" / "configs" / "movielens-tiny.json", show_default=True,
              help="Run configuration (JSON or YAML); the options below override it.")
@click.option("--dataset", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Dataset directory.")
@click.option("--out", type=click.Path(path_type=Path), help="Run directory (checkpoint/, model/, config.json).")
@click.option("--base-model", help="A local Hugging Face model directory, 'tiny' to build one, 'minilm', "
                                   "'smollm2' or a .gguf file.")
@click.option("--epochs", type=int)
@click.option("--seed", type=int)
@click.option("--device", help="cpu, cuda or auto.")
@click.option("--pooling", type=click.Choice(["last", "mean", "cls"]))
@click.option("--numeric", type=click.Choice(["quantized", "raw", "none"]), help="How numbers enter the prompts.")
@click.option("--hard-negatives", type=int, help="Mined hard negatives per member (0: in-batch only).")
@click.option("--model-version", help="Name the model reports to clients.")
def train(config_file: Path, **overrides) -> None:
    """Train a dual encoder (InfoNCE + Matryoshka); resumes from <out>/checkpoint if present."""
    from pydantic import ValidationError

    from feedret.encoder.gguf import GGUFError
    from feedret.encoder.minilm import MiniLMMissing
    from feedret.logging import configure_logging
    from feedret.training.config import TrainConfig
    from feedret.training.trainer import train as run_training

    configure_logging("train", json=False)
    try:
        config = TrainConfig.load(config_file, overrides)
    except (ValidationError, ValueError) as exc:
        raise click.ClickException(f"invalid training config {config_file}: {exc}") from None
    try:
        final = run_training(config)
    except (GGUFError, MiniLMMissing) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"model written to {final}")


@cli.command("convert-gguf")
@click.argument("source")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write (replaced if it exists).")
def convert_gguf_(source: str, out: Path) -> None:
    """Make a GGUF causal LM (a .gguf path, or 'smollm2') a Hugging Face directory that train and eval load."""
    from feedret.encoder.gguf import GGUFError, convert_gguf, gguf_source
    from feedret.logging import configure_logging

    configure_logging("convert", json=False)
    try:
        src = gguf_source(source)
        if src is None:
            raise GGUFError(f"{source!r} is neither 'smollm2' nor a path ending in .gguf")
        convert_gguf(src, out)
    except GGUFError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{src.name} written to {out} (zero-shot: feedret eval --model {out})")


# ---------------------------------------------------------------- eval


def _floats(ctx, param, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"comma-separated numbers, got {value!r}") from None


def _command_line(ctx: click.Context) -> str:
    """The command as typed (options given on the command line, in declaration order), for the report."""
    import shlex

    from click.core import ParameterSource

    words = ["feedret", ctx.info_name or "eval"]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        value, flag = ctx.params[param.name], param.opts[-1]
        if param.is_flag:
            words.append(flag)
        elif param.name == "widths":
            words += [flag, ",".join(f"{w:g}" for w in value)]
        else:
            for v in value if param.multiple else [value]:
                words += [flag, str(v)]
    return shlex.join(words)


@cli.command("eval")
@click.option("--dataset", type=click.Path(file_okay=False, path_type=Path),
              default=WORK_ROOT / "var" / "datasets" / "movielens", show_default=True,
              help="Dataset directory (python -m feedret.dataprep.movielens --format dataset makes one).")
@click.option("--model", "models", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An encoder directory to evaluate (repeatable); named by its model_version.")
@click.option("--no-minilm", is_flag=True, help="Skip the zero-shot all-MiniLM-L6-v2 baseline.")
@click.option("--no-baselines", is_flag=True,
              help="Skip the collaborative-filtering baselines (cold-start popularity, item-kNN, EASE, ALS); "
                   "popularity stays.")
@click.option("--test-fraction", default=0.2, show_default=True, type=float, help="Last fraction of interactions held out.")
@click.option("--like-threshold", default=4.0, show_default=True, type=float, help="Weight at which an engagement is a like.")
@click.option("--max-queries", default=3000, show_default=True, type=click.IntRange(min=0),
              help="Test moments evaluated (a deterministic sample); 0 for all.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--k", "ks", multiple=True, type=click.IntRange(min=1), default=(10, 100, 1000), show_default=True,
              help="Recall@K cut-offs (repeatable).")
@click.option("--ndcg-k", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--widths", default="1,0.5,0.25,0.125", show_default=True, callback=_floats,
              help="Matryoshka widths as fractions of each model's dimension.")
@click.option("--max-recent", default=10, show_default=True, type=click.IntRange(min=1),
              help="Liked items kept in a member's state.")
@click.option("--fresh-max-age", type=click.FloatRange(min=0),
              help="Fresh-post segment: also count positives created at most this many seconds before the moment "
                   "[default: only those created after the split].")
@click.option("--bootstrap-resamples", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Member bootstrap resamples for the intervals on differences from the best baseline.")
@click.option("--max-length", default=None, type=click.IntRange(min=8),
              help="Token limit for --model encoders.  [default: each model's own, from its feedret.json; 128 if it does not say]")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--torch-threads", type=click.IntRange(min=1), help="torch intra-op threads (default: torch's).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Report folder  [default: var/eval/<UTC timestamp>]")
@json_option
def eval_(dataset, models, no_minilm, no_baselines, test_fraction, like_threshold, max_queries, seed, ks, ndcg_k,
          widths, max_recent, fresh_max_age, bootstrap_resamples, max_length, batch_size, device, torch_threads, out,
          as_json) -> None:
    """Held-out retrieval quality of encoders vs popularity, CF baselines and MiniLM: results.json, results.md, plots."""
    from feedret.dataprep.format import DatasetError
    from feedret.evaluation.evaluate import BaselinesMissing, EvalConfig, run_eval
    from feedret.encoder.minilm import MiniLMMissing
    from feedret.logging import configure_logging

    configure_logging("eval", json=False)
    if not (dataset / "items.jsonl").exists():
        raise click.ClickException(
            f"no dataset at {dataset}; make the MovieLens one with: python -m feedret.dataprep.movielens "
            "--ml-dir <ml-latest-small> --format dataset --out var/datasets/movielens"
        )
    command = _command_line(click.get_current_context())
    out = out or WORK_ROOT / "var" / "eval" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    try:
        config = EvalConfig(
            dataset=dataset, test_fraction=test_fraction, like_threshold=like_threshold,
            max_queries=max_queries or None, seed=seed, ks=tuple(ks), ndcg_k=ndcg_k, widths=widths,
            max_recent=max_recent, fresh_max_age=fresh_max_age, bootstrap_resamples=bootstrap_resamples,
        )
        results = run_eval(
            config, models, minilm=not no_minilm, baselines=not no_baselines, max_length=max_length,
            batch_size=batch_size, device=device, torch_threads=torch_threads, out=out, command=command,
        )
    except (MiniLMMissing, BaselinesMissing, DatasetError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo((Path(out) / "results.json").read_text(encoding="utf-8").rstrip("\n"))
        return
    metric = "recall@100" if 100 in config.ks else f"recall@{config.ks[-1]}"
    segments = results["dataset"]["segments"]
    click.echo(f"{segments['all']} queries ({segments['cold_start']} cold start, {segments['fresh']} with a fresh "
               f"positive); {metric} / ndcg@{config.ndcg_k}:")
    for s in results["systems"]:
        for w in s["widths"]:
            cells = "  ".join(
                f"{seg} {w['segments'][seg][metric] or 0:.4f} / {w['segments'][seg][f'ndcg@{config.ndcg_k}'] or 0:.4f}"
                for seg in ("all", "cold_start", "fresh")
            )
            click.echo(f"  {s['name']:<28} {str(w['width'] or '-'):>5}  {cells}")
    click.echo(f"report written to {out}/results.md")


# ---------------------------------------------------------------- up


def _read_posts(path: Path) -> tuple[list[str], int, list[tuple[int, str]]]:
    """A posts file's lines, how many posts are searchable once all are applied, and its invalid lines."""
    from feedret.events import InvalidEvent, parse_post_event

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read posts file {path}: {exc}") from None
    live: dict[int, bool] = {}
    invalid = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = parse_post_event(line)
        except InvalidEvent as exc:
            invalid.append((n, str(exc)))
            continue
        live[event.post_id] = event.op == "upsert"
    return lines, sum(live.values()), invalid


def _read_members(path: Path) -> list[MemberProfile]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read members file {path}: {exc}") from None
    members = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            members.append(MemberProfile.from_json(json.loads(line)))
        except (ValueError, RecursionError) as exc:
            raise InputError(f"{path} line {n}: not a member: {exc}") from None
    return members


def _check_ports(ports: dict[str, int]) -> None:
    """Every port the stack needs is valid and free: otherwise one line saying which.

    A second `feedret up` on the same ports used to attach to the first: its readiness
    checks were answered by the first stack's servers, and it published into their broker.
    """
    from feedret.server.launcher import port_is_free

    for name, port in ports.items():
        if not 0 < port < 65536:
            raise click.ClickException(f"port {port} ({name}) is not a TCP port; choose lower base ports")
    busy = {name: port for name, port in ports.items() if not port_is_free(port)}
    if busy:
        listed = ", ".join(f"{port} ({name})" for name, port in busy.items())
        raise click.ClickException(
            f"port{'s' if len(busy) > 1 else ''} {listed} already in use: is another `feedret up` running? "
            "Stop it, or choose other ports (--root-port, --member-port, --shard-base-port, --broker-port, "
            "--metrics-base-port)"
        )


def _earlier_runs(snapshots_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in snapshots_dir.iterdir() if p.is_dir() and p.name.startswith("run-"))
    except OSError:
        return []


@cli.command()
@click.option("--shards", "num_shards", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1),
              help="Replicas per shard, each its own process; the root spreads queries over them and hedges.")
@click.option("--root-port", default=DEFAULT_ROOT_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--member-port", default=DEFAULT_MEMBER_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--shard-base-port", default=DEFAULT_SHARD_BASE_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--broker-port", default=DEFAULT_BROKER_PORT, show_default=True, type=click.IntRange(1, 65535),
              help="Embedded broker port.")
@click.option(
    "--metrics-base-port", default=DEFAULT_ROOT_METRICS_PORT, show_default=True, type=click.IntRange(0, 65535),
    help="Prometheus /metrics: root here, member +1, consumer +2, shard i (replica r) +10+r*shards+i; 0: off.",
)
@click.option("--snapshot-interval", "snapshot_interval_s", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between shard snapshots; a restarted shard resumes from its newest. With the embedded "
                   "broker, whose topics start empty every run, each run writes its own "
                   "WORKDIR/snapshots/run-<UTC time>/ and never loads an earlier run's; with "
                   "KAFKA_BOOTSTRAP_SERVERS, WORKDIR/snapshots/ is shared across runs. 0: off.")
@click.option("--posts", "posts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=SAMPLE_POSTS,
              show_default=True)
@click.option("--members", "members_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=SAMPLE_MEMBERS, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("var"), show_default=True,
              help="Logs (WORKDIR/logs, appended to) and shard snapshots (WORKDIR/snapshots), relative to the "
                   "current directory. Nothing in it is deleted unless --clean.")
@click.option("--clean", is_flag=True,
              help="Delete WORKDIR/snapshots (every earlier run's shard snapshots) before starting.")
@click.option("--no-publish", is_flag=True, help="Start the stack without publishing the sample posts.")
def up(
    num_shards, replicas, root_port, member_port, shard_base_port, broker_port, metrics_base_port, snapshot_interval_s,
    posts_file, members_file, workdir, clean, no_publish,
) -> None:
    """Bring up broker, consumer, shards, root and member servers; publish samples; serve until Ctrl-C.

    A server that exits is restarted; one that exits more than 5 times within 60 s is
    crash-looping and is left down, said on the terminal and at the end of its log, while
    the rest of the stack (the broker, holding every post, above all) keeps serving.
    """
    import structlog
    from kafka.errors import KafkaError

    from feedret.clients.publish import publish_lines
    from feedret.logging import configure_logging
    from feedret.server.grpc_security import client_security
    from feedret.server.launcher import Stack, StackConfig, wait_until
    from feedret.server.up_control import clear_state, hold_running_lock, take_request, write_state

    configure_logging("up", json=False)
    # Read and check the inputs before starting anything: a bad line should not cost a start.
    posts = _read_posts(posts_file) if not no_publish else None
    members = _read_members(members_file)
    config = StackConfig(
        num_shards=num_shards,
        replicas=replicas,
        root_port=root_port,
        member_port=member_port,
        shard_base_port=shard_base_port,
        broker_port=broker_port,
        metrics_base_port=metrics_base_port,
        snapshot_interval_s=snapshot_interval_s,
        bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None,
        workdir=workdir.absolute(),
    )
    stack = Stack(config)
    _check_ports(stack.ports())
    try:
        stack.log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot use --workdir {stack.workdir}: {exc.strerror or exc}") from None
    if clean and stack.snapshots_dir.exists():
        try:
            shutil.rmtree(stack.snapshots_dir)
        except OSError as exc:
            raise click.ClickException(f"--clean could not delete {stack.snapshots_dir}: {exc}") from None
        click.echo(f"deleted {stack.snapshots_dir} (--clean)")
    earlier = _earlier_runs(stack.snapshots_dir) if config.bootstrap_servers is None else []
    if posts is not None and posts[2]:
        (n, reason), count = posts[2][0], len(posts[2])
        click.echo(f"warning: {count} line{'s' if count > 1 else ''} of {posts_file} {'are' if count > 1 else 'is'} "
                   f"not a valid post event (line {n}: {reason}); the consumer sends them to the dead-letter topic",
                   err=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # `feedret rollout start|promote|abort` (feedret.server.up_control). A flag, not an Event: a
    # handler setting an Event could wait on the lock the interrupted main thread holds in clear().
    rollout_asked = [False]
    signal.signal(signal.SIGUSR1, lambda *_: rollout_asked.__setitem__(0, True))
    started = time.monotonic()
    try:
        stack.start()
    except (RuntimeError, TimeoutError, OSError, KafkaError) as exc:
        # Stack.start stopped whatever it had started; its message names the process and its log.
        raise click.ClickException(f"the stack did not start: {exc}\nlogs in {stack.log_dir}") from None
    failed = False
    try:
        client = FeedretClient(config.root_address, **client_security(stack.security))
        if posts is not None:
            lines, expected, _ = posts
            report = publish_lines(stack.kafka, lines)
            click.echo(f"published {report.sent} post events from {posts_file}; waiting until searchable ...")
            if not wait_until(lambda: _indexed(client) >= expected, timeout=180, interval=0.5):
                raise click.ClickException(
                    f"only {_indexed(client)} of {expected} posts searchable after 180 s; see logs in {stack.log_dir}"
                )
        click.echo("")
        click.echo(f"feedret is up in {time.monotonic() - started:.1f}s: {_indexed(client)} posts searchable")
        click.echo(f"  root (RetrievalService, IndexAdmin)  {config.root_address}")
        click.echo(f"  member (MemberEmbeddingService)      {config.member_address}")
        for i in range(num_shards):
            for r in range(replicas):
                label = f"shard {i}" + (f" replica {r}" if replicas > 1 else "")
                click.echo(f"  {label + ' (ShardService, IndexAdmin)':<36} {config.shard_address(i, r)}")
        click.echo(f"  kafka                                {stack.kafka.bootstrap_servers}")
        metrics_urls = stack.metrics_urls()
        if metrics_urls:
            ports = ", ".join(f"{name} {url.rsplit(':', 1)[1].split('/')[0]}" for name, url in metrics_urls.items())
            click.echo(f"  metrics (http://{config.host}:<port>/metrics)  {ports}")
        click.echo(f"  logs                                 {stack.log_dir}")
        if snapshot_interval_s > 0:
            click.echo(f"  snapshots                            {stack.snapshot_root}")
            if earlier:
                runs = f"{len(earlier)} earlier run{'s' if len(earlier) > 1 else ''}"
                click.echo(f"    (snapshots of {runs} beside it, never loaded: the embedded broker starts empty; "
                           "--clean deletes them)")
        if posts_file.exists():
            _demo(client, members, posts_file)
        click.echo("\nserving; Ctrl-C stops every process")
        sys.stdout.flush()
        window = stack.supervisor.window_s
        reply = None
        running_lock = hold_running_lock(stack.workdir)  # noqa: F841 - held until this process exits
        write_state(stack.workdir, stack.up_state(os.getpid()))

        def tick() -> None:
            # While a rollout step waits (a new generation starting): crashed servers are still
            # restarted, and Ctrl-C interrupts the step.
            for e in stack.supervise():
                click.echo(f"{e.process} exited during the rollout step; {e.action} (exit code {e.code})", err=True)
            if stop.is_set():
                raise KeyboardInterrupt

        while not stop.is_set():
            stop.wait(0.5)
            try:
                if rollout_asked[0]:
                    rollout_asked[0] = False
                    request = take_request(stack.workdir)
                    # The state first, then the line: whoever reads the line may read up.json next.
                    if request is not None:
                        reply = _rollout_step(stack, request, tick)
                        write_state(stack.workdir, stack.up_state(os.getpid(), reply))
                        click.echo(reply.message, err=not reply.ok)
                for line in stack.advance():
                    write_state(stack.workdir, stack.up_state(os.getpid(), reply))
                    click.echo(line, err="FAILED" in line)
                for gen in stack.retire_due():
                    write_state(stack.workdir, stack.up_state(os.getpid(), reply))
                    click.echo(f"generation {gen.name} retired: its consumer, member service and shards are stopped")
            except KeyboardInterrupt:
                break
            except Exception as exc:  # noqa: BLE001 - a rollout's trouble must not take the serving stack down
                structlog.get_logger("feedret.up").exception("rollout_step_failed")
                click.echo(f"rollout: {type(exc).__name__}: {exc} (the serving generation serves on)", err=True)
            # A crashed server is restarted (the root answers partial=true meanwhile); a
            # crash-looping one is left down; only the embedded broker's exit ends the stack.
            try:
                exits = stack.supervise()
            except RuntimeError as exc:
                click.echo(f"{exc}\nstopping. Logs in {stack.log_dir}", err=True)
                failed = True
                break
            for e in exits:
                if e.action == "restart":
                    click.echo(f"{e.process} exited; restarted it (exit code {e.code}, exit {e.exits} within "
                               f"{window:g} s; log: {e.log})", err=True)
                    continue
                tail = "\n".join(f"  | {line}" for line in stack.log_tail(e.process, 6).splitlines())
                click.echo(
                    f"{e.process} GIVEN UP: it exited {e.exits} times within {window:g} s (last exit code {e.code}), "
                    f"so it is not restarted again.\n  The rest of the stack keeps serving; "
                    f"{stack.consequence(e.process)}.\n  Its log (restart feedret up once it says why): {e.log}\n{tail}",
                    err=True,
                )
        click.echo("stopping ...")
    finally:
        clear_state(stack.workdir)
        stack.stop()
    click.echo("stopped")
    if failed:
        sys.exit(1)


def _rollout_step(stack, request, tick: Callable[[], None] | None = None) -> "RolloutReply":
    """One `feedret rollout` request, carried out by `feedret up` on its own stack; any failure is
    its reply (`tick` runs while a step waits, and may raise KeyboardInterrupt to end it)."""
    from feedret.server.up_control import RolloutReply, Unreadable

    def answer(ok: bool, message: str) -> RolloutReply:
        return RolloutReply(id=request.id, ok=ok, message=message)

    if isinstance(request, Unreadable):
        return answer(False, request.reason)
    serving = stack.generations[0]
    try:
        if request.action == "start":
            shards = request.shards or serving.num_shards
            gen = stack.start_generation(request.model_dir, request.model_version, shards, stack.config.ready_timeout_s,
                                         request.index_factory, request.posts_file, tick=tick)
            if request.posts_file:
                return answer(True, f"generation {gen.name} (model {gen.model_version}, {shards} shards) is up beside "
                                    f"{serving.name}; it embeds {request.posts_file} into {gen.vectors_topic} first "
                                    f"(log {gen.prefix}backfill.log), then its consumer group {gen.consumer_group} "
                                    "every post of `posts`. `feedret rollout status` says when it holds every live post.")
            index = f", index {gen.index_factory}" if gen.index_factory else ""
            return answer(True, f"generation {gen.name} (model {gen.model_version}, {shards} shards{index}) is up beside "
                                f"{serving.name}; its consumer group {gen.consumer_group} is embedding every post "
                                f"into {gen.vectors_topic}. `feedret rollout status` says when it holds every live post.")
        if request.action == "promote":
            new = stack.generations[1] if len(stack.generations) > 1 else None
            old = stack.promote(request.grace_s)
            return answer(True, f"generation {new.name} serves now: the root asks its member service and its shards; "
                                f"{old.name} answers queries of its own model for {request.grace_s:g} s more, then stops.")
        gen = stack.abort()
        return answer(True, f"generation {gen.name} aborted: its processes are stopped ({gen.vectors_topic} stays in "
                            f"Kafka); {serving.name} serves as before.")
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - RolloutError, a process that would not start, Kafka, ...
        return answer(False, f"rollout {request.action} failed: {exc}")


def _indexed(client: FeedretClient) -> int:
    try:
        return client.stats(timeout=2).total_indexed
    except grpc.RpcError:
        return 0


def _demo(client: FeedretClient, members: list[MemberProfile], posts_file: Path) -> None:
    texts = {}
    for line in posts_file.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
            texts[obj["post_id"]] = obj.get("text", "")
        except (ValueError, TypeError, KeyError):
            continue  # an invalid line, already reported: no text to show for it
    for member in members[:2]:
        recent = "; ".join(a.text.split(".")[0] for a in member.recent_activity[:3])
        click.echo(f"\nmember {member.member_id} recently engaged with: {recent}")
        exclude = [a.post_id for a in member.recent_activity]
        try:
            result = client.retrieve(member=member, k=5, exclude_post_ids=exclude, timeout=5)
        except grpc.RpcError as exc:
            click.echo(f"retrieval failed: {exc.code().name}: {((exc.details() or '').splitlines() or ['-'])[0]}")
            continue
        _print_result(result, texts, limit=5)


def main() -> None:
    """The `feedret` entry point: click, except that a usage error is one line, not a usage block."""
    try:
        code = cli.main(prog_name="feedret", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # bare `feedret` or `feedret <group>`: the help is the answer
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "feedret"
        click.echo(f"Error: {exc.format_message()} (see '{where} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    # standalone_mode=False returns ctx.exit()'s code (e.g. --help's 0) instead of exiting.
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
