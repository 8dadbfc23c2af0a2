"""FEEDRET_SHARD_ADDRESSES: shards by `,`, replicas by `|`, dns: pools; a malformed list fails at start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from feedret.config import RootConfig
from feedret.shard_targets import host_port, is_pool, parse_shard_targets


def test_one_address_per_shard_still_means_one_replica_each():
    config = RootConfig(shard_addresses="127.0.0.1:50061,127.0.0.1:50062")
    assert config.shard_replicas() == [["127.0.0.1:50061"], ["127.0.0.1:50062"]]
    assert config.shard_list() == ["127.0.0.1:50061", "127.0.0.1:50062"]
    assert RootConfig().shard_replicas() == [["127.0.0.1:50061"], ["127.0.0.1:50062"]]


def test_replicas_of_a_shard_are_separated_by_bars_and_spaces_do_not_matter():
    config = RootConfig(shard_addresses=" a:1 | a:2 ,b:1|b:2|[::1]:3 ")
    assert config.shard_replicas() == [["a:1", "a:2"], ["b:1", "b:2", "[::1]:3"]]
    assert config.shard_list() == ["a:1|a:2", "b:1|b:2|[::1]:3"]


def test_a_dns_target_is_a_pool_of_the_addresses_it_resolves_to():
    targets = parse_shard_targets("dns:///feedret-shard-0:50061,dns://10.0.0.10:53/feedret-shard-1.feedret.svc:50061")
    assert [is_pool(t) for (t,) in targets] == [True, True]
    assert host_port(targets[0][0]) == ("feedret-shard-0", 50061)
    assert host_port(targets[1][0]) == ("feedret-shard-1.feedret.svc", 50061)
    assert not is_pool("feedret-shard-0:50061") and host_port("feedret-shard-0:50061") == ("feedret-shard-0", 50061)


@pytest.mark.parametrize(
    "value, message",
    [
        ("", "names no shard"),
        ("a:1,,b:1", "shard 1 is empty"),
        ("a:1,", "shard 1 is empty"),
        ("a:1||a:2", "shard 0 has an empty replica"),
        ("a:1,b", "shard 1: 'b' has no port"),
        ("a:1,b:http", "port 'http' is not a number"),
        ("a:0", "port '0' is not a number from 1 to 65535"),
        ("a:1|a:1", "'a:1' is listed twice"),
        ("a:1,b:1|a:1", "'a:1' is listed for shards 0 and 1"),
        ("unix:/run/shard.sock", "scheme 'unix' is not supported"),
        ("http://a:1", "scheme 'http' is not supported"),
        ("dns://a:1", "a dns target is dns:///host:port"),
        ("a b:1", "'a b' is not a host name"),
    ],
)
def test_a_malformed_address_list_fails_at_start_naming_the_bad_entry(value, message):
    with pytest.raises(ValidationError) as err:
        RootConfig(shard_addresses=value)
    assert "shard_addresses" in str(err.value) and message in str(err.value)


def test_the_environment_variable_is_validated_too(monkeypatch):
    monkeypatch.setenv("FEEDRET_SHARD_ADDRESSES", "a:1|a:2,b:1")
    monkeypatch.setenv("FEEDRET_HEDGE_AFTER_MS", "20")
    config = RootConfig()
    assert config.shard_replicas() == [["a:1", "a:2"], ["b:1"]] and config.hedge_after_ms == 20
    monkeypatch.setenv("FEEDRET_SHARD_ADDRESSES", "a:1|,b:1")
    with pytest.raises(ValidationError, match="empty replica"):
        RootConfig()
    monkeypatch.setenv("FEEDRET_SHARD_ADDRESSES", "a:1")
    monkeypatch.setenv("FEEDRET_HEDGE_AFTER_MS", "-1")
    with pytest.raises(ValidationError, match="hedge_after_ms"):
        RootConfig()


def test_feedret_up_gives_every_replica_its_own_port_and_the_root_all_of_them():
    from feedret.server.launcher import Stack, StackConfig

    config = StackConfig(num_shards=2, replicas=3, shard_base_port=50061, metrics_base_port=9451)
    root = RootConfig(shard_addresses=config.shard_addresses)
    assert root.shard_replicas() == [
        ["127.0.0.1:50061", "127.0.0.1:50063", "127.0.0.1:50065"],
        ["127.0.0.1:50062", "127.0.0.1:50064", "127.0.0.1:50066"],
    ]
    stack = Stack(config)
    shards = {n: a for n, a in stack.addresses().items() if n.startswith("shard-")}
    assert shards == {"shard-0": "127.0.0.1:50061", "shard-1": "127.0.0.1:50062", "shard-0-1": "127.0.0.1:50063",
                      "shard-1-1": "127.0.0.1:50064", "shard-0-2": "127.0.0.1:50065", "shard-1-2": "127.0.0.1:50066"}
    envs = {name: stack.role_env(name)[1] for name in shards}
    assert {(e["FEEDRET_SHARD_ID"], e["FEEDRET_PORT"]) for e in envs.values()} == {
        (n.split("-")[1], a.rsplit(":", 1)[1]) for n, a in shards.items()}
    assert len({e["FEEDRET_METRICS_PORT"] for e in envs.values()}) == 6  # no two processes share a port
    assert stack.role_env("root")[1]["FEEDRET_SHARD_ADDRESSES"] == config.shard_addresses
    # One replica, the default: the addresses `make run` always used.
    assert StackConfig().shard_addresses == "127.0.0.1:50061,127.0.0.1:50062"


def test_a_stack_without_embedders_has_no_member_or_consumer_and_tells_the_root_so():
    # The search benchmarks' stack: broker, shards and root only; queries carry vectors.
    from feedret.server.launcher import Stack, StackConfig

    stack = Stack(StackConfig(num_shards=2, embedders=False))
    assert set(stack.addresses()) == {"root", "shard-0", "shard-1"}
    assert "consumer" not in stack.metrics_urls() and "member" not in stack.metrics_urls()
    assert stack.role_env("root")[1]["FEEDRET_MEMBER_ADDRESS"] == ""
