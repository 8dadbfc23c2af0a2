"""The Kubernetes manifests (k8s/) and images (docker/) agree with the code.

Offline and fast: every overlay is rendered with `kubectl kustomize`, every
object is validated against the Kubernetes API schema of its kind (the schemas
ship with the kubernetes-validate package), Strimzi objects are checked for
the fields their operator needs, and the manifests are cross-checked against
feedret itself: entrypoints, the env vars its config classes read, ports,
and the shard topology (shard ids, FEEDRET_NUM_SHARDS, post-vectors
partitions, the root's shard addresses).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import warnings
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator
from unittest import mock

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib
from pydantic import AliasChoices, AliasPath
from pydantic_settings import BaseSettings

import feedret.config as feedret_config
from feedret.config import ConsumerConfig, EncoderConfig, GrpcSecurityConfig, KafkaConfig, MemberConfig, RootConfig, ShardConfig
from feedret.encoder.onnx_backend import ONNX_DIR
from feedret.metrics import METRICS_PATH
from feedret.server.roles import ROLES
from feedret.shard_targets import host_port, is_pool, parse_member_targets
from feedret.topics import VECTORS_TOPIC_CONFIG

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
DOCKER = REPO / "docker"
DOCS = REPO / "docs" / "kubernetes.md"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# The oldest Kubernetes the manifests support (native gRPC probes, matchLabelKeys,
# StatefulSet PVC retention are on by default from 1.27; 1.29 is the floor we
# document) and the newest whose schemas kubernetes-validate ships.
OLDEST_KUBERNETES = "1.29.0"

# Which config objects each role builds (server/roles.py run()).
ROLE_CONFIGS: dict[str, tuple[type[BaseSettings], ...]] = {
    "consumer": (KafkaConfig, ConsumerConfig, EncoderConfig),
    "shard": (KafkaConfig, ShardConfig),
    "root": (RootConfig,),  # the root answers for the index; it never reads Kafka
    "member": (MemberConfig, EncoderConfig),
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
STRIMZI_GROUP = "kafka.strimzi.io"
MONITORING_GROUP = "monitoring.coreos.com"
# Custom resources: no Kubernetes schema; checked by test_strimzi_objects and test_podmonitors.
CERT_MANAGER_GROUP = "cert-manager.io"
CUSTOM_GROUPS = {STRIMZI_GROUP, MONITORING_GROUP, CERT_MANAGER_GROUP}
SHARD_LABEL = "feedret.io/shard"
COMPONENT_LABEL = "app.kubernetes.io/component"
ANY_HOST = {"0.0.0.0", "::", "[::]", ""}


# ---------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=None)
def _render(overlay: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render k8s/overlays with `kubectl kustomize`")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def docs(overlay) -> tuple[dict, ...]:
    return _render(overlay)


def _name(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _pod_template(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"]["template"]


def _workloads(docs) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def _containers(docs) -> Iterator[tuple[dict, dict, dict]]:
    """(workload, pod template, container) for every container, init containers included."""
    for obj in _workloads(docs):
        tpl = _pod_template(obj)
        for c in [*tpl["spec"].get("initContainers", []), *tpl["spec"]["containers"]]:
            yield obj, tpl, c


def _role(container: dict) -> str | None:
    cmd = [*container.get("command", []), *container.get("args", [])]
    return cmd[2] if cmd[:2] == ["feedret", "serve"] and len(cmd) == 3 else None


def _feedret_containers(docs) -> Iterator[tuple[dict, dict, dict, str]]:
    for obj, tpl, c in _containers(docs):
        role = _role(c)
        if role is not None:
            yield obj, tpl, c, role


def _labels_match(selector: dict, labels: dict) -> bool:
    """A Service's selector (a plain map) or a LabelSelector (matchLabels) against pod labels."""
    assert "matchExpressions" not in selector, "the manifests use no matchExpressions; teach the test about them"
    match = selector["matchLabels"] if "matchLabels" in selector else selector
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def _replicas(obj: dict) -> int:
    return obj["spec"].get("replicas", 1)


# ---------------------------------------------------------------- env resolution


def _quantity(value: str | int | float) -> float:
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def _resolve_env(docs, tpl: dict, container: dict) -> tuple[dict[str, str], set[str]]:
    """The container's environment as Kubernetes would build it.

    Returns (resolved name -> value, names whose values come from Secrets and so
    cannot be known here). Later sources win, as in Kubernetes: envFrom in
    order, then env.
    """
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in _of_kind(docs, "ConfigMap")}
    env: dict[str, str] = {}
    unknown: set[str] = set()
    for src in container.get("envFrom", []):
        prefix = src.get("prefix", "")
        if "configMapRef" in src:
            ref = src["configMapRef"]
            assert ref["name"] in configmaps or ref.get("optional"), f"envFrom names a missing ConfigMap {ref['name']}"
            for k, v in configmaps.get(ref["name"], {}).items():
                env[prefix + k] = v
                unknown.discard(prefix + k)
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            env[name] = var["value"]
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            m = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
            assert m, f"{name}: fieldRef {path} is not resolved by this test"
            labels = tpl["metadata"].get("labels", {})
            assert m.group(1) in labels, f"{name} reads label {m.group(1)}, which the pod does not carry"
            env[name] = labels[m.group(1)]
        elif "resourceFieldRef" in ref:
            rf = ref["resourceFieldRef"]
            target = container if rf.get("containerName", container["name"]) == container["name"] else None
            assert target is not None, f"{name}: resourceFieldRef to another container"
            kind, _, resource = rf["resource"].partition(".")
            amount = target.get("resources", {}).get(kind, {}).get(resource)
            assert amount is not None, f"{name} reads {rf['resource']}, which the container does not set"
            env[name] = str(math.ceil(_quantity(amount) / _quantity(rf.get("divisor", 1))))
        elif "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            env[name] = configmaps[key["name"]][key["key"]]
        elif "secretKeyRef" in ref:
            unknown.add(name)
            env.pop(name, None)
        else:
            raise AssertionError(f"{name}: unknown valueFrom {ref}")
    return env, unknown


@functools.lru_cache(maxsize=None)
def _config_env_names() -> frozenset[str]:
    """Every environment variable some config class in feedret.config reads, from the models themselves."""
    names: set[str] = set()
    classes = [
        obj
        for obj in vars(feedret_config).values()
        if isinstance(obj, type) and issubclass(obj, BaseSettings) and obj.model_fields
    ]
    assert classes, "feedret.config defines no settings classes"
    for cls in classes:
        prefix = cls.model_config.get("env_prefix", "")
        for field_name, field in cls.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                names.update(c for c in alias.choices if isinstance(c, str))
            elif isinstance(alias, str):
                names.add(alias)
            elif isinstance(alias, AliasPath):
                names.add(str(alias.path[0]))
            elif field.alias:
                names.add(field.alias)
            else:
                names.add(prefix + field_name)
    # pydantic-settings matches names case-insensitively unless told otherwise.
    return frozenset(n.upper() for n in names)


@functools.lru_cache(maxsize=None)
def _pending_env_names() -> frozenset[str]:
    """Env vars the manifests set ahead of the code, as documented in docs/kubernetes.md.

    They are the rows of the table under the heading "Environment variables set
    ahead of the code"; nothing else in the docs exempts a variable.
    """
    if not DOCS.is_file():
        return frozenset()
    names: set[str] = set()
    in_section = False
    for line in DOCS.read_text().splitlines():
        if line.startswith("#"):
            in_section = "environment variables set ahead of the code" in line.lower()
            continue
        m = re.match(r"\|\s*`((?:FEEDRET|KAFKA)_[A-Z0-9_]+)`\s*\|", line)
        if in_section and m:
            names.add(m.group(1))
    return frozenset(names)


def _is_feedret_var(name: str) -> bool:
    return name.startswith(("FEEDRET_", "KAFKA_"))


def _build_configs(env: dict[str, str], role: str) -> dict[type, BaseSettings]:
    """The role's config objects as the role would build them from this environment."""
    usable = {k: v for k, v in env.items() if k not in _pending_env_names()}
    with mock.patch.dict(os.environ, usable, clear=True):
        return {cls: cls() for cls in ROLE_CONFIGS[role]}


