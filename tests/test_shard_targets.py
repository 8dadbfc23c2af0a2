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
