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
provides them, and Secrets are rotated in place (the kubelet swaps the volume's files under the
running pod). What each side does with a rotation:

- The token file is re-read when it changes (`TokenFile`).
- The listening port's certificate, key and client CA are re-read when they change, without a
  restart (`ServerCertificates`, behind grpc's dynamic server credentials): the next handshake
  uses the new files; connections already open keep the certificate they were made with. A
  rotation caught half-way, or a broken one, keeps the previous certificate serving (and logs a
  warning) until the files make a valid set again.
- Outgoing calls' CA, client certificate and key are read once, when `client_security` builds
  the channel credentials (grpc has no reloadable channel credentials in Python). The services
  call it and open their channels at start-up and keep those channels (reconnects included) for
  the life of the process, so a rotated `tls_ca_file` / client certificate takes effect on the
  next restart (rollout). Rotate a CA by first shipping a CA file that holds the old and the new
  CA to every caller, then rotating the servers' certificates, then dropping the old CA.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.rpc.errors import PermissionDenied, ServiceError, Unauthenticated
from common.rpc.interceptors import abort_with
from common.settings import ServiceSettings

try:  # a dependency of this project; without it a rotated key is not checked against its certificate here
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
except ImportError:  # pragma: no cover
    x509 = serialization = None

log = logging.getLogger(__name__)

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


class ServerCertificates:
    """The listening port's certificate chain, private key and (optional) client CA, read from
    files and re-read when they change, for grpc's dynamic server credentials.

    Why: the files come from a Kubernetes Secret mounted as a volume, and Secrets are rotated in
    place (cert-manager renews a certificate before it expires and the kubelet swaps the files
    under the running pod); reading them once at start-up would serve the old certificate until
    it expires. grpc calls `fetch` before every new TLS handshake, so it is cheap when nothing
    changed: it compares each file's (inode, mtime_ns, size) stamp (the inode catches a file
    replaced by one of the same size within the same timestamp tick) and reads nothing.

    A changed set of files is read and checked before grpc sees it: every file non-empty and
    PEM, and (with `cryptography`) the certificates parse and the key is the one of the leaf
    certificate. Whatever fails (a file missing, empty or half-written mid-rotation, a key that
    does not match the certificate yet) keeps the previous configuration serving and logs one
    warning per broken state; the next change of the files is tried again. At start-up the same
    failures raise instead: a port never starts with a certificate it cannot serve.
    """

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None):
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self._lock = threading.Lock()
        self._stamps = self._stamp_files()
        self.initial = self._load()  # raises: refuse to start with an unusable certificate
        self._rejected: tuple | None = None  # stamps of a broken set already warned about

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert_file, self.key_file) + ((self.client_ca_file,) if self.client_ca_file else ())

    def _stamp_files(self) -> tuple[tuple[int, int, int], ...]:
        stats = [os.stat(path) for path in self.paths]  # follows the Secret volume's symlinks
        return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in stats)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert, key = _read_pem(self.cert_file), _read_pem(self.key_file)
        client_ca = _read_pem(self.client_ca_file) if self.client_ca_file is not None else None
        _check_server_pem(self.cert_file, cert, self.key_file, key, self.client_ca_file, client_ca)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration when the files changed and make a valid set, else None (keep
        serving the current one). Called by grpc before each handshake; never raises."""
        with self._lock:
            try:
                stamps = self._stamp_files()
            except OSError as exc:  # a file missing for a moment mid-rotation
                self._warn(("missing", str(exc)), exc)
                return None
            if stamps == self._stamps or stamps == self._rejected:
                return None
            try:
                config = self._load()
            except Exception as exc:  # noqa: BLE001 - a broken rotation must never break the port
                self._warn(stamps, exc)
                return None
            self._stamps, self._rejected = stamps, None
        log.info("TLS certificate reloaded", extra={"cert_file": str(self.cert_file)})
        return config

    def _warn(self, state, exc: Exception) -> None:
        if state != self._rejected:
            self._rejected = state
            log.warning("TLS certificate files changed but are not usable; keeping the previous certificate",
                        extra={"cert_file": str(self.cert_file), "error": repr(exc)})


def _read_pem(path: Path) -> bytes:
    data = path.read_bytes()
    if b"-----BEGIN " not in data:
        raise ValueError(f"{path}: {'empty' if not data.strip() else 'not PEM'}")
    return data


def _check_server_pem(cert_file: Path, cert: bytes, key_file: Path, key: bytes,
                      ca_file: Path | None, ca: bytes | None) -> None:
    """Raises ValueError unless the certificates parse and the key belongs to the leaf certificate."""
    if x509 is None:  # pragma: no cover - grpc's own check refuses a bad set; the old one keeps serving
        return
    try:
        leaf = x509.load_pem_x509_certificates(cert)[0]
    except ValueError as exc:
        raise ValueError(f"{cert_file}: {exc}") from exc
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: an encrypted key
        raise ValueError(f"{key_file}: {exc}") from exc
    if ca is not None:
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError as exc:
            raise ValueError(f"{ca_file}: {exc}") from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ValueError(f"{key_file} is not the private key of {cert_file}")


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS when a client CA is set) for the listening port; None = plaintext.
    The certificate files are re-read when they change (see `ServerCertificates`)."""
    _require_pair(settings.tls_cert_file, settings.tls_key_file, "tls_cert_file and tls_key_file")
    if settings.tls_cert_file is None:
        if settings.tls_client_ca_file is not None or allowed_subjects(settings):
            raise ValueError("tls_client_ca_file / allowed_client_subjects need tls_cert_file and tls_key_file")
        return None
    if allowed_subjects(settings) and settings.tls_client_ca_file is None:
        raise ValueError("allowed_client_subjects needs tls_client_ca_file (client certificates are checked by it)")
    certificates = ServerCertificates(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    return grpc.dynamic_ssl_server_credentials(
        certificates.initial,
        certificates.fetch,
        require_client_authentication=settings.tls_client_ca_file is not None,
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
        return any([hmac.compare_digest(candidate, token) for token in self.tokens()])  # noqa: C419 - no short-circuit


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

    def refusal(self, context: grpc.ServicerContext) -> ServiceError | None:
        if self.tokens is not None:
            token = bearer_token(context.invocation_metadata())
            if token is None:
                return Unauthenticated("authorization: a 'Bearer <token>' header is required")
            if not self.tokens.accepts(token):
                return Unauthenticated("authorization: token not accepted")
        if self.allowed_subjects:
            names = context.auth_context().get("x509_common_name", [])
            if not any(name in self.allowed_subjects for name in names):
                return PermissionDenied("client certificate: subject not allowed to call this service")
        return None

    def _guard_unary(self, fn: Callable) -> Callable:
        def handler(request, context):
            refused = self.refusal(context)
            if refused is not None:
                abort_with(context, refused)  # rich status: ErrorInfo UNAUTHENTICATED / ...
            return fn(request, context)

        return handler

    def _guard_stream(self, fn: Callable) -> Callable:
        def handler(request, context) -> Iterator:
            refused = self.refusal(context)
            if refused is not None:
                abort_with(context, refused)  # rich status: ErrorInfo UNAUTHENTICATED / ...
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