# ---------------------------------------------------------------- rendering and schemas


def test_every_overlay_is_found():
    assert {"dev", "prod"} <= set(OVERLAYS)


def test_overlay_renders(docs):
    assert docs
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), d


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_objects_validate_against_the_kubernetes_schema(docs, version):
    failures = _schema_failures(docs, version)
    assert not failures, "\n".join(failures)


def _schema_failures(docs, version: str) -> list[str]:
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    failures = []
    for d in docs:
        if d["apiVersion"].split("/")[0] in CUSTOM_GROUPS:
            continue  # custom resources: test_strimzi_objects, test_podmonitors
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            failures.append(f"{_name(d)}: no Kubernetes {version} schema for {d['apiVersion']}")
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{_name(d)}: {exc.message} at {'/'.join(map(str, exc.absolute_path))}")
    return failures


def test_strimzi_objects(docs):
    strimzi = [d for d in docs if d["apiVersion"].split("/")[0] == STRIMZI_GROUP]
    assert {"KafkaTopic"} <= {d["kind"] for d in strimzi}
    kafkas = {d["metadata"]["name"]: d for d in _of_kind(strimzi, "Kafka")}
    for d in strimzi:
        assert d["apiVersion"] == f"{STRIMZI_GROUP}/v1beta2", _name(d)
        spec = d["spec"]
        if d["kind"] in ("KafkaTopic", "KafkaNodePool"):
            cluster = d["metadata"].get("labels", {}).get("strimzi.io/cluster")
            assert cluster, f"{_name(d)} has no strimzi.io/cluster label: no operator would pick it up"
            if kafkas:
                assert cluster in kafkas, f"{_name(d)} belongs to Kafka {cluster}, which this overlay does not define"
            assert isinstance(spec.get("replicas"), int) and spec["replicas"] >= 1, _name(d)
        if d["kind"] == "KafkaTopic":
            assert isinstance(spec.get("partitions"), int) and spec["partitions"] >= 1, _name(d)
            assert re.fullmatch(r"[a-zA-Z0-9._-]+", spec.get("topicName", d["metadata"]["name"])), _name(d)
        elif d["kind"] == "KafkaNodePool":
            assert spec.get("roles") and set(spec["roles"]) <= {"controller", "broker"}, _name(d)
            assert spec.get("storage", {}).get("type") in ("ephemeral", "persistent-claim", "jbod"), _name(d)
        elif d["kind"] == "Kafka":
            assert spec["kafka"]["listeners"], _name(d)
            assert "topicOperator" in spec.get("entityOperator", {}), f"{_name(d)}: KafkaTopics need the Topic Operator"
    for name, kafka in kafkas.items():
        pools = [p for p in _of_kind(strimzi, "KafkaNodePool") if p["metadata"]["labels"]["strimzi.io/cluster"] == name]
        assert pools, f"Kafka {name} has no KafkaNodePool"
        brokers = sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"])
        for topic in _of_kind(strimzi, "KafkaTopic"):
            assert topic["spec"]["replicas"] <= brokers, f"{_name(topic)} wants more replicas than Kafka {name} has brokers"
            isr = int(topic["spec"].get("config", {}).get("min.insync.replicas", 1))
            assert isr <= topic["spec"]["replicas"], f"{_name(topic)}: min.insync.replicas above its replicas"
        # The in-overlay cluster is the one the pods talk to.
        listeners = kafka["spec"]["kafka"]["listeners"]
        wanted = {f"{name}-kafka-bootstrap:{ls['port']}" for ls in listeners if ls["type"] == "internal" and not ls.get("tls")}
        for obj, tpl, c, role in _feedret_containers(docs):
            env, _ = _resolve_env(docs, tpl, c)
            assert env.get("KAFKA_BOOTSTRAP_SERVERS") in wanted, f"{_name(obj)}: KAFKA_BOOTSTRAP_SERVERS not one of {wanted}"


# ---------------------------------------------------------------- entrypoints and env


def test_every_container_runs_a_real_entrypoint(docs):
    from feedret.clients.cli import cli

    scripts = PYPROJECT["project"]["scripts"]
    assert scripts.get("feedret") == "feedret.clients.cli:main"
    serve = cli.commands["serve"]
    assert set(serve.params[0].type.choices) == set(ROLES)
    seen = set()
    for obj, _tpl, c in _containers(docs):
        role = _role(c)
        assert role in ROLES, (
            f"{_name(obj)} container {c['name']} runs {c.get('command')} {c.get('args')}, "
            f"not `feedret serve <role>` with a role in {ROLES}"
        )
        assert obj["metadata"]["labels"].get(COMPONENT_LABEL) == role, f"{_name(obj)}: component label is not {role}"
        seen.add(role)
    assert seen == set(ROLES), f"roles without a workload: {set(ROLES) - seen}"


def test_env_vars_are_read_by_a_config_class(docs):
    known = _config_env_names() | _pending_env_names()
    unknown = []
    for obj, tpl, c in _containers(docs):
        env, from_secrets = _resolve_env(docs, tpl, c)
        for name in sorted(set(env) | from_secrets):
            if _is_feedret_var(name) and name not in known:
                unknown.append(f"{_name(obj)} sets {name}")
    for cm in _of_kind(docs, "ConfigMap"):
        for name in cm.get("data", {}):
            if _is_feedret_var(name) and name not in known:
                unknown.append(f"{_name(cm)} sets {name}")
    assert not unknown, "no config class in feedret.config reads these (and docs/kubernetes.md does not list them as pending):\n" + "\n".join(unknown)


def test_pending_env_vars_are_still_pending():
    # A warning, not a failure: the code landing first must not break the suite,
    # but docs/kubernetes.md should then drop the variable from its pending list.
    stale = sorted(_pending_env_names() & _config_env_names())
    if stale:
        warnings.warn(f"docs/kubernetes.md lists {stale} as pending, but feedret.config reads them now", stacklevel=1)


def test_role_configs_build_from_manifest_env(docs):
    for obj, tpl, c, role in _feedret_containers(docs):
        env, _ = _resolve_env(docs, tpl, c)
        try:
            _build_configs(env, role)
        except Exception as exc:  # pydantic's ValidationError names the bad field
            pytest.fail(f"{_name(obj)} ({role}): its env does not make a valid config: {exc}")


def test_ports_and_probes_match_the_config(docs):
    for obj, tpl, c, role in _feedret_containers(docs):
        env, _ = _resolve_env(docs, tpl, c)
        configs = _build_configs(env, role)
        served = [cfg for cfg in configs.values() if "port" in type(cfg).model_fields]
        (role_cfg,) = [cfg for cfg in configs.values() if "metrics_port" in type(cfg).model_fields]
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        # Every role serves Prometheus metrics on the port its config reads (FEEDRET_METRICS_PORT).
        assert role_cfg.metrics_port, f"{_name(obj)} ({role}) turns its metrics endpoint off"
        assert ports.get("metrics") == role_cfg.metrics_port, (
            f"{_name(obj)} ({role}) declares ports {ports}; the role serves metrics on {role_cfg.metrics_port}"
        )
        assert role_cfg.host in ANY_HOST, f"{_name(obj)} ({role}) binds {role_cfg.host}: unreachable from outside the pod"
        if not served:
            assert set(ports) == {"metrics"}, f"{_name(obj)} ({role}) declares ports {ports}, but the role serves no gRPC"
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert probe not in c, f"{_name(obj)} ({role}) has a {probe}, but nothing to probe"
            continue
        (cfg,) = served
        assert ports == {"grpc": cfg.port, "metrics": cfg.metrics_port}, (
            f"{_name(obj)} ({role}) declares ports {ports}; the role listens on {cfg.port} (gRPC) and {cfg.metrics_port} (metrics)"
        )
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in c:
                assert "grpc" in c[probe], f"{_name(obj)} {probe} is not a native gRPC probe"
                assert c[probe]["grpc"]["port"] == cfg.port, f"{_name(obj)} {probe} probes a port the role does not serve"
        assert "livenessProbe" in c and "readinessProbe" in c, f"{_name(obj)} ({role}) lacks liveness/readiness probes"


