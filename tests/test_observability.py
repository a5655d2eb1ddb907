"""Prometheus metrics and structured logs with session ids."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from avatar_rtc.media.playout import PlayoutStats
from avatar_rtc.metrics import METRICS, Metrics, bind_session, configure_logging
from avatar_rtc.server.observability import setup_metrics
from avatar_rtc.testing.receiver import CallReceiver


@dataclass
class _Playout:
    stats: PlayoutStats = field(default_factory=PlayoutStats)


@dataclass
class _Session:
    id: str
    state: str = "idle"
    playout: _Playout = field(default_factory=_Playout)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_sessions_frames_and_stage_latencies_are_exported() -> None:
    metrics = Metrics()
    metrics.sessions.session_ids = True  # observability.session_metrics
    a, b = _Session("aaa", "speaking"), _Session("bbb")
    a.playout.stats.frames_sent, a.playout.stats.frames_late, a.playout.stats.frames_dropped = 250, 3, 1
    a.playout.stats.video_send_lateness.extend([0.001] * 99 + [0.030])
    live = [a, b]
    unwatch = metrics.watch_sessions(lambda: live)
    metrics.observe_event(
        {"type": "metrics", "turn": "voice", "vad_end_ms": 420.0, "asr_ms": 610.0, "llm_first_token_ms": None,
         "tts_first_audio_ms": 900.0, "first_audio_frame_ms": 1010.0, "interrupted": False}
    )  # fmt: skip
    metrics.observe_event({"type": "error", "message": "tts failed"})
    metrics.observe_renderer_batch(8, 0.03, renderer="musetalk")
    samples = _samples(metrics.exposition().decode())

    assert samples[("avatar_sessions", (("state", "speaking"),))] == 1
    assert samples[("avatar_sessions", (("state", "idle"),))] == 1
    assert samples[("avatar_session_frames_sent_total", (("session_id", "aaa"),))] == 250
    assert samples[("avatar_session_frames_repeated_total", (("session_id", "aaa"),))] == 3
    assert samples[("avatar_session_frames_dropped_total", (("session_id", "aaa"),))] == 1
    assert samples[("avatar_session_send_lateness_p99_seconds", (("session_id", "aaa"),))] == 0.030
    stage = (("stage", "first_audio_frame"), ("turn", "voice"))
    assert samples[("avatar_turn_stage_seconds_count", stage)] == 1
    assert samples[("avatar_turn_stage_seconds_sum", stage)] == 1.01
    assert (
        "avatar_turn_stage_seconds_count",
        (("stage", "llm_first_token"), ("turn", "voice")),
    ) not in samples
    assert samples[("avatar_session_errors_total", ())] == 1
    assert samples[("avatar_renderer_batch_size_bucket", (("le", "8.0"), ("renderer", "musetalk")))] == 1
    assert samples[("process_resident_memory_bytes", ())] > 10_000_000

    metrics.session_closed(a.playout.stats)
    live.remove(a)
    unwatch()
    samples = _samples(metrics.exposition().decode())
    assert ("avatar_session_frames_sent_total", (("session_id", "aaa"),)) not in samples
    assert samples[("avatar_closed_session_frames_total", (("kind", "sent"),))] == 250
    assert samples[("avatar_sessions_closed_total", ())] == 1


def test_session_counters_are_summed_without_session_ids() -> None:
    metrics = Metrics()
    a, b = _Session("aaa"), _Session("bbb")
    a.playout.stats.frames_sent, b.playout.stats.frames_sent = 250, 50
    a.playout.stats.video_send_lateness.extend([0.001] * 50)
    b.playout.stats.video_send_lateness.extend([0.002] * 49 + [0.040])
    metrics.watch_sessions(lambda: [a, b])
    samples = _samples(metrics.exposition().decode())
    assert samples[("avatar_session_frames_sent_total", ())] == 300
    assert samples[("avatar_session_send_lateness_p99_seconds", ())] == 0.040
    assert not any("aaa" in str(labels) or "bbb" in str(labels) for _, labels in samples)


async def test_metrics_endpoint_serves_prometheus_text() -> None:
    metrics = Metrics()
    app = web.Application()
    setup_metrics(app, lambda: [_Session("zzz")], metrics, session_ids=True)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{runner.addresses[0][1]}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain; version=")
                text = await resp.text()
        assert 'avatar_session_frames_sent_total{session_id="zzz"} 0.0' in text
    finally:
        await runner.cleanup()
    assert metrics.sessions.sources == []  # the app's cleanup stopped watching


async def test_json_logs_carry_the_session_id_into_tasks() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    configure_logging(json_logs=True, level="INFO", stream=stream)
    log = logging.getLogger("avatar_rtc.test")
    try:
        log.info("before any session")

        async def session_work(session_id: str) -> None:
            bind_session(session_id)

            async def child() -> None:  # created after binding: inherits the id
                await asyncio.sleep(0)
                log.warning("from a child task", extra={"turn_id": "t1"})

            await asyncio.ensure_future(child())

        await asyncio.gather(
            asyncio.ensure_future(session_work("s-one")), asyncio.ensure_future(session_work("s-two"))
        )
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["session_id"] is None and lines[0]["message"] == "before any session"
    children = [line for line in lines if line["message"] == "from a child task"]
    assert sorted(c["session_id"] for c in children) == ["s-one", "s-two"]
    assert all(c["turn_id"] == "t1" and c["level"] == "WARNING" for c in children)
    assert "ValueError: boom" in lines[-1]["exception"]


# -- needs the wiring: create_app calls setup_metrics, Session.send_event calls observe_event -------
async def test_real_server_metrics_after_a_turn(server) -> None:
    before = _samples(METRICS.exposition().decode())
    async with aiohttp.ClientSession() as http:
        receiver = CallReceiver()
        await receiver.connect_http(server.url, http)
        receiver.send({"type": "say", "text": "Counting frames."})
        await receiver.wait_event(lambda e: e.get("type") == "metrics", 20)
        async with http.get(f"{server.url}/metrics") as resp:
            assert resp.status == 200
            samples = _samples(await resp.text())
        await receiver.close()
    # Summed over live calls: /metrics names no session unless observability.session_metrics.
    assert not any(labels and labels[0][0] == "session_id" for _, labels in samples)
    sent = samples[("avatar_session_frames_sent_total", ())]
    assert sent > 10
    key = ("avatar_turn_stage_seconds_count", (("stage", "first_audio_frame"), ("turn", "say")))
    assert samples[key] == before.get(key, 0) + 1
