"""Settings shared by every service: one typed object per service, from env (ADACCEL_*) and flags.

Each service subclasses `ServiceSettings`, builds it once in `main()` with `parse_settings` and
passes the fields its components use down; nothing reads the environment anywhere else.

Two fields also read the OpenTelemetry SDK's standard variables (`OTEL_ENV`): ADACCEL_<FIELD> wins
when both are set. `unknown_env` names the ADACCEL_* variables that no settings class reads (a
typo would otherwise be ignored silently); `service_main` reports them at start-up.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

MiB = 1024 * 1024
ENV_PREFIX = "ADACCEL_"

# OTEL_TRACES_SAMPLER's values (the OpenTelemetry SDK environment specification) that we build.
TracesSampler = Literal["always_on", "always_off", "traceidratio", "parentbased_always_on",
                        "parentbased_always_off", "parentbased_traceidratio"]
TRACES_SAMPLERS: tuple[str, ...] = get_args(TracesSampler)
# Default: every trace kept (ratio 1), as before; a deployment lowers the ratio alone.
DEFAULT_TRACES_SAMPLER = "parentbased_traceidratio"
DEFAULT_TRACES_SAMPLER_ARG = 1.0

# Standard OpenTelemetry variables read for these fields when ADACCEL_<FIELD> is not set.
OTEL_ENV: Mapping[str, str] = {
    "OTEL_TRACES_SAMPLER": "traces_sampler",
    "OTEL_TRACES_SAMPLER_ARG": "traces_sampler_arg",
}


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
    traces_sampler: TracesSampler = Field(
        DEFAULT_TRACES_SAMPLER,
        description="which traces are kept (OpenTelemetry sampler names; also read from the standard "
                    "OTEL_TRACES_SAMPLER, this variable wins); health checks and other timer-driven "
                    "polls are never traced whatever the sampler")
    traces_sampler_arg: float = Field(
        DEFAULT_TRACES_SAMPLER_ARG, ge=0, le=1,
        description="share of traces kept by the *traceidratio samplers, 0..1 (also read from the "
                    "standard OTEL_TRACES_SAMPLER_ARG, this variable wins); ignored by the others")
    strict_env: bool = Field(
        False, description="an ADACCEL_* variable that no service reads (a typo) fails start-up "
                           "instead of a warning log line")
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

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # After ADACCEL_* (earlier sources win), before the defaults.
        return init_settings, env_settings, OtelEnvSource(settings_cls), dotenv_settings, file_secret_settings

    @field_validator("traces_sampler", mode="before")
    @classmethod
    def known_sampler(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        name = value.strip().lower()
        if not name:  # set but empty counts as unset (the OpenTelemetry convention)
            return DEFAULT_TRACES_SAMPLER
        if name not in TRACES_SAMPLERS:
            raise ValueError(f"unknown trace sampler {value!r} in ADACCEL_TRACES_SAMPLER or "
                             f"OTEL_TRACES_SAMPLER; one of {', '.join(TRACES_SAMPLERS)}")
        return name

    @field_validator("traces_sampler_arg", mode="before")
    @classmethod
    def ratio(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return DEFAULT_TRACES_SAMPLER_ARG
        try:
            ratio = float(value)
        except (TypeError, ValueError):
            ratio = float("nan")
        if not 0.0 <= ratio <= 1.0:  # NaN fails too
            raise ValueError(f"ADACCEL_TRACES_SAMPLER_ARG or OTEL_TRACES_SAMPLER_ARG is {value!r}: "
                             "the share of traces kept must be a number from 0 to 1")
        return ratio


class OtelEnvSource(PydanticBaseSettingsSource):
    """The standard OpenTelemetry variables of `OTEL_ENV`, for the fields of the class that has them."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the few variables itself

    def __call__(self) -> dict[str, Any]:
        fields = self.settings_cls.model_fields
        return {field: os.environ[name] for name, field in OTEL_ENV.items()
                if field in fields and name in os.environ}


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


def env_names(*classes: type[BaseSettings]) -> frozenset[str]:
    """The ADACCEL_* variables that the settings classes read (upper case)."""
    return frozenset((cls.model_config.get("env_prefix") or "").upper() + field.upper()
                     for cls in classes for field in cls.model_fields)


def unknown_env(environ: Mapping[str, str], known: Collection[str]) -> list[tuple[str, str | None]]:
    """(name, closest known name or None) of each ADACCEL_* variable in `environ` not in `known`.
    Names compare in upper case, as the settings read them; closeness leaves the shared prefix out."""
    by_field = {k.upper().removeprefix(ENV_PREFIX): k.upper() for k in known}
    known_names = set(by_field.values())
    unknown = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known_names:
            close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), by_field, n=1, cutoff=0.6)
            unknown.append((name, by_field[close[0]] if close else None))
    return unknown


def describe_unknown(name: str, closest: str | None) -> str:
    hint = f"did you mean {closest}?" if closest else "no setting has a similar name"
    return f"{name} is not a setting of any service ({hint})"


def parse_settings(cls: type[SettingsT], argv: list[str] | None, prog: str) -> SettingsT:
    """Env vars (ADACCEL_*) overridden by flags; `--help` lists every field with its default."""
    return cls(_cli_parse_args=argv if argv is not None else [], _cli_prog_name=prog)
