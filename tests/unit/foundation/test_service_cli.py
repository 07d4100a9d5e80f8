import subprocess
import sys
from pathlib import Path

import pytest

from common.settings import parse_settings
from services.router.settings import RouterSettings

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("service, flag", [("router", "--decoder-addrs"), ("decoder", "--model-path"),
                                           ("kvstore", "--memory-budget-bytes"), ("pool", "--kafka-bootstrap")])
def test_every_service_has_help_listing_its_settings(service, flag):
    result = subprocess.run([sys.executable, "-m", f"services.{service}", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"python -m services.{service}" in result.stdout and flag in result.stdout


def test_flags_override_env(monkeypatch):
    monkeypatch.setenv("ADACCEL_PORT", "7000")
    monkeypatch.setenv("ADACCEL_DECODER_ADDRS", "a:1,b:2")
    settings = parse_settings(RouterSettings, ["--port", "7001"], "router")
    assert settings.port == 7001 and settings.decoder_addrs == ["a:1", "b:2"]


def test_bad_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("ADACCEL_PORT", "70000")
    with pytest.raises(ValueError, match="port"):
        parse_settings(RouterSettings, [], "router")