def _service_port_targets(svc: dict, pod_containers: list[dict]) -> list[int]:
    named = {p["name"]: p["containerPort"] for c in pod_containers for p in c.get("ports", []) if "name" in p}
    out = []
    for p in svc["spec"]["ports"]:
        target = p.get("targetPort", p["port"])
        out.append(named[target] if isinstance(target, str) else target)
    return out


def test_services_select_pods_and_their_ports(docs):
    for svc in _of_kind(docs, "Service"):
        selected = [
            o for o in _workloads(docs) if _labels_match(svc["spec"]["selector"], _pod_template(o)["metadata"]["labels"])
        ]
        assert selected, f"{_name(svc)} selects no pods"
        for o in selected:
            containers = _pod_template(o)["spec"]["containers"]
            have = {p["containerPort"] for c in containers for p in c.get("ports", [])}
            for target in _service_port_targets(svc, containers):
                assert target in have, f"{_name(svc)} targets port {target}, which {_name(o)} does not serve"


# ---------------------------------------------------------------- topology


def _topics(docs) -> dict[str, dict]:
    return {t["spec"].get("topicName", t["metadata"]["name"]): t for t in _of_kind(docs, "KafkaTopic")}


def _kafka_config(docs) -> KafkaConfig:
    """The KafkaConfig every role that uses Kafka builds; they must agree."""
    seen = {}
    for obj, tpl, c, role in _feedret_containers(docs):
        if KafkaConfig not in ROLE_CONFIGS[role]:
            continue
        env, _ = _resolve_env(docs, tpl, c)
        seen[_name(obj)] = _build_configs(env, role)[KafkaConfig]
    values = {json.dumps(cfg.model_dump(mode="json"), sort_keys=True) for cfg in seen.values()}
    assert len(values) == 1, f"roles disagree on the Kafka settings: {seen}"
    return next(iter(seen.values()))


def _host_matches(host: str, service: str) -> bool:
    return host == service or host.startswith(service + ".")


def test_shards_topic_and_root_agree(docs):
    shard_sets = [o for o in _workloads(docs) if o["metadata"]["labels"].get(COMPONENT_LABEL) == "shard"]
    assert shard_sets, "no shard workloads"
    num_shards = len(shard_sets)
    kafka = _kafka_config(docs)
    services = {s["metadata"]["name"]: s for s in _of_kind(docs, "Service")}

    # Each shard: a StatefulSet whose pods know their shard id from their identity.
    by_id: dict[int, dict] = {}
    for sts in shard_sets:
        assert sts["kind"] == "StatefulSet", f"{_name(sts)}: shards are StatefulSets"
        tpl = _pod_template(sts)
        (c,) = tpl["spec"]["containers"]
        env, _ = _resolve_env(docs, tpl, c)
        cfg = _build_configs(env, "shard")[ShardConfig]
        assert cfg.shard_id not in by_id, f"{_name(sts)} repeats shard id {cfg.shard_id}"
        assert tpl["metadata"]["labels"].get(SHARD_LABEL) == str(cfg.shard_id), f"{_name(sts)}: label and shard id differ"
        assert sts["spec"]["selector"]["matchLabels"].get(SHARD_LABEL) == str(cfg.shard_id), (
            f"{_name(sts)}: its selector would also adopt other shards' pods"
        )
        by_id[cfg.shard_id] = sts
    assert sorted(by_id) == list(range(num_shards)), f"shard ids {sorted(by_id)} are not 0..{num_shards - 1}"

    # FEEDRET_NUM_SHARDS wherever a role reads it.
    for obj, tpl, c, role in _feedret_containers(docs):
        env, _ = _resolve_env(docs, tpl, c)
        for cfg in _build_configs(env, role).values():
            if "num_shards" in type(cfg).model_fields:
                assert cfg.num_shards == num_shards, f"{_name(obj)} ({role}) has num_shards={cfg.num_shards}, not {num_shards}"
    for cm in _of_kind(docs, "ConfigMap"):
        if "FEEDRET_NUM_SHARDS" in cm.get("data", {}):
            assert int(cm["data"]["FEEDRET_NUM_SHARDS"]) == num_shards, _name(cm)

    # One post-vectors partition per shard; the posts topic bounds the consumers.
    topics = _topics(docs)
    assert set(topics) >= {kafka.posts_topic, kafka.vectors_topic, kafka.dlq_topic}, f"KafkaTopics: {sorted(topics)}"
    assert topics[kafka.vectors_topic]["spec"]["partitions"] == num_shards
    assert topics[kafka.posts_topic]["spec"]["partitions"] == kafka.posts_partitions
    # The post-vector topic as feedret.topics creates it: compacted, deletes as tombstones kept
    # long enough that no shard restores a snapshot from before a tombstone that is gone.
    vectors_config = {k: str(v) for k, v in topics[kafka.vectors_topic]["spec"].get("config", {}).items()}
    for key, value in VECTORS_TOPIC_CONFIG.items():
        assert vectors_config.get(key) == value, f"{kafka.vectors_topic} {key}={vectors_config.get(key)}, not {value}"
    for shard_id, sts in by_id.items():
        tpl = _pod_template(sts)
        env, _ = _resolve_env(docs, tpl, tpl["spec"]["containers"][0])
        max_age = _build_configs(env, "shard")[ShardConfig].snapshot_max_age_s
        assert 0 < max_age * 1000 < int(vectors_config["delete.retention.ms"]), (
            f"shard {shard_id} restores snapshots up to {max_age}s old, longer than tombstones are kept"
        )

    # The root lists exactly the shards' headless Services, in shard order, each as a
    # dns: pool, so it spreads queries over (and hedges between) every ready replica.
    roots = [(o, t, c) for o, t, c, role in _feedret_containers(docs) if role == "root"]
    assert roots
    for obj, tpl, c in roots:
        env, _ = _resolve_env(docs, tpl, c)
        root = _build_configs(env, "root")[RootConfig]
        targets = root.shard_replicas()
        assert len(targets) == num_shards, f"{_name(obj)} lists {len(targets)} shards, there are {num_shards}"
        for shard_id, replicas in enumerate(targets):
            sts = by_id[shard_id]
            assert len(replicas) == 1 and is_pool(replicas[0]), (
                f"root target for shard {shard_id} is {replicas}: one dns:///<headless Service>:<port> pool, "
                f"or the root would not spread over the StatefulSet's {_replicas(sts)} replicas"
            )
            (address,) = replicas
            host, port = host_port(address)
            svc = services.get(sts["spec"]["serviceName"])
            assert svc is not None, f"{_name(sts)} names a missing governing Service"
            assert svc["spec"].get("clusterIP") == "None", f"{_name(svc)} must be headless to list the shard's replicas"
            assert _labels_match(svc["spec"]["selector"], _pod_template(sts)["metadata"]["labels"])
            others = [o for o in shard_sets if o is not sts]
            assert not any(_labels_match(svc["spec"]["selector"], _pod_template(o)["metadata"]["labels"]) for o in others), (
                f"{_name(svc)} also selects other shards' pods"
            )
            assert _host_matches(host, svc["metadata"]["name"]), (
                f"root address {shard_id} is {address}; shard {shard_id}'s Service is {svc['metadata']['name']}"
            )
            (shard_c,) = _pod_template(sts)["spec"]["containers"]
            assert [int(port)] == [p["containerPort"] for p in shard_c["ports"] if p["name"] == "grpc"], (
                f"root address {address}: wrong port"
            )
            assert int(port) in [p["port"] for p in svc["spec"]["ports"]], f"{_name(svc)} does not expose {port}"
        # ... and the member pods: a dns: pool over a headless Service, so the root sees every
        # pod (one connection per pod, each member kept on its pod) rather than one virtual IP.
        (member_target,) = parse_member_targets(root.member_address)
        assert is_pool(member_target), f"FEEDRET_MEMBER_ADDRESS {member_target} must be dns:///<headless Service>:<port>"
        host, port = host_port(member_target)
        svc = services.get(host.split(".")[0])
        assert svc is not None, f"FEEDRET_MEMBER_ADDRESS {root.member_address} names no Service"
        assert svc["spec"].get("clusterIP") == "None", f"{_name(svc)} must be headless to list the member pods"
        members = [o for o, t, c, role in _feedret_containers(docs) if role == "member"]
        assert all(_labels_match(svc["spec"]["selector"], _pod_template(o)["metadata"]["labels"]) for o in members)
        assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
        member_ports = [p["containerPort"] for o in members for p in _pod_template(o)["spec"]["containers"][0]["ports"]
                        if p["name"] == "grpc"]
        assert member_ports and all(p == port for p in member_ports), f"member pods listen on {member_ports}, not {port}"


