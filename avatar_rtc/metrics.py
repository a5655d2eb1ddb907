"""Prometheus metrics and structured logs, for every room that measures or logs (the web exposure,
``GET /metrics`` and the access log, is server.observability).

Per-session frame counters are read from each session's ``PlayoutStats`` when Prometheus scrapes,
so the media loop pays nothing for them. Stage latencies and renderer batch sizes are observed by
the stage that measures them (one histogram call). Logs can be JSON lines that carry the session id
of whatever task wrote them: the id lives in a context variable that tasks inherit when created.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

# The turn stages Turn.metrics() reports, each in ms since the turn's origin (end of the caller's
# speech for a voice turn, the request for typed text).
TURN_STAGES = ("vad_end", "asr", "llm_first_token", "tts_first_audio", "first_audio_frame")
LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# Every counter and histogram would otherwise export a *_created timestamp series as well.
disable_created_metrics()


class PlayoutStatsLike(Protocol):
    frames_sent: int
    frames_rendered: int
    frames_idle: int
    frames_late: int
    frames_dropped: int
    audio_frames_sent: int
    video_send_lateness: Iterable[float]


class SessionLike(Protocol):
    """What the metrics read from a live session (rtc.session.Session has all of it)."""

    id: str

    @property
    def state(self) -> str: ...

    @property
    def playout(self) -> Any: ...  # .stats: PlayoutStatsLike


SessionSource = Callable[[], Iterable[SessionLike]]

# (metric suffix, PlayoutStats attribute, help). "late" and "repeated" are the same frames: a speech
# frame not rendered by its send time is replaced by a repeat of the one before.
_SESSION_FRAME_COUNTERS = (
    ("frames_sent", "frames_sent", "Video frames handed to the sender"),
    ("frames_rendered", "frames_rendered", "Sent frames the renderer made in time"),
    ("frames_idle", "frames_idle", "Sent frames from the idle loop (not speaking)"),
    ("frames_late", "frames_late", "Speech frames not rendered by their send time"),
    ("frames_repeated", "frames_late", "Speech frames sent as a repeat of the previous frame"),
    ("frames_dropped", "frames_dropped", "Frames skipped because the sender fell a frame behind"),
    ("audio_frames_sent", "audio_frames_sent", "Audio frames handed to the sender"),
)


class _SessionsCollector:
    """Reads live sessions at scrape time. Several apps in one process (tests) each add a source.

    By default the frame counters are summed over live sessions: a session id names a live call, and
    /metrics may be readable by more people than the calls are. ``session_ids`` labels them per
    session instead (``observability.session_metrics``)."""

    def __init__(self) -> None:
        self.sources: list[SessionSource] = []
        self.session_ids = False

    def collect(self) -> Iterator[Metric]:
        sessions = [s for source in list(self.sources) for s in source()]
        count = GaugeMetricFamily("avatar_sessions", "Live sessions by conversation state", labels=["state"])
        by_state: dict[str, int] = {}
        for session in sessions:
            by_state[session.state] = by_state.get(session.state, 0) + 1
        for state in ("idle", "listening", "thinking", "speaking"):
            by_state.setdefault(state, 0)
        for state, n in sorted(by_state.items()):
            count.add_metric([state], n)
        yield count
        labels = ["session_id"] if self.session_ids else []
        families = {
            name: _counter_family(f"avatar_session_{name}", help_text, labels)
            for name, _, help_text in _SESSION_FRAME_COUNTERS
        }
        lateness = GaugeMetricFamily(
            "avatar_session_send_lateness_p99_seconds",
            "99th percentile of video send lateness over the last ~2 minutes",
            labels=labels,
        )
        if self.session_ids:
            for session in sessions:
                stats = session.playout.stats
                for name, attribute, _ in _SESSION_FRAME_COUNTERS:
                    families[name].add_metric([session.id], getattr(stats, attribute))
                recent = sorted(stats.video_send_lateness)
                if recent:
                    lateness.add_metric([session.id], _p99(recent))
        else:
            for name, attribute, _ in _SESSION_FRAME_COUNTERS:
                families[name].add_metric([], sum(getattr(s.playout.stats, attribute) for s in sessions))
            recent = sorted(x for s in sessions for x in s.playout.stats.video_send_lateness)
            if recent:
                lateness.add_metric([], _p99(recent))
        yield from families.values()
        yield lateness


def _p99(ordered: list[float]) -> float:
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _counter_family(name: str, help_text: str, labels: list[str]) -> Metric:
    return CounterMetricFamily(name, help_text, labels=labels)


class TierStatsLike(Protocol):
    """What the metrics read from a renderer engine's template tier (render.base.TierStats)."""

    bytes: int
    budget_bytes: int
    templates: int
    pinned: int
    loads: int
    hits: int
    evictions: int
    extras_computed: int


