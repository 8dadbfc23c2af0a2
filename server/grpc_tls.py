"""gRPC credentials and channels from a GrpcTlsConfig: one place decides plaintext or TLS."""

from __future__ import annotations

from typing import Sequence

import grpc

from feedret.config import GrpcTlsConfig


def server_credentials(tls: GrpcTlsConfig) -> grpc.ServerCredentials:
    """This server's certificate; with a CA and tls_client_auth, callers must present one it signed."""
    ca = tls.tls_ca_file.read_bytes() if tls.tls_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(tls.tls_key_file.read_bytes(), tls.tls_cert_file.read_bytes())],
        root_certificates=ca,
        require_client_auth=bool(ca) and tls.tls_client_auth,
    )


def channel_credentials(tls: GrpcTlsConfig) -> grpc.ChannelCredentials:
    """Trust the CA (the system's roots when none); present this process's certificate (mutual TLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=tls.tls_ca_file.read_bytes() if tls.tls_ca_file is not None else None,
        private_key=tls.tls_key_file.read_bytes() if tls.tls_key_file is not None else None,
        certificate_chain=tls.tls_cert_file.read_bytes() if tls.tls_cert_file is not None else None,
    )


def open_channel(target: str, tls: GrpcTlsConfig | None, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A channel to another feedret server: TLS when this process serves TLS, else plaintext."""
    if tls is None or not tls.enabled:
        return grpc.insecure_channel(target, options=list(options))
    opts = list(options)
    if tls.tls_server_name:
        opts.append(("grpc.ssl_target_name_override", tls.tls_server_name))
    return grpc.secure_channel(target, channel_credentials(tls), options=opts)