def _max_surge(obj: dict) -> int:
    if obj["kind"] != "Deployment":
        return 0
    strategy = obj["spec"].get("strategy", {})
    if strategy.get("type") == "Recreate":
        return 0
    surge = strategy.get("rollingUpdate", {}).get("maxSurge", "25%")
    if isinstance(surge, str) and surge.endswith("%"):
        return math.ceil(_replicas(obj) * int(surge[:-1]) / 100)
    return int(surge)


def test_consumers_never_exceed_posts_partitions(docs):
    kafka = _kafka_config(docs)
    partitions = _topics(docs)[kafka.posts_topic]["spec"]["partitions"]
    assert partitions == kafka.posts_partitions
    consumers = [o for o, t, c, role in _feedret_containers(docs) if role == "consumer"]
    assert consumers
    total = sum(_replicas(o) + _max_surge(o) for o in consumers)
    assert total <= partitions, f"up to {total} consumers (replicas + rollout surge) for {partitions} partitions of {kafka.posts_topic}"
    for hpa in _of_kind(docs, "HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"]["name"] in {o["metadata"]["name"] for o in consumers}:
            assert hpa["spec"]["maxReplicas"] <= partitions, f"{_name(hpa)} may scale past {partitions} partitions"


# ---------------------------------------------------------------- operability


def test_workloads_are_production_shaped(docs, overlay):
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in _of_kind(docs, "HorizontalPodAutoscaler")}
    pdbs = _of_kind(docs, "PodDisruptionBudget")
    for obj in _workloads(docs):
        tpl = _pod_template(obj)
        spec = tpl["spec"]
        labels = tpl["metadata"]["labels"]
        # Service links inject FEEDRET_<SERVICE>_PORT=tcp://..., which collide with our prefix.
        assert spec.get("enableServiceLinks") is False, f"{_name(obj)}: enableServiceLinks must be false"
        assert spec.get("securityContext", {}).get("runAsNonRoot") is True, f"{_name(obj)}: not runAsNonRoot"
        assert spec.get("topologySpreadConstraints"), f"{_name(obj)}: replicas are not spread"
        for tsc in spec["topologySpreadConstraints"]:
            assert _labels_match(tsc["labelSelector"], labels), f"{_name(obj)}: spread constraint ignores its own pods"
        assert any(_labels_match(p["spec"]["selector"], labels) for p in pdbs), f"{_name(obj)}: no PodDisruptionBudget"
        for c in spec["containers"]:
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in c.get("resources", {}).get(kind, {}), f"{_name(obj)}/{c['name']}: no {kind}.{resource}"
            assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, f"{_name(obj)}/{c['name']}"
        # Secrets are optional so a fresh apply works before anyone creates them.
        for vol in spec.get("volumes", []):
            if "secret" in vol:
                assert vol["secret"].get("optional") is True, f"{_name(obj)}: Secret volume {vol['name']} is not optional"
        for c in spec["containers"]:
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    assert src["secretRef"].get("optional") is True, f"{_name(obj)}: secretRef is not optional"
            for var in c.get("env", []):
                if "secretKeyRef" in var.get("valueFrom", {}):
                    assert var["valueFrom"]["secretKeyRef"].get("optional") is True, f"{_name(obj)}: {var['name']}"
        role = _role(spec["containers"][0])
        if role in ("root", "member") and overlay != "dev":
            assert obj["metadata"]["name"] in hpas, f"{_name(obj)} has no HorizontalPodAutoscaler"
            assert "replicas" not in obj["spec"], f"{_name(obj)}: the HPA owns replicas; a fixed count fights it on every apply"
        if role == "shard":
            mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0].get("volumeMounts", [])}
            claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
            env, _ = _resolve_env(docs, tpl, spec["containers"][0])
            assert claims, f"{_name(obj)}: no volumeClaimTemplates for snapshots"
            assert env.get("FEEDRET_SNAPSHOT_DIR") in {mounts.get(c) for c in claims}, (
                f"{_name(obj)}: FEEDRET_SNAPSHOT_DIR is not where the snapshot volume is mounted"
            )
            # faiss's OpenMP builds would otherwise take every core of the node, throttled by the limit.
            limit = spec["containers"][0]["resources"]["limits"]["cpu"]
            assert env.get("OMP_NUM_THREADS") == str(math.ceil(_quantity(limit))), (
                f"{_name(obj)}: OMP_NUM_THREADS {env.get('OMP_NUM_THREADS')} is not its CPU limit {limit}"
            )


def _metrics_port(docs, obj: dict) -> int:
    """The port the workload's feedret container serves /metrics on, from its config."""
    (c,) = [c for o, _t, c, _r in _feedret_containers(docs) if o is obj]
    env, _ = _resolve_env(docs, _pod_template(obj), c)
    configs = _build_configs(env, _role(c)).values()
    (port,) = [cfg.metrics_port for cfg in configs if "metrics_port" in type(cfg).model_fields]
    return port


def test_prometheus_annotations_point_at_the_metrics_port(docs):
    # For a Prometheus that discovers pods by the prometheus.io/* annotations.
    for obj in _workloads(docs):
        tpl = _pod_template(obj)
        notes = tpl["metadata"].get("annotations", {})
        assert notes.get("prometheus.io/scrape") == "true", f"{_name(obj)} is not scraped"
        declared = {p["name"]: p["containerPort"] for c in tpl["spec"]["containers"] for p in c.get("ports", [])}
        port = _metrics_port(docs, obj)
        assert int(notes["prometheus.io/port"]) == declared.get("metrics") == port, (
            f"{_name(obj)}: annotation port {notes['prometheus.io/port']}, `metrics` port {declared.get('metrics')}, "
            f"the code serves metrics on {port}"
        )
        assert notes.get("prometheus.io/path") == METRICS_PATH, _name(obj)


# The PodMonitor fields of monitoring.coreos.com/v1 (prometheus-operator's API reference);
# kubernetes-validate has no schema for custom resources, so unknown keys are caught here.
PODMONITOR_SPEC_FIELDS = {
    "attachMetadata", "bodySizeLimit", "fallbackScrapeProtocol", "jobLabel", "keepDroppedTargets", "labelLimit",
    "labelNameLengthLimit", "labelValueLengthLimit", "namespaceSelector", "nativeHistogramBucketLimit",
    "nativeHistogramMinBucketFactor", "podMetricsEndpoints", "podTargetLabels", "sampleLimit", "scrapeClass",
    "scrapeClassicHistograms", "scrapeProtocols", "selector", "selectorMechanism", "targetLimit",
}
PODMETRICSENDPOINT_FIELDS = {
    "authorization", "basicAuth", "bearerTokenSecret", "enableHttp2", "filterRunning", "followRedirects",
    "honorLabels", "honorTimestamps", "interval", "metricRelabelings", "oauth2", "params", "path", "port",
    "portNumber", "proxyUrl", "relabelings", "scheme", "scrapeTimeout", "targetPort", "tlsConfig",
    "trackTimestampsStaleness",
}
DURATION = re.compile(r"(0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)")


def _duration_s(text: str) -> float:
    units = {"y": 31536000, "w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|[ywdhms])", text))


