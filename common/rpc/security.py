"""Transport security and caller checks for every adaccel server and client, from settings.

Three independent switches, all off by default (loopback development):

- TLS on the listening port: `tls_cert_file` + `tls_key_file`. With `tls_client_ca_file` as well,
  the port demands a client certificate signed by that CA (mutual TLS); a client without one
  never completes the handshake.
- TLS on outgoing calls: `tls_ca_file` verifies the called service; `tls_client_cert_file` +
  `tls_client_key_file` present this service's own certificate (for peers that demand mTLS).
- Caller checks (meant for the router's public port): `auth_tokens_file` demands
  `authorization: Bearer <token>` with a token listed in the file (UNAUTHENTICATED otherwise);
  `allowed_client_subjects` demands a client certificate whose subject common name is listed
  (PERMISSION_DENIED otherwise). The health service stays open: kubelet probes carry neither.

Certificates and tokens come from files so that a Kubernetes Secret mounted as a volume
provides them; the token file is re-read when it changes (Secrets are rotated in place).
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.settings import ServiceSettings

# Health checks stay reachable without credentials (kubelet gRPC probes send none).
UNGUARDED_PREFIXES = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True, slots=True)
class ClientSecurity:
    """How this process calls other services: TLS credentials (None = plaintext) and the name
    the peers' certificates must carry when it differs from the dialled host."""

    credentials: grpc.ChannelCredentials | None = None
    server_name: str = ""


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def _require_pair(a: Path | None, b: Path | None, names: str) -> None:
    if (a is None) != (b is None):
        raise ValueError(f"{names}: set both or neither")


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS when a client CA is set) for the listening port; None = plaintext."""
    _require_pair(settings.tls_cert_file, settings.tls_key_file, "tls_cert_file and tls_key_file")
    if settings.tls_cert_file is None:
        if settings.tls_client_ca_file is not None or allowed_subjects(settings):
            raise ValueError("tls_client_ca_file / allowed_client_subjects need tls_cert_file and tls_key_file")
        return None
    if allowed_subjects(settings) and settings.tls_client_ca_file is None:
        raise ValueError("allowed_client_subjects needs tls_client_ca_file (client certificates are checked by it)")
    client_ca = _read(settings.tls_client_ca_file)
    return grpc.ssl_server_credentials(
        [(_read(settings.tls_key_file), _read(settings.tls_cert_file))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def client_security(settings: ServiceSettings) -> ClientSecurity:
    """Credentials for this service's outgoing calls (to decoders, the pool, the kv-store)."""
    _require_pair(settings.tls_client_cert_file, settings.tls_client_key_file,
                  "tls_client_cert_file and tls_client_key_file")
    if settings.tls_ca_file is None:
        if settings.tls_client_cert_file is not None:
            raise ValueError("tls_client_cert_file needs tls_ca_file (outgoing TLS is off without it)")
        return ClientSecurity()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(settings.tls_ca_file),
        private_key=_read(settings.tls_client_key_file),
        certificate_chain=_read(settings.tls_client_cert_file),
    )
    return ClientSecurity(credentials, settings.tls_server_name)


class TokenFile:
    """Accepted bearer tokens, one per line (blank lines and '#' comments ignored), re-read when
    the file's mtime or size changes."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._tokens: tuple[bytes, ...] = ()
        if not self.tokens():
            raise ValueError(f"auth_tokens_file {path}: no tokens in it")

    def tokens(self) -> tuple[bytes, ...]:
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if stamp != self._stamp:
                lines = self.path.read_text().splitlines()
                self._tokens = tuple(t.strip().encode() for t in lines if t.strip() and not t.startswith("#"))
                self._stamp = stamp
            return self._tokens

    def accepts(self, presented: str) -> bool:
        candidate = presented.encode()
        # Compare with every token, in constant time each, so timing tells nothing about which matched.
        return any([hmac.compare_digest(candidate, token) for token in self.tokens()])


def bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return None


class CallerCheckInterceptor(grpc.ServerInterceptor):
    """Refuses calls without an accepted bearer token (UNAUTHENTICATED) or from a client
    certificate whose subject common name is not allowed (PERMISSION_DENIED)."""

    def __init__(self, tokens: TokenFile | None, allowed_subjects: Sequence[str]):
        self.tokens = tokens
        self.allowed_subjects = frozenset(s.encode() for s in allowed_subjects)

    def refusal(self, context: grpc.ServicerContext) -> tuple[grpc.StatusCode, str] | None:
        if self.tokens is not None:
            token = bearer_token(context.invocation_metadata())
            if token is None:
                return grpc.StatusCode.UNAUTHENTICATED, "authorization: a 'Bearer <token>' header is required"
            if not self.tokens.accepts(token):
                return grpc.StatusCode.UNAUTHENTICATED, "authorization: token not accepted"
        if self.allowed_subjects:
            names = context.auth_context().get("x509_common_name", [])
            if not any(name in self.allowed_subjects for name in names):
                return grpc.StatusCode.PERMISSION_DENIED, "client certificate: subject not allowed to call this service"
        return None

    def _guard_unary(self, fn: Callable) -> Callable:
        def handler(request, context):
            refused = self.refusal(context)
            if refused is not None:
                context.abort(*refused)
            return fn(request, context)

        return handler

    def _guard_stream(self, fn: Callable) -> Callable:
        def handler(request, context) -> Iterator:
            refused = self.refusal(context)
            if refused is not None:
                context.abort(*refused)
            yield from fn(request, context)

        return handler

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNGUARDED_PREFIXES):
            return handler
        if handler.unary_unary:
            return handler._replace(unary_unary=self._guard_unary(handler.unary_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._guard_stream(handler.unary_stream))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._guard_unary(handler.stream_unary))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._guard_stream(handler.stream_stream))
        return handler


def allowed_subjects(settings: ServiceSettings) -> list[str]:
    return [s.strip() for s in settings.allowed_client_subjects.split(",") if s.strip()]


def caller_check_interceptor(settings: ServiceSettings) -> CallerCheckInterceptor | None:
    """The interceptor the settings ask for, or None when no caller check is configured."""
    tokens = TokenFile(settings.auth_tokens_file) if settings.auth_tokens_file is not None else None
    subjects = allowed_subjects(settings)
    if tokens is None and not subjects:
        return None
    return CallerCheckInterceptor(tokens, subjects)


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries a bearer token (empty without one), for clients of the router."""
    return (("authorization", f"Bearer {token}"),) if token else ()
