"""Settings shared by every service: one typed object per service, from env (ADACCEL_*) and flags.

Each service subclasses `ServiceSettings`, builds it once in `main()` with `parse_settings` and
passes the fields its components use down; nothing reads the environment anywhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


# Shared by every settings class (and so by their mixtures: pydantic merges configs along the MRO).
SETTINGS_CONFIG = SettingsConfigDict(
    env_prefix="ADACCEL_", extra="ignore", cli_kebab_case=True, cli_implicit_flags=True
)


class ServiceSettings(BaseSettings):
    model_config = SETTINGS_CONFIG

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(0, ge=0, le=65535, description="gRPC port (0 = any free port)")
    port_file: Path | None = Field(None, description="write the bound port here once serving")
    workers: int = Field(8, ge=1, description="threads serving RPCs")
    grace_s: float = Field(5.0, ge=0, description="on SIGTERM, seconds in-flight calls may finish")
    max_message_bytes: int = Field(64 * MiB, ge=1024, description="largest gRPC message, sent or received")
    data_dir: Path = Field(Path("data"), description="root of local state (RocksDB, models, logs)")
    log_level: str = Field("INFO", description="logging level")
    log_json: bool = Field(True, description="JSON log lines (else plain text)")
    telemetry_exporter: Literal["console", "otlp", "none"] = Field(
        "console", description="where traces and metrics go"
    )
    otlp_endpoint: str = Field("", description="OTLP gRPC endpoint; set -> exporter otlp")
    telemetry_interval_s: float = Field(60.0, gt=0, description="metric export interval")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Prometheus scrape port: /metrics over HTTP on `host` (0 = off)"
    )
    # Transport security and caller checks (common/rpc/security.py); files, so a mounted Secret supplies them.
    tls_cert_file: Path | None = Field(None, description="PEM certificate of this server; with tls_key_file the port speaks TLS only")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle; set -> callers must present a certificate it signed (mutual TLS)")
    tls_ca_file: Path | None = Field(
        None, description="PEM CA bundle verifying the services this one calls; set -> outgoing calls use TLS")
    tls_client_cert_file: Path | None = Field(
        None, description="PEM certificate this service presents on outgoing calls (peers with mutual TLS)")
    tls_client_key_file: Path | None = Field(None, description="PEM private key of tls_client_cert_file")
    tls_server_name: str = Field("", description="name the called services' certificates carry, when not the dialled host")
    auth_tokens_file: Path | None = Field(
        None, description="accepted bearer tokens, one per line; set -> calls need 'authorization: Bearer <token>'")
    # A plain string (not a list) so that a ConfigMap carries it as is.
    allowed_client_subjects: str = Field(
        "", description="client certificate common names allowed to call, comma-separated (needs tls_client_ca_file)")


class KafkaSettings(BaseSettings):
    """Kafka connection fields, mixed into the settings of services that use Kafka."""

    model_config = SETTINGS_CONFIG

    kafka_bootstrap: str = Field("", description="bootstrap servers host:port[,host:port]; empty = off")
    kafka_generated_topic: str = Field("adaccel.generated", description="topic of finished generations")
    kafka_inventory_topic: str = Field("adaccel.inventory", description="topic of item inventory events")
    kafka_dead_letter_topic: str = Field("adaccel.deadletter", description="topic of rejected records")
    # Passed through to kafka-python (common/kafka_io.py); secrets come from files (a mounted Secret).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka transport: TLS (SSL), SASL, both, or neither")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism when the protocol is SASL_*")
    kafka_sasl_username: str = Field("", description="SASL user name")
    kafka_sasl_password_file: Path | None = Field(None, description="file holding the SASL password")
    kafka_ssl_cafile: Path | None = Field(None, description="PEM CA bundle verifying the brokers (SSL, SASL_SSL)")
    kafka_ssl_certfile: Path | None = Field(None, description="PEM client certificate for brokers that demand one")
    kafka_ssl_keyfile: Path | None = Field(None, description="PEM private key of kafka_ssl_certfile")


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def parse_settings(cls: type[SettingsT], argv: list[str] | None, prog: str) -> SettingsT:
    """Env vars (ADACCEL_*) overridden by flags; `--help` lists every field with its default."""
    return cls(_cli_parse_args=argv if argv is not None else [], _cli_prog_name=prog)