def test_podmonitors(docs, overlay):
    monitors = [d for d in docs if d["apiVersion"].split("/")[0] == MONITORING_GROUP]
    if overlay == "prod":
        assert _of_kind(monitors, "PodMonitor"), "prod has no PodMonitor: the Prometheus Operator would scrape nothing"
    assert {d["kind"] for d in monitors} <= {"PodMonitor", "PrometheusRule"}, "only these are checked here"
    monitors = _of_kind(monitors, "PodMonitor")
    workloads = [o for o in _workloads(docs) if _role(_pod_template(o)["spec"]["containers"][0])]
    namespaces = {o["metadata"].get("namespace") for o in workloads}
    covered: set[str] = set()
    for pm in monitors:
        assert pm["apiVersion"] == f"{MONITORING_GROUP}/v1", _name(pm)
        spec = pm["spec"]
        assert set(spec) <= PODMONITOR_SPEC_FIELDS, f"{_name(pm)}: unknown fields {set(spec) - PODMONITOR_SPEC_FIELDS}"
        # Without a namespaceSelector a PodMonitor sees only its own namespace.
        if "namespaceSelector" not in spec:
            assert namespaces == {pm["metadata"].get("namespace")}, (
                f"{_name(pm)} is in namespace {pm['metadata'].get('namespace')}, the pods in {namespaces}"
            )
        selected = [o for o in workloads if _labels_match(spec["selector"], _pod_template(o)["metadata"]["labels"])]
        assert selected, f"{_name(pm)} selects no pods"
        assert spec["podMetricsEndpoints"], _name(pm)
        for ep in spec["podMetricsEndpoints"]:
            assert set(ep) <= PODMETRICSENDPOINT_FIELDS, f"{_name(pm)}: unknown endpoint fields {set(ep) - PODMETRICSENDPOINT_FIELDS}"
            assert ep.get("path", "/metrics") == METRICS_PATH, _name(pm)
            assert isinstance(ep.get("port"), str), f"{_name(pm)}: name the port, the pods' port numbers differ by role"
            for field in ("interval", "scrapeTimeout"):
                assert DURATION.fullmatch(ep.get(field, "0")), f"{_name(pm)}: {field} {ep.get(field)!r} is not a duration"
            if "interval" in ep and "scrapeTimeout" in ep:
                assert _duration_s(ep["scrapeTimeout"]) <= _duration_s(ep["interval"]), f"{_name(pm)}: timeout above interval"
            for obj in selected:
                containers = _pod_template(obj)["spec"]["containers"]
                named = {p["name"]: p["containerPort"] for c in containers for p in c.get("ports", [])}
                assert ep["port"] in named, f"{_name(pm)} scrapes port {ep['port']!r}, which {_name(obj)} does not name"
                assert named[ep["port"]] == _metrics_port(docs, obj), (
                    f"{_name(pm)}: {_name(obj)}'s {ep['port']!r} port is not where the code serves metrics"
                )
        labels = [_pod_template(o)["metadata"]["labels"] for o in selected]
        for name in spec.get("podTargetLabels", []):
            assert any(name in l for l in labels), f"{_name(pm)}: no selected pod carries label {name}"
        if "jobLabel" in spec:
            assert all(spec["jobLabel"] in l for l in labels), f"{_name(pm)}: jobLabel {spec['jobLabel']} missing on some pods"
        covered.update(_name(o) for o in selected)
    if monitors:
        missing = {_name(o) for o in workloads} - covered
        assert not missing, f"no PodMonitor scrapes {sorted(missing)}"


def test_onnx_export_goes_to_a_writable_volume(docs):
    # FEEDRET_BACKEND=onnx exports the model on first use; the root filesystem, and so the
    # baked-in model directory, is read-only in the pods.
    for obj, tpl, c, role in _feedret_containers(docs):
        if EncoderConfig not in ROLE_CONFIGS[role]:
            continue
        env, _ = _resolve_env(docs, tpl, c)
        cfg = _build_configs(env, role)[EncoderConfig]
        target = cfg.onnx_path or Path(env.get("FEEDRET_MODEL_DIR", "/opt/feedret/model")) / ONNX_DIR / "model.onnx"
        volumes = {v["name"]: v for v in tpl["spec"].get("volumes", [])}
        claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        writable = [
            m["mountPath"]
            for m in c.get("volumeMounts", [])
            if not m.get("readOnly")
            and (m["name"] in claims or any(k in volumes.get(m["name"], {}) for k in ("emptyDir", "persistentVolumeClaim")))
        ]
        if c.get("securityContext", {}).get("readOnlyRootFilesystem"):
            assert any(Path(target).is_relative_to(mount) for mount in writable), (
                f"{_name(obj)} ({role}): the ONNX export would be written to {target}, on no writable volume "
                f"(writable: {writable}); set FEEDRET_ONNX_PATH"
            )


def _resources(c: dict, kind: str) -> dict:
    return c.get("resources", {}).get(kind, {})


def test_dev_is_cpu_and_one_replica_of_each():
    if "dev" not in OVERLAYS:
        pytest.skip("no dev overlay")
    docs = _render("dev")
    assert not _of_kind(docs, "HorizontalPodAutoscaler")
    for obj in _workloads(docs):
        assert _replicas(obj) == 1, f"{_name(obj)} has {_replicas(obj)} replicas in dev"
    for obj, tpl, c in _containers(docs):
        assert "nvidia.com/gpu" not in {**_resources(c, "requests"), **_resources(c, "limits")}, _name(obj)
        assert c["image"].split(":")[0].endswith("feedret-cpu"), f"{_name(obj)} runs {c['image']} in dev"
        env, _ = _resolve_env(docs, tpl, c)
        assert env.get("FEEDRET_DEVICE", "cpu") == "cpu", _name(obj)


def test_prod_puts_consumer_and_shards_on_gpus():
    if "prod" not in OVERLAYS:
        pytest.skip("no prod overlay")
    docs = _render("prod")
    gpu_roles = {"consumer", "shard"}
    for obj, tpl, c, role in _feedret_containers(docs):
        spec = tpl["spec"]
        if role in gpu_roles:
            assert int(_resources(c, "limits").get("nvidia.com/gpu", 0)) >= 1, f"{_name(obj)} has no GPU"
            assert spec.get("nodeSelector"), f"{_name(obj)}: no nodeSelector for GPU nodes"
            assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), f"{_name(obj)}: no GPU toleration"
            assert c["image"].split(":")[0].endswith("feedret-gpu"), f"{_name(obj)} runs {c['image']}"
        else:
            assert "nvidia.com/gpu" not in _resources(c, "limits"), f"{_name(obj)} takes a GPU it does not use"
        if role == "consumer":
            env, _ = _resolve_env(docs, tpl, c)
            assert _build_configs(env, role)[EncoderConfig].device == "cuda"


# ---------------------------------------------------------------- images


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pat.startswith("**/"):
            hit = any(fnmatch(p, pat[3:]) for p in parts) or fnmatch(path, pat)
        else:
            hit = any(fnmatch(p, pat) for p in prefixes)
        if hit:
            excluded = not negate
    return excluded


DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if not p.name.endswith(".dockerignore"))


def test_both_image_flavours_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu"}


def _image_user(dockerfile: Path) -> str:
    runtime = _dockerfile_instructions(dockerfile)
    return [rest for word, rest in runtime if word == "USER"][-1].split(":")[0]


def test_pods_run_as_the_image_user(docs):
    uids = {_image_user(p) for p in DOCKERFILES}
    assert len(uids) == 1, f"the images run as different users: {uids}"
    (uid,) = uids
    for obj in _workloads(docs):
        assert str(_pod_template(obj)["spec"]["securityContext"].get("runAsUser")) == uid, _name(obj)


