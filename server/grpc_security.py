"""gRPC credentials and channels from a GrpcSecurityConfig: one place decides plaintext or TLS, token or none."""

from __future__ import annotations

from typing import Sequence

import grpc

from feedret.config import GrpcSecurityConfig
from feedret.grpc_client import with_token
from feedret.server.grpc_auth import TokenFile


def server_credentials(security: GrpcSecurityConfig) -> grpc.ServerCredentials:
    """This server's certificate; with a CA and tls_client_auth, callers must present one it signed."""
    ca = security.tls_ca_file.read_bytes() if security.tls_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(security.tls_key_file.read_bytes(), security.tls_cert_file.read_bytes())],
        root_certificates=ca,
        require_client_auth=bool(ca) and security.tls_client_auth,
    )


def channel_credentials(security: GrpcSecurityConfig) -> grpc.ChannelCredentials:
    """Trust the CA (the system's roots when none); present this process's certificate (mutual TLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=security.tls_ca_file.read_bytes() if security.tls_ca_file is not None else None,
        private_key=security.tls_key_file.read_bytes() if security.tls_key_file is not None else None,
        certificate_chain=security.tls_cert_file.read_bytes() if security.tls_cert_file is not None else None,
    )


def open_channel(target: str, security: GrpcSecurityConfig | None, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A channel to another feedret server: TLS when this process serves TLS, else plaintext;
    carrying this process's bearer token when it has one (`auth_token_file`)."""
    if security is None:
        return grpc.insecure_channel(target, options=list(options))
    opts = list(options)
    if not security.enabled:
        channel = grpc.insecure_channel(target, options=opts)
    else:
        if security.tls_server_name:
            opts.append(("grpc.ssl_target_name_override", security.tls_server_name))
        channel = grpc.secure_channel(target, channel_credentials(security), options=opts)
    token = TokenFile(security.auth_token_file).first if security.auth_token_file is not None else None
    return with_token(channel, token)


def client_security(security: GrpcSecurityConfig) -> dict:
    """FeedretClient keyword arguments to call a root configured like `security` (the CLI's and `feedret up`'s)."""
    return {
        "credentials": channel_credentials(security) if security.enabled else None,
        "server_name": security.tls_server_name,
        "token": TokenFile(security.auth_token_file).first if security.auth_token_file is not None else None,
    }
