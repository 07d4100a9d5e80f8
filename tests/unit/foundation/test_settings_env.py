"""Settings from the environment: the trace sampler under its standard OpenTelemetry names and ours,
and ADACCEL_* variables that no service reads, reported at start-up (warning, or failure with
strict_env)."""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import ValidationError

from common import service_main
from common.service_main import UnknownSettingError, check_environment, run_service, sibling_settings
from common.settings import DEFAULT_TRACES_SAMPLER, ServiceSettings, env_names, parse_settings, unknown_env
from common.telemetry import null_telemetry
from services.decoder.settings import DecoderSettings
from services.kvstore.settings import KvStoreSettings
from services.pool.settings import PoolSettings
from services.router.settings import RouterSettings

OTEL_NAMES = ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG",
              "ADACCEL_TRACES_SAMPLER", "ADACCEL_TRACES_SAMPLER_ARG")


@pytest.fixture(autouse=True)
def no_sampler_env(monkeypatch):
    for name in OTEL_NAMES:
        monkeypatch.delenv(name, raising=False)


# ---- the sampler settings ---------------------------------------------------------------------

def test_sampler_default_keeps_every_trace():
    settings = parse_settings(RouterSettings, [], "router")
    assert (settings.traces_sampler, settings.traces_sampler_arg) == (DEFAULT_TRACES_SAMPLER, 1.0)