def test_manifest_images_are_built_here(docs):
    flavours = {p.name.split(".", 1)[1] for p in DOCKERFILES}
    for obj, _tpl, c in _containers(docs):
        name = c["image"].rsplit("/", 1)[-1].split(":")[0]
        assert name.startswith("feedret-") and name.removeprefix("feedret-") in flavours, (
            f"{_name(obj)} runs {c['image']}, which no docker/Dockerfile.<flavour> builds"
        )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_what_exists_and_runs_the_console_script(dockerfile: Path):
    instructions = _dockerfile_instructions(dockerfile)
    ignore_file = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore_file.is_file(), f"{ignore_file.name} keeps .venv, var/ and .git out of the build context"
    patterns = [
        line.strip() for line in ignore_file.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()

    args: dict[str, str] = {}
    copied: set[str] = set()
    stages = 0
    for word, rest in instructions:
        if word == "ARG":
            name, _, default = rest.partition("=")
            if default:
                args[name] = default
        elif word == "FROM":
            stages += 1
        elif word == "COPY":
            tokens = shlex.split(rest)
            if any(t.startswith("--from") for t in tokens):
                continue
            tokens = [t for t in tokens if not t.startswith("--")]
            for src in tokens[:-1]:
                src = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], src)
                assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src}: not in the repository"
                assert not _dockerignore_excludes(patterns, src), f"{dockerfile.name}: COPY {src} is excluded by {ignore_file.name}"
                under = [f for f in tracked if f == src or f.startswith(src.rstrip("/") + "/")]
                assert under, f"{dockerfile.name}: COPY {src} copies nothing git tracks"
                dropped = [f for f in under if _dockerignore_excludes(patterns, f) and "__pycache__" not in f]
                assert not dropped, f"{dockerfile.name}: {ignore_file.name} drops {dropped[:5]} from COPY {src}"
                copied.add(src.rstrip("/"))
    assert stages >= 2, f"{dockerfile.name} is not multi-stage"

    # Every package directory setuptools maps is copied, or the wheel would lack it.
    package_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    missing = sorted(d for d in package_dirs if not any(d == c or d.startswith(c + "/") for c in copied))
    assert not missing, f"{dockerfile.name} does not copy {missing}"
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied

    runtime = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM") :]
    entry = [json.loads(rest) for word, rest in runtime if word == "ENTRYPOINT"]
    assert entry and entry[-1] == ["feedret", "serve"], f"{dockerfile.name}: ENTRYPOINT {entry}"
    assert PYPROJECT["project"]["scripts"]["feedret"] == "feedret.clients.cli:main"
    cmd = [json.loads(rest) for word, rest in runtime if word == "CMD"]
    assert cmd and len(cmd[-1]) == 1 and cmd[-1][0] in ROLES, f"{dockerfile.name}: CMD {cmd}"
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"{dockerfile.name} runs as root"
    assert users[-1].split(":")[0].isdigit(), "a numeric USER lets runAsNonRoot verify it"

    # ENV FEEDRET_* in the image are real settings too.
    for word, rest in runtime:
        if word == "ENV":
            for name in re.findall(r"(?:^|\s)((?:FEEDRET|KAFKA)_[A-Z0-9_]+)=", rest):
                assert name in _config_env_names(), f"{dockerfile.name}: ENV {name} is read by no config class"
    assert any(
        word == "ENV" and re.search(r"(?:^|\s)FEEDRET_MODEL_DIR=", rest) for word, rest in runtime
    ), "the image serves the model it bakes in (MODEL_SRC): it must set FEEDRET_MODEL_DIR"
    # The runtime takes the model from a stage that made it readable to all: a 0600
    # file in the context (safetensors writes them) is unreadable to the USER above.
    model_copies = [rest for word, rest in runtime if word == "COPY" and "/opt/feedret/model" in rest]
    assert model_copies and all(r.startswith("--from=model ") for r in model_copies), model_copies
    model_stage = instructions[next(i for i, (w, r) in enumerate(instructions) if w == "FROM" and r.endswith(" AS model")):]
    assert any(w == "RUN" and "chmod -R a+rX /opt/feedret/model" in r for w, r in model_stage), (
        f"{dockerfile.name}: the model stage must make the model readable to the image's user")
    # The baked-in model is the one feedret serves by default.
    default_model = feedret_config.DEFAULT_MODEL_DIR.relative_to(feedret_config.REPO_ROOT).as_posix()
    assert args.get("MODEL_SRC") == default_model, f"{dockerfile.name} bakes in {args.get('MODEL_SRC')}, feedret serves {default_model}"

    # torch is installed, pinned and alone, before anything else.
    runs = [rest for word, rest in instructions if word == "RUN"]
    torch_runs = [i for i, r in enumerate(runs) if re.search(r"torch==", r)]
    assert torch_runs, f"{dockerfile.name} does not pin torch"
    first_pip = min(i for i, r in enumerate(runs) if re.search(r"\bpip install\b", r))
    assert torch_runs[0] == first_pip, f"{dockerfile.name}: torch must be the first pip install"
    makefile_pin = re.search(r"torch==([0-9][\w.]*)", (REPO / "Makefile").read_text())
    assert makefile_pin and args.get("TORCH_VERSION") == makefile_pin.group(1), (
        f"{dockerfile.name} pins torch {args.get('TORCH_VERSION')}, the Makefile {makefile_pin and makefile_pin.group(1)}"
    )
    if dockerfile.name.endswith(".gpu"):
        # The CUDA libraries come as pip wheels (torch's CUDA 13 build from PyPI), so the base
        # needs no CUDA; the NVIDIA runtime mounts the node's driver because of this variable.
        assert not args.get("TORCH_INDEX_URL", "").rstrip("/").endswith("/cpu"), "the GPU image needs a CUDA build of torch"
        assert any(re.search(r"torch\.version\.cuda", r) for r in runs), "the GPU image checks which CUDA its torch is built for"
        assert any(word == "ENV" and "NVIDIA_VISIBLE_DEVICES=" in rest for word, rest in runtime), (
            "without NVIDIA_VISIBLE_DEVICES the NVIDIA container runtime mounts no driver into a non-CUDA base")
        # onnxruntime-gpu before 1.27 is a CUDA 12 build: its CUDA provider would not load
        # beside torch's CUDA 13 libraries, and every encoder on it would fail to start.
        (ort,) = [r for r in PYPROJECT["project"]["optional-dependencies"]["gpu"] if re.match(r"onnxruntime-gpu\b", r)]
        floor = re.search(r">=\s*(\d+)\.(\d+)", ort)
        assert floor and (int(floor.group(1)), int(floor.group(2))) >= (1, 27), f"gpu extra allows a CUDA 12 onnxruntime-gpu: {ort}"
        assert any("optional-dependencies']['gpu']" in r for r in runs), "the GPU image installs the gpu extra"
        assert not any("optional-dependencies']['cpu']" in r for r in runs), "the GPU image installs the cpu extra too"
    else:
        assert args.get("TORCH_INDEX_URL", "").rstrip("/").endswith("/cpu"), "the CPU image needs torch's CPU build"
        # faiss and onnxruntime are not base dependencies (tests/test_packaging.py): the extra brings them.
        assert any("optional-dependencies']['cpu']" in r for r in runs), "the CPU image installs the cpu extra"
        assert not any("optional-dependencies']['gpu']" in r for r in runs), "the CPU image installs the gpu extra"


# ---------------------------------------------------------------- Kafka with TLS and SCRAM (a component)


