"""MuseTalk's template data prepared once and cached, nothing heavy on the event loop, and the GPU tier
(tiny models in the official layout, on CPU).

- Part 3: per-frame data (boxes, masks, latents keyed by the VAE's weights and dtype) is computed once,
  stored in the checksummed cache next to the frames, and loaded by later processes; a damaged file
  is recomputed, never half-read; a template prepared before MuseTalk runs on warp while its data is
  completed in the background, then on MuseTalk.
- Part 4: the event loop never stalls more than 50 ms while a call opens such a template next to a
  live MuseTalk call; renderer batches are awaited, not waited for in pool threads.
- Part 5: the device tier keeps to its budget, least recently used first, never evicting what a call
  shows, and /metrics reports it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from musetalk_fixtures import write_tiny_models
from musetalk_library import musetalk_library

from avatar_rtc.avatar.library import TemplateLibrary
from avatar_rtc.avatar.store import TemplateStore
from avatar_rtc.avatar.template import Template
from avatar_rtc.testing.receiver import CallReceiver

STALL_LIMIT_S = 0.050


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_models(tmp_path_factory.mktemp("musetalk_models"))


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> Iterator[Any]:
    from avatar_rtc.render.musetalk.renderer import MuseTalkEngine

    engine = MuseTalkEngine(models_dir, device="cpu", max_batch=8, max_wait_s=0.005, latency_budget_s=30.0)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def base(default_template: Template) -> Template:
    """A short idle loop of the default face: quick to VAE-encode on CPU."""
    return Template(
        "mt_base", default_template.fps, default_template.frames[:16], default_template.landmarks[:16]
    )


def _copy(template: Template, template_id: str) -> Template:
    return dataclasses.replace(template, id=template_id, frames=template.frames.copy(), extras={})


# -- part 3: prepared once, cached, loaded ---------------------------------------------------------------
def test_data_is_computed_once_stored_with_checksums_and_loaded_by_the_next_process(
    engine: Any, base: Template, tmp_path: Path
) -> None:
    library = musetalk_library(tmp_path, engine, [base], complete=False)
    assert library.needs_extras(library.get("mt_base"))
    computed = engine.tier_stats().extras_computed
    completed = library.complete_extras("mt_base")
    assert engine.has_extras(completed) and library.get_warm("mt_base") is completed
    assert engine.tier_stats().extras_computed == computed + 1
    manifest = json.loads((tmp_path / "mt_base" / "manifest.json").read_text())
    latents = manifest["files"]["extra_musetalk_latents.npy"]
    assert latents["renderer"] is True and len(latents["sha256"]) == 64
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "no work directory left"

    # The next process: a new library over the same cache loads the data instead of computing it.
    again = TemplateLibrary(TemplateStore(tmp_path), ram_budget_bytes=1 << 30, engine=engine)
    loaded = again.complete_extras("mt_base")
    assert engine.tier_stats().extras_computed == computed + 1
    np.testing.assert_array_equal(loaded.extras["musetalk_latents"], completed.extras["musetalk_latents"])
    # The same frames as the first process had: both decoded the one cached file (JPEG, so close to
    # ``base.frames`` but not bit for bit).
    np.testing.assert_array_equal(loaded.frames, completed.frames)
    assert np.abs(loaded.frames.astype(np.int16) - base.frames).mean() < 2
    renderer = engine.open(loaded)
    assert type(renderer).__name__ == "MuseTalkRenderer"
    asyncio.run(renderer.aclose())


def test_latents_are_keyed_by_the_vae_weights_and_the_dtype(models_dir: Path, tmp_path: Path) -> None:
    from avatar_rtc.render.musetalk.models import load_vae
    from avatar_rtc.render.musetalk.prepare import latents_key

    _, vae_id = load_vae(models_dir)
    other = write_tiny_models(tmp_path, seed=1)  # same architecture, same file size, other weights
    assert (other / "sd-vae/diffusion_pytorch_model.bin").stat().st_size == (
        models_dir / "sd-vae/diffusion_pytorch_model.bin"
    ).stat().st_size
    _, other_id = load_vae(other)
    assert other_id != vae_id
    assert latents_key(vae_id, "float32") != latents_key(vae_id, "float16")
    assert latents_key(vae_id, "float32") != latents_key(other_id, "float32")


@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_a_damaged_data_file_is_recomputed_never_half_read(
    engine: Any, base: Template, tmp_path: Path, damage: str
) -> None:
    library = musetalk_library(tmp_path, engine, [base])
    good = library.get("mt_base").extras["musetalk_latents"].copy()
    path = tmp_path / "mt_base" / "extra_musetalk_latents.npy"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        data[-100] ^= 0xFF  # one bit pattern in the last latents, same size
        path.write_bytes(bytes(data))
    fresh = TemplateLibrary(TemplateStore(tmp_path), ram_budget_bytes=1 << 30, engine=engine)
    loaded = fresh.get("mt_base")  # the template itself is fine: it loads, without the damaged data
    assert "musetalk_latents" not in loaded.extras and fresh.needs_extras(loaded)
    computed = engine.tier_stats().extras_computed
    repaired = fresh.complete_extras("mt_base")
    assert engine.tier_stats().extras_computed == computed + 1
    np.testing.assert_array_equal(repaired.extras["musetalk_latents"], good)
    reloaded = TemplateStore(tmp_path).load("mt_base")
    assert engine.has_extras(reloaded)


def test_a_failed_write_leaves_the_cached_template_as_it_was(
    engine: Any, base: Template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from avatar_rtc.avatar import store as store_module

    library = musetalk_library(tmp_path, engine, [base], complete=False)
    before = (tmp_path / "mt_base" / "manifest.json").read_bytes()
    real_write = store_module._write_array
    written: list[str] = []

    def dying_write(path: Path, array: np.ndarray) -> dict[str, Any]:
        written.append(path.name)
        if len(written) == 3:
            raise OSError("disk full (simulated)")
        return real_write(path, array)

    monkeypatch.setattr(store_module, "_write_array", dying_write)
    completed = library.complete_extras("mt_base")  # the call gets its data even if the cache cannot
    assert engine.has_extras(completed)
    assert (tmp_path / "mt_base" / "manifest.json").read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not engine.has_extras(TemplateStore(tmp_path).load("mt_base"))


# -- part 4: nothing heavy on the event loop -------------------------------------------------------------
async def test_the_loop_never_stalls_while_a_call_opens_an_unprepared_template_next_to_a_live_call(
    make_server: Any, engine: Any, base: Template, tmp_path: Path
) -> None:
    import gc

    import torch

    from avatar_rtc.render.musetalk.renderer import MuseTalkEngine, MuseTalkRenderer

    # Two shared cores here: torch's intra-op threads would take both from the event loop's thread, and
    # the lag measured would be the machine's, not the code's. One thread leaves the loop a core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # "other" was prepared before MuseTalk was enabled (no latents) and is not in RAM yet.
    # The server closes its engine when it stops: one of its own, sharing the loaded models.
    engine = MuseTalkEngine(models=engine.models, max_batch=8, max_wait_s=0.005, latency_budget_s=30.0)
    library = await asyncio.to_thread(musetalk_library, tmp_path, engine, [base, _copy(base, "other")])
    server = await make_server(
        renderer=engine, library=library, settings={"security": {"offers_per_minute": 0}}
    )
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    ticking = True

    busy: list[float] = []

    async def ticker() -> None:
        # Wall-clock lag per 10 ms tick, and the loop thread's own CPU time in it: on a shared machine
        # the lag includes other processes' load; the CPU time is what the loop itself was kept busy.
        while ticking:
            before, cpu = loop.time(), time.thread_time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - before - 0.01)
            busy.append(time.thread_time() - cpu)

    speaking, switching = CallReceiver(), CallReceiver()
    async with aiohttp.ClientSession() as http:
        await speaking.connect_http(server.url, http)
        await switching.connect_http(server.url, http)
    try:
        await speaking.wait_event(lambda e: e["type"] == "hello")
        await switching.wait_event(lambda e: e["type"] == "hello")
        speaking.send({"type": "say", "text": "I keep talking while the other caller picks a new face."})
        await speaking.wait_event(
            lambda e: e.get("type") == "quality" and e.get("renderer") == "musetalk", 30
        )
        # What the process holds so far (models, codecs) leaves the cyclic collector's view: a full
        # collection over it would be a stall of its own, whatever opens templates (the server can do
        # the same once started).
        gc.collect()
        gc.freeze()
        tick = asyncio.create_task(ticker())
        await asyncio.sleep(2)  # the live call alone, for comparison
        baseline = max(lags)
        lags.clear()
        busy.clear()
        tick = asyncio.create_task(ticker())
        switching.send({"type": "select_template", "id": "other"})
        switched = await switching.wait_event(lambda e: e["type"] == "template", 30)
        ready = await switching.wait_event(
            lambda e: e["type"] == "template_data" and e["state"] in ("ready", "failed"), 120
        )
        ticking = False
        await tick
    finally:
        await speaking.close()
        await switching.close()
        torch.set_num_threads(threads)
        gc.unfreeze()
    print(
        f"loop over {len(lags)} ticks: busy max {max(busy) * 1000:.1f} ms, lag max {max(lags) * 1000:.1f} ms "
        f"(the live call alone: {baseline * 1000:.1f} ms); switch {switched['switch_ms']} ms"
    )
    assert ready["state"] == "ready"
    assert max(busy) <= STALL_LIMIT_S, f"the event loop was kept busy {max(busy) * 1000:.0f} ms at a stretch"
    # The wall-clock lag also holds the machine's own noise (other processes on shared cores): held to
    # the limit (or what the live call alone showed) only when the machine is not overloaded.
    if os.getloadavg()[0] < (os.cpu_count() or 1):
        worst = max(STALL_LIMIT_S, baseline) + max(busy)
        assert max(lags) <= worst, f"the event loop lagged {max(lags) * 1000:.0f} ms"
    progress = [e for e in switching.events if e["type"] == "template_data" and e["state"] == "preparing"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == 16
    # The call ran on the light renderer meanwhile, and on MuseTalk once the data was there; the cache
    # has the data now, for every later call and process.
    session = next(iter(server.services.sessions.sessions.values()), None)
    assert session is None or isinstance(session.renderer, MuseTalkRenderer)
    assert engine.has_extras(TemplateStore(tmp_path).load("other"))


async def test_renderer_batches_hold_no_pool_thread_while_they_wait(engine: Any, base: Template) -> None:
    """With one default-executor thread, a batch waiting on the device worker must leave it free."""
    import dataclasses as dc

    ready = dc.replace(base, extras=engine.template_faces(base).template.extras)
    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="only")
    loop.set_default_executor(pool)
    release = threading.Event()
    forward = engine.worker.forward

    def held_forward(items: Any) -> Any:
        release.wait(10)
        return forward(items)

    engine.worker.forward = held_forward
    renderer = engine.open(ready)
    try:
        renderer.push_audio(np.zeros(16000, np.int16), 0.0)
        renderer.flush()
        frames = aiter(renderer.frames())
        first = asyncio.ensure_future(anext(frames))
        await asyncio.sleep(0.3)  # the batch is now waiting on the (held) worker
        assert not first.done()
        # The pool's one thread is free: a to_thread call (ASR, TTS, codecs use the pool) runs at once.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 2.0) == 42
        release.set()
        frame = await asyncio.wait_for(first, 30)
        assert frame.index == 0
    finally:
        release.set()
        engine.worker.forward = forward
        await renderer.aclose()
        pool.shutdown(wait=False)


# -- part 5: the GPU tier --------------------------------------------------------------------------------
def test_the_device_tier_keeps_to_its_budget_lru_first_never_what_a_call_shows(
    models_dir: Path, engine: Any, base: Template
) -> None:
    from avatar_rtc.render.musetalk.renderer import MuseTalkEngine

    extras = engine.template_faces(base).template.extras
    templates = {name: dataclasses.replace(base, id=name, extras=extras) for name in "abcd"}
    one = extras["musetalk_latents"].nbytes
    tiered = MuseTalkEngine(models=engine.models, vram_budget_mb=2.5 * one / 2**20)
    try:
        shown = tiered.open(templates["a"])  # a live call pins a
        tiered.warm(templates["b"])
        tiered.warm(templates["c"])  # over budget: b (least recently used, unpinned) goes, a stays
        assert tiered.tier.ids() == ["a", "c"]
        stats = tiered.tier_stats()
        assert stats.bytes <= stats.budget_bytes and stats.evictions == 1 and stats.pinned == 1
        tiered.warm(templates["a"])  # a hit: nothing loaded again
        assert tiered.tier_stats().loads == stats.loads and tiered.tier_stats().hits == stats.hits + 1
        tiered.evict("a")  # the library let a go from RAM, but a call shows it: it stays
        assert "a" in tiered.tier.ids()
        asyncio.run(shown.aclose())
        tiered.warm(templates["d"])
        assert tiered.tier.ids() == ["c", "d"] or tiered.tier.ids() == ["a", "d"]
        assert tiered.tier_stats().bytes <= tiered.tier_stats().budget_bytes
    finally:
        tiered.close()


def test_metrics_report_the_renderer_tier(engine: Any, base: Template) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from avatar_rtc.metrics import Metrics

    engine.warm(dataclasses.replace(base, extras=engine.template_faces(base).template.extras))
    metrics = Metrics()
    unwatch = metrics.watch_renderer(lambda: (engine.name, engine.tier_stats()))
    samples = {
        (s.name, s.labels.get("renderer")): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    }
    unwatch()
    stats = engine.tier_stats()
    assert samples[("avatar_renderer_tier_bytes", "musetalk")] == stats.bytes > 0
    assert samples[("avatar_renderer_tier_budget_bytes", "musetalk")] == stats.budget_bytes
    assert samples[("avatar_renderer_tier_templates", "musetalk")] == stats.templates >= 1
    assert ("avatar_renderer_tier_evictions_total", "musetalk") in samples
    assert ("avatar_renderer_tier_extras_computed_total", "musetalk") in samples


# -- leaks: 50 template switches in one MuseTalk call ------------------------------------------------------
SWITCHES = 50
# Warm-up: the RAM tier fills (about ten of these templates) and the allocator settles.
BASELINE_AFTER = 20
# RSS moves by tens of MB on its own here (allocator arenas, aiortc's frames, other work on the
# machine: +34 to +72 MB seen with the limits in place); unbounded caches grew +433 MB over the same
# switches. Medians of the last and the baseline readings, so one transient peak does not count.
RSS_SLACK_MB = 120


@pytest.mark.slow
async def test_fifty_musetalk_template_switches_keep_memory_flat(
    make_server: Any, engine: Any, base: Template, tmp_path: Path
) -> None:
    """Every switch goes to a template the call has not shown yet, so nothing bounded by id alone stays
    flat: only the RAM budget, the device tier's budget and the engine's bounded caches do."""
    import gc

    import psutil

    from avatar_rtc.render.musetalk.renderer import MuseTalkEngine

    extras = engine.template_faces(base).template.extras
    latents = extras["musetalk_latents"].nbytes
    tiered = MuseTalkEngine(models=engine.models, vram_budget_mb=3.5 * latents / 2**20)
    ids = [f"t{n:02d}" for n in range(SWITCHES + 1)]

    def build() -> TemplateLibrary:
        store = TemplateStore(tmp_path)
        for template_id in ids:  # ready templates, each its own arrays once loaded
            store.save(
                dataclasses.replace(base, id=template_id, extras=extras), renderer_extras=tiered.extras_keys
            )
        one = 2 * base.frames.nbytes
        return TemplateLibrary(store, ram_budget_bytes=6 * one, engine=tiered, default_id=ids[0])

    library = await asyncio.to_thread(build)
    server = await make_server(renderer=tiered, library=library)
    process = psutil.Process()
    receiver = CallReceiver()
    rss: list[float] = []
    tier: list[tuple[int, int]] = []
    try:
        async with aiohttp.ClientSession() as http:
            await receiver.connect_http(server.url, http)
        await receiver.wait_event(lambda e: e["type"] == "hello")
        for template_id in ids[1:]:
            seen = len(receiver.events)
            receiver.send({"type": "select_template", "id": template_id})
            event = await receiver.wait_event(lambda e: e["type"] in ("template", "error"), 30, after=seen)
            assert event == {**event, "type": "template", "id": template_id}, event
            gc.collect()
            rss.append(process.memory_info().rss / 2**20)
            stats = tiered.tier_stats()
            tier.append((stats.templates, stats.bytes))
            assert stats.bytes <= stats.budget_bytes
            assert library.ram_bytes <= library.ram_budget
    finally:
        await receiver.close()
        await server.stop()
        tiered.close()
    growth = float(np.median(rss[-5:]) - np.median(rss[BASELINE_AFTER - 5 : BASELINE_AFTER]))
    print(
        f"{SWITCHES} switches: RSS {rss[0]:.0f} -> {rss[BASELINE_AFTER - 1]:.0f} (after {BASELINE_AFTER}) -> "
        f"{rss[-1]:.0f} MB, growth after warm-up {growth:.1f} MB; tier (templates, bytes) "
        f"{tier[BASELINE_AFTER - 1]} -> {tier[-1]}; warp rigs {tiered.fallback().tier_stats().templates}"
    )
    assert max(t for t, _ in tier) <= 3 and tiered.fallback().tier_stats().templates <= 32
    assert growth < RSS_SLACK_MB