TierSource = Callable[[], tuple[str, TierStatsLike]]  # (engine name, its stats now)

# (metric suffix, TierStats attribute, help, kind)
_TIER_SERIES = (
    ("bytes", "bytes", "Device memory held by templates' renderer data (CPU: the tensors' size)", "gauge"),
    ("budget_bytes", "budget_bytes", "The renderer's device memory budget for templates", "gauge"),
    ("templates", "templates", "Templates in the renderer's tier", "gauge"),
    ("pinned", "pinned", "Templates pinned in the tier by live calls", "gauge"),
    ("loads", "loads", "Templates brought into the renderer's tier", "counter"),
    ("hits", "hits", "Opens and warms that found the template in the tier", "counter"),
    ("evictions", "evictions", "Templates evicted from the renderer's tier", "counter"),
    ("extras_computed", "extras_computed", "Templates whose renderer data this process computed", "counter"),
)


class _RendererTierCollector:
    """The renderer engine's template tier (the GPU tier), read at scrape time."""

    def __init__(self) -> None:
        self.sources: list[TierSource] = []

    def collect(self) -> Iterator[Metric]:
        readings = [source() for source in list(self.sources)]
        for suffix, attribute, help_text, kind in _TIER_SERIES:
            name = f"avatar_renderer_tier_{suffix}"
            family: Metric = (
                GaugeMetricFamily(name, help_text, labels=["renderer"])
                if kind == "gauge"
                else CounterMetricFamily(name, help_text, labels=["renderer"])
            )
            for renderer, stats in readings:
                family.add_metric([renderer], getattr(stats, attribute))  # type: ignore[attr-defined]
            yield family


class _GpuCollector:
    """GPU memory per device, when torch is already loaded (importing it here would cost seconds)."""

    def collect(self) -> Iterator[Metric]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        allocated = GaugeMetricFamily(
            "avatar_gpu_memory_allocated_bytes", "GPU memory held by tensors", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            "avatar_gpu_memory_reserved_bytes",
            "GPU memory reserved by the caching allocator",
            labels=["device"],
        )
        for index in range(torch.cuda.device_count()):
            allocated.add_metric([str(index)], torch.cuda.memory_allocated(index))
            reserved.add_metric([str(index)], torch.cuda.memory_reserved(index))
        yield allocated
        yield reserved