def _render_with_component(tmp_path: Path, overlay: str, *components: str) -> tuple[dict, ...]:
    """`overlay` with `components` added, as a user's own overlay would add them."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    k8s = os.path.relpath(K8S, tmp_path)  # kustomize refuses absolute paths
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {k8s}/overlays/{overlay}\ncomponents:\n"
        + "".join(f"  - {k8s}/components/{c}\n" for c in components)
    )
    proc = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def test_kafka_tls_scram_component_gives_every_kafka_client_the_ca_and_its_password(tmp_path):
    (tmp_path / "overlay").mkdir()
    docs = _render_with_component(tmp_path / "overlay", "prod", "kafka-tls-scram")
    assert not _schema_failures(docs, OLDEST_KUBERNETES)
    (user,) = _of_kind(docs, "KafkaUser")
    cluster = user["metadata"]["labels"]["strimzi.io/cluster"]
    assert user["spec"]["authentication"]["type"] == "scram-sha-512"
    namespaces = {d["metadata"].get("namespace") for d in _workloads(docs)}
    assert namespaces == {user["metadata"]["namespace"]}, "the user's Secret must be in the pods' namespace"
    acl_topics = {a["resource"]["name"] for a in user["spec"]["authorization"]["acls"] if a["resource"]["type"] == "topic"}
    acl_groups = {a["resource"]["name"] for a in user["spec"]["authorization"]["acls"] if a["resource"]["type"] == "group"}

    ca_file = tmp_path / "ca.crt"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\n")
    roles = set()
    for obj, tpl, c, role in _feedret_containers(docs):
        env, from_secrets = _resolve_env(docs, tpl, c)
        if KafkaConfig not in ROLE_CONFIGS[role]:
            assert role in ("member", "root")
            _build_configs(env, role)  # starts although the Kafka settings in its ConfigMap are SASL_SSL
            continue
        roles.add(role)
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == f"{cluster}-kafka-bootstrap:9093", _name(obj)
        # The password comes from the Secret the User Operator makes for this KafkaUser.
        (password,) = [v for v in c["env"] if v["name"] == "FEEDRET_KAFKA_SASL_PASSWORD"]
        assert password["valueFrom"]["secretKeyRef"] == {"name": user["metadata"]["name"], "key": "password"}
        assert "FEEDRET_KAFKA_SASL_PASSWORD" in from_secrets
        # The CA file lies on a mount of Strimzi's cluster CA Secret.
        ca_path = Path(env["FEEDRET_KAFKA_SSL_CAFILE"])
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in tpl["spec"]["volumes"]}
        volume = volumes[mounts[str(ca_path.parent)]]
        assert volume["secret"]["secretName"] == f"{cluster}-cluster-ca-cert", _name(obj)
        assert {"key": "ca.crt", "path": ca_path.name} in volume["secret"]["items"]
        # What the role builds from that environment (the Secret's values stood in for).
        configs = _build_configs({**env, "FEEDRET_KAFKA_SASL_PASSWORD": "from-the-secret",
                                  "FEEDRET_KAFKA_SSL_CAFILE": str(ca_file)}, role)
        kafka: KafkaConfig = configs[KafkaConfig]
        opts = kafka.client_options()
        assert opts["security_protocol"] == "SASL_SSL" and opts["sasl_mechanism"] == "SCRAM-SHA-512"
        assert opts["sasl_plain_username"] == user["metadata"]["name"]
        assert {kafka.posts_topic, kafka.vectors_topic, kafka.dlq_topic} <= acl_topics
        assert kafka.consumer_group in acl_groups
    assert roles == {"consumer", "shard"}


def test_snapshots_s3_component_puts_every_shards_snapshots_in_one_bucket(tmp_path):
    (tmp_path / "overlay").mkdir()
    docs = _render_with_component(tmp_path / "overlay", "prod", "snapshots-s3")
    assert not _schema_failures(docs, OLDEST_KUBERNETES)
    urls = set()
    for obj, tpl, c, role in _feedret_containers(docs):
        env, _ = _resolve_env(docs, tpl, c)
        if role != "shard":
            assert "FEEDRET_SNAPSHOT_DIR" not in env, _name(obj)
            continue
        cfg = _build_configs(env, "shard")[ShardConfig]
        urls.add(cfg.snapshot_dir)
        assert cfg.snapshot_dir.startswith("s3://"), _name(obj)
        # Staging lies on the pod's snapshot volume, not the 1 GiB /tmp (room for one snapshot).
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        claims = {t["metadata"]["name"] for t in obj["spec"]["volumeClaimTemplates"]}
        assert mounts.get(cfg.snapshot_staging_dir) in claims, _name(obj)
        # It still reads the shared settings, and the bucket's credentials only if they exist.
        sources = [next(iter(src.values()))["name"] for src in c["envFrom"]]
        assert any(n.startswith("feedret-config") for n in sources) and "feedret-snapshots-s3" in sources
        assert all(src.get("secretRef", {}).get("optional", True) for src in c["envFrom"])
    assert len(urls) == 1, f"shards disagree on the bucket: {urls}"


def test_grpc_tls_component_serves_tls_with_probes_on_the_plaintext_health_port(tmp_path):
    (tmp_path / "overlay").mkdir()
    docs = _render_with_component(tmp_path / "overlay", "prod", "grpc-tls")
    assert not _schema_failures(docs, OLDEST_KUBERNETES)
    (cert,) = [d for d in docs if d["kind"] == "Certificate"]
    assert cert["apiVersion"] == f"{CERT_MANAGER_GROUP}/v1"
    assert {"server auth", "client auth"} <= set(cert["spec"]["usages"])  # one certificate, both ends of mutual TLS
    files = {name: tmp_path / name for name in ("tls.crt", "tls.key", "ca.crt")}
    for f in files.values():
        f.write_text("PEM\n")
    served = set()
    for obj, tpl, c, role in _feedret_containers(docs):
        if role == "consumer":
            continue  # serves no gRPC
        served.add(role)
        env, _ = _resolve_env(docs, tpl, c)
        # The files lie on the mount of the Secret cert-manager writes, which is now required.
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in tpl["spec"]["volumes"]}
        for var in ("FEEDRET_TLS_CERT_FILE", "FEEDRET_TLS_KEY_FILE", "FEEDRET_TLS_CA_FILE"):
            path = Path(env[var])
            secret = volumes[mounts[str(path.parent)]]["secret"]
            assert secret["secretName"] == cert["spec"]["secretName"] and secret.get("optional") is False, _name(obj)
            assert path.name in files, f"{var}: cert-manager writes no {path.name}"
        with mock.patch.dict(os.environ, {**env, **{v: str(files[Path(env[v]).name]) for v in
                                                    ("FEEDRET_TLS_CERT_FILE", "FEEDRET_TLS_KEY_FILE", "FEEDRET_TLS_CA_FILE")}},
                             clear=True):
            tls = GrpcSecurityConfig()
        assert tls.enabled and tls.tls_client_auth and tls.health_port
        assert tls.tls_server_name in cert["spec"]["dnsNames"]
        # The kubelet cannot probe TLS: every probe is on the plaintext health port, which the container declares.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == tls.health_port, f"{_name(obj)} {probe}"
        assert tls.health_port in {p["containerPort"] for p in c["ports"]}
    assert served == {"root", "member", "shard"}


def test_grpc_tokens_component_gives_every_server_the_accepted_tokens_and_the_root_its_own(tmp_path):
    (tmp_path / "overlay").mkdir()
    docs = _render_with_component(tmp_path / "overlay", "prod", "grpc-tls", "grpc-tokens")
    assert not _schema_failures(docs, OLDEST_KUBERNETES)
    files = tmp_path / "files"
    files.mkdir()
    servers = {}
    for obj, tpl, c, role in _feedret_containers(docs):
        if role == "consumer":
            assert not any(m["mountPath"].startswith("/etc/feedret/auth") for m in c.get("volumeMounts", []))
            continue
        env, _ = _resolve_env(docs, tpl, c)
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in tpl["spec"]["volumes"]}
        stand_ins = {}
        for var in ("FEEDRET_AUTH_TOKENS_FILE", "FEEDRET_AUTH_TOKEN_FILE", "FEEDRET_TLS_CERT_FILE",
                    "FEEDRET_TLS_KEY_FILE", "FEEDRET_TLS_CA_FILE"):
            if var not in env:
                continue
            path = Path(env[var])
            secret = volumes[mounts[str(path.parent)]]["secret"]
            if var.startswith("FEEDRET_AUTH_"):
                assert secret["secretName"] == "feedret-auth" and not secret.get("optional"), f"{_name(obj)} {var}"
            stand_ins[var] = files / f"{role}-{path.name}"
            stand_ins[var].write_text("token\n")
        with mock.patch.dict(os.environ, {**env, **{k: str(v) for k, v in stand_ins.items()}}, clear=True):
            servers[role] = GrpcSecurityConfig()
    assert set(servers) == {"root", "member", "shard"}
    assert all(cfg.auth_tokens_file is not None for cfg in servers.values())  # every server checks tokens
    assert servers["root"].auth_token_file is not None  # and the root, calling the others, sends one
    assert servers["member"].auth_token_file is None and servers["shard"].auth_token_file is None


# PrometheusRule fields of monitoring.coreos.com/v1 (prometheus-operator's API reference).
RULE_GROUP_FIELDS = {"name", "interval", "rules", "limit", "partial_response_strategy", "query_offset", "labels"}
RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
# Labels Prometheus adds to every scraped series; the PodMonitor's podTargetLabels add more.
SCRAPE_LABELS = {"instance", "job", "pod", "namespace", "container", "endpoint", "service"}


def _exported_metrics() -> dict[str, set[str]]:
    """Every series name the code exports (with a counter's _total, a histogram's _bucket/_count/_sum),
    mapped to the label names it carries."""
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    from feedret import metrics
    from feedret.consumer import metrics as consumer_metrics
    from feedret.indexer import metrics as shard_metrics
    from feedret.server import grpc_metrics, member_metrics, root_metrics

    modules = (metrics, grpc_metrics, root_metrics, shard_metrics, member_metrics, consumer_metrics)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",), "info": ("_info",)}
    out: dict[str, set[str]] = {}
    for obj in (obj for module in modules for obj in vars(module).values()):
        if isinstance(obj, MetricWrapperBase):
            for suffix in suffixes.get(obj._type, ("",)):
                out[obj._name + suffix] = set(obj._labelnames) | ({"le"} if suffix == "_bucket" else set())
    for family in REGISTRY.collect():  # collectors, read at scrape time (the shards' state)
        for suffix in suffixes.get(family.type, ("",)):
            out.setdefault(family.name + suffix, set(getattr(family, "_labelnames", ())))
    return out


def test_prometheus_rules_name_real_metrics_and_labels(docs, overlay):
    rules = _of_kind(docs, "PrometheusRule")
    if overlay == "prod":
        assert rules, "prod has no PrometheusRule: nobody would be told when retrieval degrades"
    exported = _exported_metrics()
    target_labels = {
        re.sub(r"[^a-zA-Z0-9_]", "_", name)
        for pm in _of_kind(docs, "PodMonitor") for name in pm["spec"].get("podTargetLabels", [])
    }
    shard_env = {e["name"]: e.get("value") for _, _, c in _containers(docs) if _role(c) == "shard" for e in c.get("env", [])}
    snapshot_interval = float(shard_env.get("FEEDRET_SNAPSHOT_INTERVAL_S") or feedret_config.ShardConfig().snapshot_interval_s)
    alerts = []
    for pr in rules:
        assert pr["apiVersion"] == f"{MONITORING_GROUP}/v1" and set(pr["spec"]) == {"groups"}, _name(pr)
        for group in pr["spec"]["groups"]:
            assert set(group) <= RULE_GROUP_FIELDS, f"{_name(pr)}: unknown group fields {set(group) - RULE_GROUP_FIELDS}"
            for rule in group["rules"]:
                assert set(rule) <= RULE_FIELDS, f"{_name(pr)}: unknown rule fields {set(rule) - RULE_FIELDS}"
                alert, expr = rule["alert"], rule["expr"]
                alerts.append(alert)
                assert rule["labels"]["severity"] in {"critical", "warning", "info"}, alert
                assert rule["annotations"]["summary"], alert
                assert DURATION.fullmatch(rule.get("for", "0")), f"{alert}: for {rule.get('for')!r}"
                names = set(re.findall(r"\b((?:feedret|grpc_server)_[a-z0-9_]+)\b", expr)) - target_labels
                assert names, f"{alert} names no feedret metric"
                for name in names:
                    assert name in exported, f"{alert}: {name} is not a metric the code exports"
                carried = set().union(*(exported[n] for n in names)) | SCRAPE_LABELS | target_labels
                for clause in re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", expr):
                    for label in filter(None, (x.strip() for x in clause.split(","))):
                        assert label in carried, f"{alert}: groups by {label!r}, which {sorted(names)} do not carry"
                for label in re.findall(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)", " ".join(rule["annotations"].values())):
                    assert label in carried, f"{alert}: its annotations use {label!r}, which {sorted(names)} do not carry"
                if "snapshot_last_success" in expr:
                    (factor, seconds) = re.findall(r"(\d+)\s*\*\s*(\d+)", expr)[0]
                    assert float(seconds) == snapshot_interval, f"{alert} assumes a {seconds} s snapshot interval, the shards use {snapshot_interval}"
    assert len(alerts) == len(set(alerts)), "alert names must be unique"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian's prometheus package) to parse PromQL")
def test_prometheus_rules_parse():
    rules = _of_kind(_render("prod"), "PrometheusRule")
    for pr in rules:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            yaml.safe_dump({"groups": pr["spec"]["groups"]}, f)
            f.flush()
            proc = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def _policy_admits(policy: dict, pod_labels: dict, port_name: str, source: dict | None) -> bool:
    """Does this NetworkPolicy admit traffic to a pod with `pod_labels` on its port `port_name`
    from `source` (a feedret pod's labels, in the same namespace; None: from another namespace or
    the node)? Only the shapes the manifests use: named ports, podSelector, namespaceSelector {}."""
    spec = policy["spec"]
    if not _labels_match(spec["podSelector"], pod_labels):
        return False
    for rule in spec.get("ingress", []):
        if "ports" in rule and port_name not in {p["port"] for p in rule["ports"]}:
            continue
        peers = rule.get("from")
        if peers is None:  # from anywhere
            return True
        for peer in peers:
            assert set(peer) <= {"podSelector", "namespaceSelector"}, f"{_name(policy)}: teach the test about {peer}"
            if "namespaceSelector" in peer:
                assert peer["namespaceSelector"] == {} and "podSelector" not in peer, _name(policy)
                return True  # {} is every namespace, this one included
            elif source is not None and _labels_match(peer["podSelector"], source):
                return True
    return False


@pytest.mark.parametrize("with_tls", [False, True])
def test_network_policies_admit_the_data_flow_and_nothing_else(tmp_path, with_tls):
    docs = _render_with_component(tmp_path, "prod", *(["grpc-tls"] if with_tls else []), "network-policies")
    assert not _schema_failures(docs, "latest")
    policies = _of_kind(docs, "NetworkPolicy")
    namespaces = {o["metadata"]["namespace"] for o in _workloads(docs)}
    assert {p["metadata"]["namespace"] for p in policies} == namespaces
    pods = {}
    for obj, tpl, c in _containers(docs):
        role = _role(c)
        if role:
            ports = {p["name"] for p in c.get("ports", [])}
            pods.setdefault(role, (tpl["metadata"]["labels"], set()))[1].update(ports)
    assert set(pods) == set(ROLES)
    # Every feedret pod is under a default deny: no ingress rules, Ingress in policyTypes.
    for role, (labels, _) in pods.items():
        assert any(_labels_match(p["spec"]["podSelector"], labels) and "Ingress" in p["spec"]["policyTypes"]
                   and not p["spec"].get("ingress") for p in policies), f"no default deny over the {role} pods"
    # Every port a pod serves is admitted from someone (else the port is dead, or a probe fails).
    for role, (labels, ports) in pods.items():
        for port in ports:
            sources = [None, *(l for l, _ in pods.values())]
            assert any(_policy_admits(p, labels, port, s) for p in policies for s in sources), f"{role}:{port} admits nobody"
    root = pods["root"][0]
    # The data flow: anyone -> root; root -> member and shards; nobody else -> member and shards.
    assert any(_policy_admits(p, root, "grpc", None) for p in policies), "callers cannot reach the root"
    for role in ("member", "shard"):
        labels = pods[role][0]
        assert any(_policy_admits(p, labels, "grpc", root) for p in policies), f"the root cannot reach the {role}s"
        for other in ("consumer", "member", "shard"):
            if other != role:
                assert not any(_policy_admits(p, labels, "grpc", pods[other][0]) for p in policies), (
                    f"the {other} pods can reach the {role}s' gRPC port")
        assert not any(_policy_admits(p, labels, "grpc", None) for p in policies), (
            f"the {role}s' gRPC port is open beyond the root")
    # Metrics: reachable for Prometheus, wherever it runs.
    for role, (labels, ports) in pods.items():
        assert "metrics" in ports and any(_policy_admits(p, labels, "metrics", None) for p in policies), role
    # Policies name only ports some selected pod has (a misspelt name would silently match nothing);
    # `health` exists only with the grpc-tls component.
    for p in policies:
        selected = [ports for labels, ports in pods.values() if _labels_match(p["spec"]["podSelector"], labels)]
        assert selected, f"{_name(p)} selects no feedret pod"
        named = {port["port"] for rule in p["spec"].get("ingress", []) for port in rule.get("ports", [])}
        known = set().union(*selected) | {"health"}
        assert named <= known, f"{_name(p)} names ports {named - known} that its pods do not have"
        if with_tls and "health" in named:
            assert any("health" in s for s in selected), _name(p)
