"""Settings from a TOML file merged with the environment: one validated ``Settings`` tree.

Precedence, highest first: explicit overrides (command-line flags), ``AVATAR_RTC_...`` environment
variables, the TOML file, the defaults. Nested tables merge key by key, so a file can set
``[media] video_codec = "H264"`` while ``AVATAR_RTC_MEDIA__FPS=30`` changes only the frame rate.

The file is, in order: the path given (``--config``), ``$AVATAR_RTC_CONFIG``, ``./avatar-rtc.toml``
if it exists; with none of them, environment and defaults only. Unknown keys are errors, so a
misspelt setting fails at start instead of being ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, TomlConfigSettingsSource

from avatar_rtc.config import Settings

CONFIG_ENV_VAR = "AVATAR_RTC_CONFIG"
DEFAULT_CONFIG_FILE = Path("avatar-rtc.toml")
MASK = "********"
# Field names whose values never leave through `avatar-rtc config` unless asked for.
SECRET_KEYS = frozenset({"credential", "api_key", "api_token", "turn_secret", "password"})


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which file and which setting."""


def find_config_file(explicit: Path | None = None) -> Path | None:
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"config file {explicit} does not exist")
        return explicit
    from_env = os.environ.get(CONFIG_ENV_VAR)
    if from_env:
        path = Path(from_env)
        if not path.is_file():
            raise ConfigError(f"config file {path} (from ${CONFIG_ENV_VAR}) does not exist")
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def _settings_with_file(path: Path | None) -> type[Settings]:
    """``Settings`` with the TOML file as a source just below the environment."""

    class FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
            if path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            sources.append(file_secret_settings)
            return tuple(sources)

    FileSettings.__name__ = FileSettings.__qualname__ = "Settings"
    return FileSettings


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """The effective settings: ``overrides`` over the environment over the file over defaults."""
    path = find_config_file(config_file)
    if path is not None:
        _reject_unknown_keys(path)
    try:
        return _settings_with_file(path)(**overrides)
    except ValidationError as error:
        where = f"{path} and the environment" if path else "the environment"
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(f"invalid settings from {where}: {problems}") from None
    except ValueError as error:  # a TOML syntax error
        raise ConfigError(f"cannot read {path}: {error}") from None


def _reject_unknown_keys(path: Path) -> None:
    """Nested settings models ignore keys they do not know; in a file those are typos."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from None
    unknown = _unknown_keys(data, Settings, "")
    if unknown:
        raise ConfigError(f"unknown settings in {path}: {', '.join(unknown)}")


def _unknown_keys(data: Mapping[str, Any], model: type[BaseModel], prefix: str) -> list[str]:
    unknown: list[str] = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(f"{prefix}{key}")
            continue
        annotation = field.annotation
        item_type = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, Mapping):
            unknown += _unknown_keys(value, annotation, f"{prefix}{key}.")
        elif isinstance(item_type, type) and issubclass(item_type, BaseModel) and isinstance(value, list):
            for n, item in enumerate(value):
                if isinstance(item, Mapping):
                    unknown += _unknown_keys(item, item_type, f"{prefix}{key}[{n}].")
    return unknown


def effective_settings_dict(settings: Settings, show_secrets: bool = False) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value() if show_secrets else MASK
        return str(value)  # paths

    data = json.loads(json.dumps(settings.model_dump(), default=plain))
    if not show_secrets:
        data = _masked(data)
    return data


def _masked(value: Any, key: str = "") -> Any:
    if isinstance(value, Mapping):
        return {k: _masked(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, key) for v in value]
    if key in SECRET_KEYS and value not in (None, ""):
        return MASK
    return value


def print_effective_settings(
    settings: Settings, fmt: str = "toml", show_secrets: bool = False, out: TextIO | None = None
) -> None:
    """Print the settings the server would run with, secrets masked: as TOML (a valid config file
    to start from) or JSON."""
    out = out or sys.stdout
    data = effective_settings_dict(settings, show_secrets)
    if fmt == "json":
        out.write(json.dumps(data, indent=2) + "\n")
    else:
        out.write(to_toml(data))


# -- a TOML writer for what model_dump(mode="json") produces: tables, arrays of tables, scalars -------
def to_toml(data: Mapping[str, Any]) -> str:
    lines: list[str] = []
    _write_table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _write_table(data: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    # Comments say why None is missing: TOML has no null, so an unset optional value is left out.
    scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping) and not _is_table_array(v)}
    for key, value in scalars.items():
        if value is None:
            lines.append(f"# {_key(key)} is not set")
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in data.items():
        if isinstance(value, Mapping):
            lines.append("")
            lines.append(f"[{'.'.join(_key(p) for p in [*path, key])}]")
            _write_table(value, [*path, key], lines)
        elif _is_table_array(value):
            for item in value:
                lines.append("")
                lines.append(f"[[{'.'.join(_key(p) for p in [*path, key])}]]")
                _write_table(item, [*path, key], lines)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value if v is not None) + "]"
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(str(value), ensure_ascii=False)


# -- `avatar-rtc config` ------------------------------------------------------------------------------
def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("toml", "json"), default="toml", help="output format")
    parser.add_argument("--show-secrets", action="store_true", help="print tokens and passwords too")


def config_command(args: argparse.Namespace) -> int:
    """Print the effective settings; exit 2 with the reason when they are invalid."""
    try:
        settings = load_settings(getattr(args, "config", None))
    except ConfigError as error:
        print(f"avatar-rtc: {error}", file=sys.stderr)
        return 2
    print_effective_settings(settings, args.format, args.show_secrets)
    return 0
