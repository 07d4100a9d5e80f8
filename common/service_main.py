"""The body of every `python -m services.<name>`: settings, logging, telemetry, server, wait, stop."""

from __future__ import annotations

import sys
from collections.abc import Callable

from common.logs import configure_logging
from common.rpc.server import ServerHandle, run_until_signalled
from common.settings import ServiceSettings, parse_settings
from common.telemetry import Telemetry, setup_telemetry


def run_service(
    name: str,
    settings_cls: type[ServiceSettings],
    create: Callable[[ServiceSettings, Telemetry], ServerHandle],
    argv: list[str] | None = None,
) -> None:
    settings = parse_settings(settings_cls, sys.argv[1:] if argv is None else argv, f"python -m services.{name}")
    configure_logging(name, settings.log_level, settings.log_json)
    telemetry = setup_telemetry(name, settings)
    handle = create(settings, telemetry)
    try:
        run_until_signalled(handle, settings.grace_s)
    finally:
        handle.stop(settings.grace_s)
        telemetry.shutdown()
