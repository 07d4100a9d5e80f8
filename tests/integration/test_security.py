"""TLS, mutual TLS and caller checks on real servers over loopback, with a throwaway CA made here."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adaccel.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    kvstore_pb2,
    kvstore_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from common.kafka_io import security_options
from common.rpc.channels import open_channel
from common.rpc.security import ServerCertificates, bearer_metadata, client_security, server_credentials
from common.settings import KafkaSettings
from common.telemetry import null_telemetry
from services.decoder.server import create_decoder_server
from services.decoder.settings import DecoderSettings
from services.kvstore.server import create_kvstore_server
from services.kvstore.settings import KvStoreSettings
from services.router.server import create_router_server
from services.router.settings import RouterSettings


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class ThrowawayCA:
    """A CA and the certificates it signs, as PEM files under `root` (valid for one hour)."""

    def __init__(self, root: Path, name: str):
        self.root = root
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = root / f"{name}-ca.pem"
        self.pem.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        issued = Issued(self.root / f"{common_name}.pem", self.root / f"{common_name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
        return issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = ThrowawayCA(root, "adaccel")
    rogue = ThrowawayCA(root, "rogue")
    return {
        "ca": ca.pem,
        "server": ca.issue("adaccel-server", dns=("localhost",), ips=("127.0.0.1",)),
        "internal": ca.issue("adaccel-internal", dns=("adaccel.internal",)),  # no loopback name in it
        "ads-ranking": ca.issue("ads-ranking"),
        "intruder": ca.issue("intruder"),
        "rogue": rogue.issue("ads-ranking-forged"),
    }


def tls_channel(address: str, ca: Path, client: Issued | None = None, server_name: str = "") -> grpc.Channel:
    settings = KvStoreSettings(tls_ca_file=ca, tls_client_cert_file=client.cert if client else None,
                               tls_client_key_file=client.key if client else None, tls_server_name=server_name)
    return open_channel(address, security=client_security(settings))


def kv_stats(channel: grpc.Channel) -> kvstore_pb2.KvStats:
    try:
        return kvstore_pb2_grpc.KvStoreStub(channel).Stats(kvstore_pb2.KvStatsRequest(), timeout=5)
    finally:
        channel.close()


@pytest.fixture
def kvstore_with(tmp_path):
    handles = []

    def start(**tls):
        handle = create_kvstore_server(KvStoreSettings(data_dir=tmp_path / str(len(handles)), **tls), null_telemetry())
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop(0)


def test_tls_port_serves_tls_clients_and_refuses_plaintext(kvstore_with, pki):
    server = kvstore_with(tls_cert_file=pki["server"].cert, tls_key_file=pki["server"].key)
    assert kv_stats(tls_channel(server.address, pki["ca"])).memory_blocks == 0
    with pytest.raises(grpc.RpcError) as err:
        kv_stats(open_channel(server.address))  # plaintext against a TLS port: no handshake
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_client_refuses_a_server_its_ca_did_not_sign(kvstore_with, pki, tmp_path):
    server = kvstore_with(tls_cert_file=pki["server"].cert, tls_key_file=pki["server"].key)
    with pytest.raises(grpc.RpcError) as err:
        kv_stats(tls_channel(server.address, pki["rogue"].cert))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(kvstore_with, pki):
    server = kvstore_with(tls_cert_file=pki["server"].cert, tls_key_file=pki["server"].key,
                          tls_client_ca_file=pki["ca"])
    for client in (None, pki["rogue"]):  # no certificate; a certificate from another CA
        with pytest.raises(grpc.RpcError) as err:
            kv_stats(tls_channel(server.address, pki["ca"], client))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert kv_stats(tls_channel(server.address, pki["ca"], pki["ads-ranking"])).shard == 0


def test_outgoing_calls_check_the_configured_server_name(kvstore_with, pki):
    # One internal certificate for every service, dialled by addresses it does not name.
    server = kvstore_with(tls_cert_file=pki["internal"].cert, tls_key_file=pki["internal"].key)
    with pytest.raises(grpc.RpcError):
        kv_stats(tls_channel(server.address, pki["ca"]))
    assert kv_stats(tls_channel(server.address, pki["ca"], server_name="adaccel.internal")).shard == 0


# --- Certificate rotation under a running server -------------------------------------------

SECRET_FILES = {"cert": "tls.crt", "key": "tls.key", "ca": "ca.crt"}


class MountedSecret:
    """Files as a Kubernetes Secret volume provides them, rotated in place under a running server.

    `atomic`: the kubelet's way, every file a link through `..data` to a versioned directory and
    `..data` re-pointed in one rename; otherwise each file is replaced on its own (a temp file,
    then os.replace), so a reader may see half a rotation."""

    def __init__(self, root: Path, *, atomic: bool, **files: Path):
        self.root, self.atomic, self.versions = root, atomic, 0
        root.mkdir()
        self.rotate(**files)

    def path(self, name: str) -> Path:
        return self.root / SECRET_FILES[name]

    def rotate(self, **files: Path | bytes | None) -> None:
        """The next contents of the named files: a file to copy, bytes, or None to remove it."""
        contents = {name: src.read_bytes() if isinstance(src, Path) else src for name, src in files.items()}
        if not self.atomic:
            for name, content in contents.items():
                target = self.path(name)
                if content is None:
                    target.unlink()
                    continue
                tmp = target.with_name(f".{target.name}.tmp")
                tmp.write_bytes(content)
                os.replace(tmp, target)
            return
        data = self.root / "..data"
        kept = {n: (data / f).read_bytes() for n, f in SECRET_FILES.items() if (data / f).exists()}
        self.versions += 1
        version = self.root / f"..v{self.versions}"
        version.mkdir()
        for name, content in {**kept, **contents}.items():
            (version / SECRET_FILES[name]).write_bytes(content)
            if not self.path(name).is_symlink():
                self.path(name).symlink_to(f"..data/{SECRET_FILES[name]}")
        (self.root / "..data_tmp").symlink_to(version.name)
        os.replace(self.root / "..data_tmp", data)


def handshake(address: str, ca: Path, client: Issued | None = None) -> str:
    """'OK' or the status code of one health check over a NEW connection trusting `ca` (the
    channel's own subchannel pool: grpc would otherwise reuse a connection another channel made)."""
    settings = KvStoreSettings(tls_ca_file=ca, tls_client_cert_file=client.cert if client else None,
                               tls_client_key_file=client.key if client else None)
    channel = grpc.secure_channel(address, client_security(settings).credentials,
                                  options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return "OK"
    except grpc.RpcError as err:
        return err.code().name
    finally:
        channel.close()


@pytest.fixture
def two_cas(tmp_path):
    """Two CAs and a loopback server certificate from each: before and after a rotation."""
    one, two = ThrowawayCA(tmp_path, "ca-one"), ThrowawayCA(tmp_path, "ca-two")
    return one, two, one.issue("server-one", ips=("127.0.0.1",)), two.issue("server-two", ips=("127.0.0.1",))


@pytest.mark.parametrize("atomic", [True, False], ids=["secret-volume", "file-by-file"])
def test_rotated_server_certificate_serves_new_handshakes_without_restart(kvstore_with, tmp_path, two_cas, atomic):
    ca_one, ca_two, first, second = two_cas
    secret = MountedSecret(tmp_path / "secret", atomic=atomic, cert=first.cert, key=first.key)
    server = kvstore_with(tls_cert_file=secret.path("cert"), tls_key_file=secret.path("key"))
    assert (handshake(server.address, ca_one.pem), handshake(server.address, ca_two.pem)) == ("OK", "UNAVAILABLE")
    connected_before = grpc.secure_channel(server.address, grpc.ssl_channel_credentials(ca_one.pem.read_bytes()),
                                           options=[("grpc.use_local_subchannel_pool", 1)])
    health_before = health_pb2_grpc.HealthStub(connected_before)
    health_before.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)

    secret.rotate(key=second.key, cert=second.cert)

    # The same server, not restarted: new handshakes present the certificate signed by CA two.
    assert handshake(server.address, ca_two.pem) == "OK"
    assert handshake(server.address, ca_one.pem) == "UNAVAILABLE"
    # A connection made before the rotation is not dropped by it.
    try:
        reply = health_before.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        connected_before.close()


def test_broken_certificate_rotation_keeps_serving_the_previous_certificate(kvstore_with, tmp_path, two_cas, caplog):
    ca_one, ca_two, first, second = two_cas
    caplog.set_level(logging.WARNING, logger="common.rpc.security")
    secret = MountedSecret(tmp_path / "secret", atomic=False, cert=first.cert, key=first.key)
    server = kvstore_with(tls_cert_file=secret.path("cert"), tls_key_file=secret.path("key"))
    still_first = ("OK", "UNAVAILABLE")
    assert (handshake(server.address, ca_one.pem), handshake(server.address, ca_two.pem)) == still_first
    broken_states = [
        ({"cert": b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"}, "tls.crt"),
        ({"cert": b""}, "empty"),
        ({"cert": second.cert}, "is not the private key"),  # half a rotation: the key is still the old one
        ({"key": None}, "No such file"),  # the key missing for a moment
    ]
    for files, reason in broken_states:
        secret.rotate(**files)
        assert (handshake(server.address, ca_one.pem), handshake(server.address, ca_two.pem)) == still_first, files
        warnings = [r for r in caplog.records if r.name == "common.rpc.security" and r.levelno == logging.WARNING]
        assert warnings and reason in warnings[-1].error, (files, [w.error for w in warnings])
    # Once the files make a valid set again, the next handshake uses it.
    secret.rotate(key=second.key)
    assert (handshake(server.address, ca_one.pem), handshake(server.address, ca_two.pem)) == ("UNAVAILABLE", "OK")


def test_rotated_client_ca_applies_to_new_handshakes(kvstore_with, tmp_path, two_cas):
    ca_one, ca_two, first, _ = two_cas
    client_one, client_two = ca_one.issue("client-one"), ca_two.issue("client-two")
    secret = MountedSecret(tmp_path / "secret", atomic=True, cert=first.cert, key=first.key, ca=ca_one.pem)
    server = kvstore_with(tls_cert_file=secret.path("cert"), tls_key_file=secret.path("key"),
                          tls_client_ca_file=secret.path("ca"))
    assert [handshake(server.address, ca_one.pem, c) for c in (client_one, client_two)] == ["OK", "UNAVAILABLE"]
    secret.rotate(ca=ca_two.pem)
    assert [handshake(server.address, ca_one.pem, c) for c in (client_one, client_two)] == ["UNAVAILABLE", "OK"]


def test_server_certificates_read_the_files_only_when_they_change(tmp_path, two_cas, monkeypatch):
    _, _, first, second = two_cas
    secret = MountedSecret(tmp_path / "secret", atomic=False, cert=first.cert, key=first.key)
    certificates = ServerCertificates(secret.path("cert"), secret.path("key"))
    loads = []
    load = certificates._load
    monkeypatch.setattr(certificates, "_load", lambda: loads.append(1) or load())
    assert certificates.fetch() is None and certificates.fetch() is None and loads == []
    secret.rotate(key=second.key, cert=second.cert)
    assert isinstance(certificates.fetch(), grpc.ServerCertificateConfiguration)
    assert certificates.fetch() is None and loads == [1]
    # At start-up a key that is not the certificate's refuses to start instead.
    with pytest.raises(ValueError, match="is not the private key"):
        server_credentials(KvStoreSettings(tls_cert_file=first.cert, tls_key_file=second.key))


@pytest.fixture
def router_with(tmp_path):
    handles = []

    def start(**settings):
        handle = create_router_server(RouterSettings(decoder_addrs=[], data_dir=tmp_path, **settings),
                                      null_telemetry())
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop(0)


def router_info(channel: grpc.Channel, token: str | None = None) -> router_pb2.RouterInfo:
    try:
        return router_pb2_grpc.RouterStub(channel).Info(router_pb2.RouterInfoRequest(), timeout=5,
                                                       metadata=bearer_metadata(token))
    finally:
        channel.close()


def test_router_refuses_calls_without_an_accepted_bearer_token(router_with, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# ads ranking service\nrank-secret-1\n")
    router = router_with(auth_tokens_file=tokens)
    for token in (None, "wrong", "rank-secret-1x"):
        with pytest.raises(grpc.RpcError) as err:
            router_info(open_channel(router.address), token)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert router_info(open_channel(router.address), "rank-secret-1").policy
    # A streaming call is refused before the handler validates anything.
    with pytest.raises(grpc.RpcError) as err:
        list(router_pb2_grpc.RouterStub(open_channel(router.address)).Generate(
            common_pb2.GenerateRequest(), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Kubelet probes carry no token: health stays open.
    health = health_pb2_grpc.HealthStub(open_channel(router.address)).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    # Rotation: the Secret's file changes in place; the old token stops working.
    tokens.write_text("rank-secret-2\n")
    with pytest.raises(grpc.RpcError) as err:
        router_info(open_channel(router.address), "rank-secret-1")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert router_info(open_channel(router.address), "rank-secret-2").policy


def test_router_admits_only_the_allowed_client_certificate(router_with, pki):
    router = router_with(tls_cert_file=pki["server"].cert, tls_key_file=pki["server"].key,
                         tls_client_ca_file=pki["ca"], allowed_client_subjects="ads-ranking")
    assert router_info(tls_channel(router.address, pki["ca"], pki["ads-ranking"])).policy
    with pytest.raises(grpc.RpcError) as err:
        router_info(tls_channel(router.address, pki["ca"], pki["intruder"]))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("settings", [
    dict(tls_cert_file=Path("cert.pem")),  # key missing
    dict(tls_client_ca_file=Path("ca.pem")),  # mTLS without a server certificate
    dict(allowed_client_subjects="ads-ranking"),  # identity check without TLS
])
def test_incomplete_tls_settings_refuse_to_start(settings):
    with pytest.raises(ValueError):
        server_credentials(KvStoreSettings(**settings))


def test_kafka_security_settings_reach_kafka_python(tmp_path):
    from kafka import KafkaConsumer, KafkaProducer

    password = tmp_path / "password"
    password.write_text("s3cret\n")
    options = security_options(KafkaSettings(
        kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="pool",
        kafka_sasl_password_file=password, kafka_ssl_cafile=tmp_path / "ca.pem"))
    assert options["sasl_plain_password"] == "s3cret" and options["ssl_cafile"] == str(tmp_path / "ca.pem")
    for client in (KafkaProducer, KafkaConsumer):  # every key is one the client knows
        assert set(options) <= set(client.DEFAULT_CONFIG)
    assert security_options(KafkaSettings()) == {}
    with pytest.raises(ValueError):
        security_options(KafkaSettings(kafka_security_protocol="SASL_PLAINTEXT"))


def test_router_reaches_decoders_over_mutual_tls(tmp_path, pki, tiny_llama_path, one_torch_thread):
    """Service to service: the decoder demands client certificates; the router presents its own."""
    decoder = create_decoder_server(DecoderSettings(
        data_dir=tmp_path, model_path=tiny_llama_path, torch_threads=1, decoder_id="decoder-tls",
        tls_cert_file=pki["server"].cert, tls_key_file=pki["server"].key, tls_client_ca_file=pki["ca"]),
        null_telemetry())
    internal_client = pki["ads-ranking"]  # any certificate the CA signed will do for service calls
    router = create_router_server(RouterSettings(
        data_dir=tmp_path, decoder_addrs=[decoder.address], heartbeat_s=0.5,
        tls_ca_file=pki["ca"], tls_client_cert_file=internal_client.cert, tls_client_key_file=internal_client.key),
        null_telemetry())
    try:
        info = router_info(open_channel(router.address))
        assert [r.healthy for r in info.replicas] == [True]
        request = common_pb2.GenerateRequest(
            blocks=[common_pb2.PromptBlock(id="item-1", kind=common_pb2.BLOCK_KIND_ITEM, text="Aurora headphones.")],
            params=common_pb2.GenerationParams(max_new_tokens=3))
        chunks = list(router_pb2_grpc.RouterStub(open_channel(router.address)).Generate(request, timeout=30))
        assert chunks[-1].summary.decoder_id == "decoder-tls" and chunks[-1].summary.stats.new_tokens == 3
        # The same decoder refuses a caller without a certificate.
        with pytest.raises(grpc.RpcError) as err:
            decoder_pb2_grpc.DecoderStub(tls_channel(decoder.address, pki["ca"])).Report(
                decoder_pb2.DecoderReportRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        router.stop(0)
        decoder.stop(0)