def test_standard_otel_variables_are_read(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.1")
    settings = parse_settings(DecoderSettings, [], "decoder")  # a subclass gets them too
    assert (settings.traces_sampler, settings.traces_sampler_arg) == ("parentbased_traceidratio", 0.1)


def test_adaccel_names_win_over_the_standard_ones_and_flags_over_both(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.1")
    monkeypatch.setenv("ADACCEL_TRACES_SAMPLER", "TraceIdRatio")  # case and spaces do not matter
    settings = parse_settings(RouterSettings, [], "router")
    assert (settings.traces_sampler, settings.traces_sampler_arg) == ("traceidratio", 0.1)
    flags = ["--traces-sampler", "always_on", "--traces-sampler-arg", "0.5"]
    settings = parse_settings(RouterSettings, flags, "router")
    assert (settings.traces_sampler, settings.traces_sampler_arg) == ("always_on", 0.5)


def test_empty_standard_variables_count_as_unset(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", " ")
    settings = parse_settings(RouterSettings, [], "router")
    assert (settings.traces_sampler, settings.traces_sampler_arg) == (DEFAULT_TRACES_SAMPLER, 1.0)


@pytest.mark.parametrize("name, value, says", [
    ("OTEL_TRACES_SAMPLER", "jaeger_remote", "OTEL_TRACES_SAMPLER"),
    ("ADACCEL_TRACES_SAMPLER", "sometimes", "ADACCEL_TRACES_SAMPLER"),
    ("OTEL_TRACES_SAMPLER_ARG", "1.5", "OTEL_TRACES_SAMPLER_ARG"),
    ("OTEL_TRACES_SAMPLER_ARG", "-0.1", "OTEL_TRACES_SAMPLER_ARG"),
    ("ADACCEL_TRACES_SAMPLER_ARG", "ten percent", "ADACCEL_TRACES_SAMPLER_ARG"),
    ("OTEL_TRACES_SAMPLER_ARG", "nan", "OTEL_TRACES_SAMPLER_ARG"),
])
def test_bad_sampler_values_fail_naming_the_variable(monkeypatch, name, value, says):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=says) as failure:
        parse_settings(RouterSettings, [], "router")
    assert repr(value) in str(failure.value)


def test_bad_sampler_fails_the_service_before_it_starts(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "ratio")
    with pytest.raises(ValidationError, match="OTEL_TRACES_SAMPLER"):
        run_service("router", RouterSettings, _never_created, argv=[])


# ---- unknown ADACCEL_* variables --------------------------------------------------------------

def _never_created(settings, telemetry):
    raise AssertionError("the server must not be created")


class Created(Exception):
    """Stops run_service right after the server would have been created."""


def _created(settings, telemetry):
    raise Created


def test_env_names_are_the_prefixed_fields():
    names = env_names(RouterSettings)
    assert {"ADACCEL_PORT", "ADACCEL_DECODER_ADDRS", "ADACCEL_TRACES_SAMPLER", "ADACCEL_STRICT_ENV"} <= names
    assert "ADACCEL_KAFKA_BOOTSTRAP" not in names and "ADACCEL_KAFKA_BOOTSTRAP" in env_names(PoolSettings)
    assert len(names) == len(RouterSettings.model_fields)


def test_unknown_env_names_the_typos_and_their_closest_settings():
    environ = {"ADACCEL_MAX_QUEU": "4", "ADACCEL_PORT": "1", "adaccel_device": "cpu", "PATH": "/bin",
               "OTEL_TRACES_SAMPLER": "always_on", "ADACCEL_ZZZZ": "1"}
    assert unknown_env(environ, env_names(DecoderSettings)) == [
        ("ADACCEL_MAX_QUEU", "ADACCEL_MAX_QUEUE"), ("ADACCEL_ZZZZ", None)]


def test_sibling_settings_are_every_service_class():
    every = {DecoderSettings, KvStoreSettings, PoolSettings, RouterSettings}
    assert set(sibling_settings(RouterSettings)) == every
    assert sibling_settings(ServiceSettings) == []  # not in a services/<name>/settings.py layout


def test_unknown_variables_are_warnings_by_default(caplog):
    environ = {"ADACCEL_HEARTBEAT_SECONDS": "1", "ADACCEL_HEARTBEAT_S": "1"}
    with caplog.at_level(logging.WARNING, logger=service_main.__name__):
        messages = check_environment(environ, env_names(RouterSettings), strict=False)
    assert messages == ["ADACCEL_HEARTBEAT_SECONDS is not a setting of any service "
                        "(did you mean ADACCEL_HEARTBEAT_S?)"]
    [record] = caplog.records
    assert (record.levelname, record.variable, record.closest) == (
        "WARNING", "ADACCEL_HEARTBEAT_SECONDS", "ADACCEL_HEARTBEAT_S")


def test_strict_env_makes_them_an_error():
    with pytest.raises(UnknownSettingError, match="ADACCEL_HEARTBEAT_SECONDS.*ADACCEL_HEARTBEAT_S"):
        check_environment({"ADACCEL_HEARTBEAT_SECONDS": "1"}, env_names(RouterSettings), strict=True)
    assert check_environment({"ADACCEL_PORT": "1"}, env_names(RouterSettings), strict=True) == []


@pytest.fixture
def service_start(monkeypatch, capsys):
    """run_service up to the server's creation, without global telemetry; returns its JSON log lines.
    The root logger is put back afterwards."""
    monkeypatch.setattr(service_main, "setup_telemetry", lambda name, settings: null_telemetry())
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def start(**env: str) -> list[dict]:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(Created):
            run_service("router", RouterSettings, _created, argv=[])
        return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]

    yield start
    root.handlers[:], level = saved
    root.setLevel(level)


def test_service_start_warns_of_typos_and_accepts_other_services_variables(service_start):
    lines = service_start(ADACCEL_DECODER_ADRS="a:1", ADACCEL_KVSTORE_ADDRS="kv:1",  # kv: the decoder's
                          ADACCEL_KAFKA_BOOTSTRAP="k:9", ADACCEL_TELEMETRY_EXPORTER="none")
    warnings = [line for line in lines if line["level"] == "WARNING"]
    assert [(w["variable"], w["closest"], w["service"]) for w in warnings] == [
        ("ADACCEL_DECODER_ADRS", "ADACCEL_DECODER_ADDRS", "router")]


def test_service_start_fails_with_strict_env(monkeypatch):
    monkeypatch.setenv("ADACCEL_STRICT_ENV", "true")
    monkeypatch.setenv("ADACCEL_DECODER_ADRS", "a:1")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        expected = "ADACCEL_DECODER_ADRS .*did you mean ADACCEL_DECODER_ADDRS"
        with pytest.raises(UnknownSettingError, match=expected):
            run_service("router", RouterSettings, _never_created, argv=[])
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
