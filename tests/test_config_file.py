"""TOML file + environment → one validated Settings tree; `avatar-rtc config` prints it."""

from __future__ import annotations

import io
import tomllib
from pathlib import Path

import pytest

from avatar_rtc.config import Settings
from avatar_rtc.config_file import MASK, ConfigError, load_settings, print_effective_settings

CONFIG = """
port = 9000
[media]
video_codec = "H264"
fps = 20
[llm]
api_key = "sk-secret"
[[ice_servers]]
urls = ["stun:stun.example.com:3478"]
[[ice_servers]]
urls = ["turn:turn.example.com:3478?transport=udp", "turns:turn.example.com:5349"]
username = "avatar"
credential = "hunter2"
"""


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no ./avatar-rtc.toml from the checkout
    for name in ("AVATAR_RTC_CONFIG", "AVATAR_RTC_PORT", "AVATAR_RTC_MEDIA__FPS"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "server.toml"
    path.write_text(CONFIG)
    return path


def test_file_values_and_nested_tables_load(config_file: Path) -> None:
    settings = load_settings(config_file)
    assert isinstance(settings, Settings)
    assert settings.port == 9000 and settings.media.fps == 20 and settings.media.video_codec == "H264"
    assert settings.media.audio_frame_ms == 20  # untouched defaults stay
    assert settings.ice_servers[1].credential == "hunter2"


def test_environment_wins_over_file_and_overrides_win_over_both(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AVATAR_RTC_MEDIA__FPS", "30")
    monkeypatch.setenv("AVATAR_RTC_PORT", "9100")
    settings = load_settings(config_file, port=9200)
    assert settings.media.fps == 30 and settings.media.video_codec == "H264"  # merged key by key
    assert settings.port == 9200


def test_file_found_through_environment_variable(config_file: Path, monkeypatch) -> None:
    monkeypatch.setenv("AVATAR_RTC_CONFIG", str(config_file))
    assert load_settings().port == 9000


def test_invalid_and_unknown_settings_name_the_problem(config_file: Path) -> None:
    config_file.write_text("[media]\nfps = 500\n")
    with pytest.raises(ConfigError, match=r"media\.fps"):
        load_settings(config_file)
    config_file.write_text("[media]\nfsp = 25\n")
    with pytest.raises(ConfigError, match=r"media\.fsp"):
        load_settings(config_file)
    config_file.write_text("port = = 1\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(config_file)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(config_file.with_name("missing.toml"))


def test_printed_settings_are_valid_toml_with_secrets_masked(config_file: Path) -> None:
    out = io.StringIO()
    print_effective_settings(load_settings(config_file), out=out)
    printed = tomllib.loads(out.getvalue())
    assert printed["port"] == 9000 and printed["media"]["video_codec"] == "H264"
    assert printed["ice_servers"][1]["credential"] == MASK and printed["llm"]["api_key"] == MASK
    assert "hunter2" not in out.getvalue() and "sk-secret" not in out.getvalue()

    shown = io.StringIO()
    print_effective_settings(load_settings(config_file), show_secrets=True, out=shown)
    # Printed with secrets, it is a config file that loads back to the same settings.
    again = config_file.with_name("again.toml")
    again.write_text(shown.getvalue())
    assert load_settings(again).model_dump() == load_settings(config_file).model_dump()
