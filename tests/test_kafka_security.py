"""Kafka connection security: TLS (and mutual TLS) and SASL settings reach every Kafka client.

The end-to-end test runs the embedded broker behind a TLS-terminating proxy (the
broker advertises the proxy's port, so every connection a client makes goes through
it): topics are created and posts published by feedret's own code over TLS, verified
against a CA of the test's own.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from pydantic import ValidationError

from feedret.config import KafkaConfig
from feedret.clients.publish import publish_lines
from feedret.topics import ensure_topics

from conftest import free_port_block, make_certificates


def test_plaintext_by_default():
    assert KafkaConfig(bootstrap_servers="k:9092").client_options() == {
        "bootstrap_servers": "k:9092",
        "security_protocol": "PLAINTEXT",
    }


def test_sasl_ssl_from_the_environment(tmp_path, monkeypatch):
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    for name, value in {
        "KAFKA_BOOTSTRAP_SERVERS": "kafka-bootstrap:9093",
        "FEEDRET_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "FEEDRET_KAFKA_SSL_CAFILE": str(ca),
        "FEEDRET_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "FEEDRET_KAFKA_SASL_USERNAME": "feedret",
        "FEEDRET_KAFKA_SASL_PASSWORD": "s3cret",
    }.items():
        monkeypatch.setenv(name, value)
    config = KafkaConfig()
    assert config.client_options() == {
        "bootstrap_servers": "kafka-bootstrap:9093",
        "security_protocol": "SASL_SSL",
        "ssl_check_hostname": True,
        "ssl_cafile": str(ca),
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "feedret",
        "sasl_plain_password": "s3cret",
    }
    assert "s3cret" not in repr(config) and "s3cret" not in str(config.model_dump())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"}, "needs FEEDRET_KAFKA_SASL_MECHANISM"),
        ({"sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "p"}, "security_protocol is PLAINTEXT"),
        ({"security_protocol": "SSL", "ssl_cafile": "/no/such/ca.crt"}, "/no/such/ca.crt does not exist"),
        ({"security_protocol": "SSL", "ssl_certfile": "/x.crt"}, "needs both"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u",
          "sasl_password": "p", "ssl_cafile": __file__}, "SSL or SASL_SSL"),
        ({"security_protocol": "TLS"}, "security_protocol"),
    ],
)
def test_inconsistent_security_settings_fail_at_start_saying_what_is_missing(settings, message):
    with pytest.raises(ValidationError, match=message):
        KafkaConfig(**settings)


# ---------------------------------------------------------------- through TLS, for real


class TlsProxy(threading.Thread):
    """Terminates TLS on `port` and forwards the plaintext to the broker; counts handshakes."""

    def __init__(self, port: int, upstream: int, cert: Path, key: Path) -> None:
        super().__init__(daemon=True)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", port))
        self.upstream = upstream
        self.handshakes = 0

    def run(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        self.handshakes += 1
        broker = socket.create_connection(("127.0.0.1", self.upstream))

        def pump(src, dst):
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(broker, client), daemon=True).start()
        pump(client, broker)

    def close(self) -> None:
        self.listener.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_topics_and_posts_go_through_a_tls_listener_verified_against_its_ca(tmp_path):
    from feedret.server.launcher import tansu_binary, wait_for_port

    pki = make_certificates(tmp_path)
    ca, cert, key = pki["ca"], pki["cert"], pki["key"]
    broker_port = free_port_block(2)
    tls_port = broker_port + 1
    proxy = TlsProxy(tls_port, broker_port, cert, key)
    proxy.start()
    # The broker tells clients to reach it at the proxy: no connection bypasses TLS.
    broker = subprocess.Popen(
        [tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{broker_port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{tls_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", broker_port, 30)
        kafka = KafkaConfig(bootstrap_servers=f"127.0.0.1:{tls_port}", security_protocol="SSL", ssl_cafile=ca)
        ensure_topics(kafka, num_shards=1)
        report = publish_lines(kafka, ['{"post_id": 1, "text": "over tls"}', '{"post_id": 2, "text": "also"}'])
        assert report.sent == 2

        consumer = KafkaConsumer(**kafka.client_options(), consumer_timeout_ms=10000)
        try:
            consumer.assign([TopicPartition(kafka.posts_topic, p) for p in range(kafka.posts_partitions)])
            consumer.seek_to_beginning()
            texts = sorted(m.value.decode() for _, m in zip(range(2), consumer))
        finally:
            consumer.close()
        assert texts == ['{"post_id": 1, "text": "over tls"}', '{"post_id": 2, "text": "also"}']
        assert proxy.handshakes >= 2  # the admin, the producer and the consumer all came through TLS
    finally:
        broker.kill()
        broker.wait()
        proxy.close()
