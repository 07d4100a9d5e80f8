"""The body of every `python -m services.<name>`: settings, logging, the environment check,
telemetry, server, wait, stop."""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Callable, Iterable, Mapping

from pydantic_settings import BaseSettings

from common.logs import configure_logging
from common.rpc.server import ServerHandle, run_until_signalled
from common.settings import ServiceSettings, describe_unknown, env_names, parse_settings, unknown_env
from common.telemetry import Telemetry, setup_telemetry

log = logging.getLogger(__name__)


class UnknownSettingError(ValueError):
    """ADACCEL_* variables that no service reads, with strict_env on."""


def sibling_settings(settings_cls: type[BaseSettings]) -> list[type[BaseSettings]]:
    """The settings classes of every service beside this one: those defined in the `settings` module
    of each package next to the one that holds `settings_cls` (services/<name>/settings.py), found
    on disk, so that common names no service. Empty for a class outside such a layout (tests)."""
    parts = settings_cls.__module__.split(".")
    if len(parts) < 3 or parts[-1] != "settings":
        return []
    root_name = ".".join(parts[:-2])
    root = importlib.import_module(root_name)
    found: list[type[BaseSettings]] = []
    for info in pkgutil.iter_modules(getattr(root, "__path__", [])):
        module_name = f"{root_name}.{info.name}.settings"
        if not info.ispkg:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # a package without settings (a job, not a service)
                continue
            raise
        found += [value for value in vars(module).values() if isinstance(value, type)
                  and issubclass(value, BaseSettings) and value.__module__ == module_name]
    return found


def check_environment(environ: Mapping[str, str], known: Iterable[str], *, strict: bool) -> list[str]:
    """Reports each ADACCEL_* variable of `environ` outside `known` (a typo, or a removed setting):
    one warning line naming it and the closest known name; `strict`: error lines, then
    UnknownSettingError. Returns the messages."""
    messages = []
    for name, closest in unknown_env(environ, frozenset(known)):
        message = describe_unknown(name, closest)
        messages.append(message)
        log.log(logging.ERROR if strict else logging.WARNING, message,
                extra={"variable": name, "closest": closest})
    if strict and messages:
        raise UnknownSettingError("ADACCEL_STRICT_ENV is on: " + "; ".join(messages))
    return messages


def run_service(
    name: str,
    settings_cls: type[ServiceSettings],
    create: Callable[[ServiceSettings, Telemetry], ServerHandle],
    argv: list[str] | None = None,
    known_settings: Iterable[type[BaseSettings]] | None = None,
) -> None:
    """`known_settings`: the other services' settings classes, whose variables this one accepts
    silently (services in one pod share an env); default: found by `sibling_settings`."""
    settings = parse_settings(settings_cls, sys.argv[1:] if argv is None else argv, f"python -m services.{name}")
    configure_logging(name, settings.log_level, settings.log_json)
    others = sibling_settings(settings_cls) if known_settings is None else known_settings
    check_environment(os.environ, env_names(settings_cls, *others), strict=settings.strict_env)
    telemetry = setup_telemetry(name, settings)
    handle = create(settings, telemetry)
    try:
        run_until_signalled(handle, settings.grace_s)
    finally:
        handle.stop(settings.grace_s)
        telemetry.shutdown()