class Metrics:
    """One registry with everything the server exports. The process uses ``METRICS``; tests make
    their own so counts start from zero."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # RSS, CPU seconds, open fds from /proc (Linux; on other systems it exports nothing).
        ProcessCollector(registry=self.registry)
        self.sessions = _SessionsCollector()
        self.registry.register(self.sessions)
        self.registry.register(_GpuCollector())
        self.renderer_tiers = _RendererTierCollector()
        self.registry.register(self.renderer_tiers)
        self.turn_stage_seconds = Histogram(
            "avatar_turn_stage_seconds",
            "Time from a turn's origin to each stage, by stage and turn kind",
            ["stage", "turn"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.turns = Counter(
            "avatar_turns",
            "Turns finished, by kind and whether interrupted",
            ["turn", "interrupted"],
            registry=self.registry,
        )
        self.errors = Counter("avatar_session_errors", "Error events sent to callers", registry=self.registry)
        self.renderer_batch_size = Histogram(
            "avatar_renderer_batch_size",
            "Frames per renderer batch",
            ["renderer"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.renderer_batch_seconds = Histogram(
            "avatar_renderer_batch_seconds",
            "Wall time of one renderer batch",
            ["renderer"],
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
            registry=self.registry,
        )
        self.sessions_closed = Counter(
            "avatar_sessions_closed", "Sessions that have ended", registry=self.registry
        )
        self.sessions_reaped = Counter(
            "avatar_sessions_reaped",
            "Sessions the server closed because the caller never connected or went silent, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.closed_frames = Counter(
            "avatar_closed_session_frames",
            "Frame counts of sessions that have ended, by kind (live sessions are under avatar_session_*)",
            ["kind"],
            registry=self.registry,
        )

    def watch_sessions(self, source: SessionSource) -> Callable[[], None]:
        """Export the sessions ``source`` returns; call the result to stop."""
        self.sessions.sources.append(source)

        def unwatch() -> None:
            if source in self.sessions.sources:
                self.sessions.sources.remove(source)

        return unwatch

    def watch_renderer(self, source: TierSource) -> Callable[[], None]:
        """Export the template tier of the renderer engine ``source`` reads; call the result to stop."""
        self.renderer_tiers.sources.append(source)

        def unwatch() -> None:
            if source in self.renderer_tiers.sources:
                self.renderer_tiers.sources.remove(source)

        return unwatch

    def observe_turn(self, event: dict[str, Any]) -> None:
        """A ``metrics`` event as Turn.metrics() makes it."""
        turn = str(event.get("turn") or "unknown")
        for stage in TURN_STAGES:
            ms = event.get(f"{stage}_ms")
            if isinstance(ms, int | float) and ms >= 0:
                self.turn_stage_seconds.labels(stage, turn).observe(ms / 1000)
        self.turns.labels(turn, "true" if event.get("interrupted") else "false").inc()

    def observe_event(self, event: dict[str, Any]) -> None:
        """Every event a session sends its caller; picks out the ones that are measurements."""
        kind = event.get("type")
        if kind == "metrics":
            self.observe_turn(event)
        elif kind == "error":
            self.errors.inc()

    def observe_renderer_batch(self, size: int, seconds: float | None = None, renderer: str = "") -> None:
        self.renderer_batch_size.labels(renderer).observe(size)
        if seconds is not None:
            self.renderer_batch_seconds.labels(renderer).observe(seconds)

    def session_closed(self, stats: PlayoutStatsLike) -> None:
        """Keep an ended session's frames in the totals after its per-session series disappear."""
        self.sessions_closed.inc()
        for name, attribute, _ in _SESSION_FRAME_COUNTERS:
            if name != "frames_repeated":
                self.closed_frames.labels(name.removeprefix("frames_")).inc(getattr(stats, attribute))

    def session_reaped(self, reason: str) -> None:
        self.sessions_reaped.labels(reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


METRICS = Metrics()

# Module-level shortcuts for the product code: one import, one call at each place that measures.
observe_turn = METRICS.observe_turn
observe_event = METRICS.observe_event
observe_renderer_batch = METRICS.observe_renderer_batch
session_closed = METRICS.session_closed
session_reaped = METRICS.session_reaped


# -- structured logs --------------------------------------------------------------------------------
SESSION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("avatar_session_id", default=None)


def bind_session(session_id: str) -> contextvars.Token[str | None]:
    """Tag the current task's logs, and those of every task it creates from now on, with
    ``session_id``. Call it before the session starts its tasks and its peer connection's."""
    return SESSION_ID.set(session_id)


class SessionIdFilter(logging.Filter):
    """Puts ``record.session_id`` on every record (None outside a session) so any formatter can
    use it; attach it to handlers, which is where it sees records from every logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "session_id"):
            record.session_id = SESSION_ID.get()
        return True


_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "session_id"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, session_id, exception, and any
    ``extra=`` fields given to the log call."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "session_id": getattr(record, "session_id", None),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(session_id)s]: %(message)s"


def configure_logging(json_logs: bool = False, level: str | int = "INFO", stream: Any = None) -> None:
    """Replace the root logger's handlers with one that writes text or JSON lines, with session ids."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(SessionIdFilter())
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
