"""Full-frame avatars in the browser: every page shows the template's video at its own shape, whole.

Two templates are made here from the default 512x512 astronaut, its frames padded onto a 512x896
(portrait) and an 896x512 (landscape) canvas with the landmarks shifted by the padding, and saved into
the template cache the server reads. Headless Chromium then measures, from the <video>'s frame size,
its box on the page and its object-fit, where the picture is drawn and how much of it is visible (the
element, every clipping ancestor and the viewport cut it): the whole picture must show, undistorted.
On the call page the frame around the video must take its shape (no bars), stay in view with the
buttons under it, at desktop and phone sizes, before a call (from the template list) and after a
switch to a template of the other shape. The kiosk page at 1280x720 must fill the height with a
portrait avatar, centred. <avatar-call fit="video"> must give its box the video's shape, and without
``fit`` letterbox the video in the box it has.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from browser_support import (
    BROWSER_TEST_MARKS,
    NO_MODELS_ENV,
    RunningServer,
    chromium_page,
    host_server,
    make_silence_wav,
    run_server,
)

pytestmark = BROWSER_TEST_MARKS

PORTRAIT = ("portrait", 512, 896)
LANDSCAPE = ("landscape", 896, 512)
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
KIOSK = {"width": 1280, "height": 720}
# Layout rounds to device pixels; a box within this many CSS pixels of another counts as the same.
SLACK_PX = 1.5

# Where the <video>'s picture is drawn and what of it is visible. The drawn box follows the element's
# object-fit and object-position over its content box; the visible part is that box cut by the
# element's content box (a replaced element clips its picture there), by every ancestor that clips
# (overflow other than visible) and by the viewport. Also the frame around the video, when asked.
VIDEO_BOX_JS = """
([videoSelector, frameSelector]) => {
  const video = document.querySelector(videoSelector);
  if (!video || !video.videoWidth || !video.videoHeight) return null;
  const px = (value) => parseFloat(value) || 0;
  const rect = (r) => ({ left: r.left, top: r.top, right: r.right, bottom: r.bottom });
  const cut = (a, b) => ({
    left: Math.max(a.left, b.left),
    top: Math.max(a.top, b.top),
    right: Math.max(Math.max(a.left, b.left), Math.min(a.right, b.right)),
    bottom: Math.max(Math.max(a.top, b.top), Math.min(a.bottom, b.bottom)),
  });
  const style = getComputedStyle(video);
  const outer = video.getBoundingClientRect();
  const content = {
    left: outer.left + px(style.borderLeftWidth) + px(style.paddingLeft),
    top: outer.top + px(style.borderTopWidth) + px(style.paddingTop),
    right: outer.right - px(style.borderRightWidth) - px(style.paddingRight),
    bottom: outer.bottom - px(style.borderBottomWidth) - px(style.paddingBottom),
  };
  const boxW = content.right - content.left;
  const boxH = content.bottom - content.top;
  const vw = video.videoWidth;
  const vh = video.videoHeight;
  const contain = Math.min(boxW / vw, boxH / vh);
  const scale = {
    contain,
    cover: Math.max(boxW / vw, boxH / vh),
    none: 1,
    "scale-down": Math.min(1, contain),
  }[style.objectFit];
  const drawnW = style.objectFit === "fill" ? boxW : vw * scale;
  const drawnH = style.objectFit === "fill" ? boxH : vh * scale;
  // object-position as two percentages (the default is "50% 50%"); keywords come back as percentages.
  const [fx, fy] = style.objectPosition.split(" ").map((p) => (p.endsWith("%") ? px(p) / 100 : 0.5));
  const drawn = {
    left: content.left + (boxW - drawnW) * fx,
    top: content.top + (boxH - drawnH) * fy,
  };
  drawn.right = drawn.left + drawnW;
  drawn.bottom = drawn.top + drawnH;
  let visible = cut(drawn, content);
  for (let el = video.parentElement; el; el = el.parentElement) {
    const s = getComputedStyle(el);
    if (s.overflowX !== "visible" || s.overflowY !== "visible") {
      visible = cut(visible, rect(el.getBoundingClientRect()));
    }
  }
  const viewport = { left: 0, top: 0, right: innerWidth, bottom: innerHeight };
  visible = cut(visible, viewport);
  const frame = frameSelector ? document.querySelector(frameSelector) : null;
  return {
    videoWidth: vw,
    videoHeight: vh,
    objectFit: style.objectFit,
    drawn,
    visible,
    viewport,
    frame: frame ? rect(frame.getBoundingClientRect()) : null,
  };
}
"""


# ---------------------------------------------------------------- templates of two shapes


@pytest.fixture(scope="module")
def shaped_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A template cache with the default astronaut (prepared as the server would) and the portrait
    and landscape templates padded from it."""
    import numpy as np

    from avatar_rtc.avatar.library import library_from_settings
    from avatar_rtc.avatar.template import Template
    from avatar_rtc.config import Settings

    cache_dir = tmp_path_factory.mktemp("shaped_cache")
    library = library_from_settings(Settings(avatar={"cache_dir": cache_dir}))
    base = library.ensure_default()
    store = library.store
    # The default's preparation record: a template saved with it counts as prepared with the server's
    # settings, so the server takes the portrait one as its default instead of preparing it again.
    manifest = store.read_manifest(base.id)
    count, src_h, src_w = base.frames.shape[:3]
    for template_id, width, height in (PORTRAIT, LANDSCAPE):
        left, top = (width - src_w) // 2, (height - src_h) // 2
        # Grey, not black, so the padding is part of the picture and cannot pass for letterboxing.
        frames = np.full((count, height, width, 3), 96, np.uint8)
        frames[:, top : top + src_h, left : left + src_w] = base.frames
        landmarks = (base.landmarks + np.array([left, top], np.float32)).astype(np.float32)
        template = Template(
            id=template_id,
            fps=base.fps,
            frames=frames,
            landmarks=landmarks,
            source=f"{base.source} padded to {width}x{height}",
            # Only the per-frame flags carry over: the crop boxes and masks are in the square's pixels.
            extras={k: v for k, v in base.extras.items() if k == "face_found"},
        )
        store.save(
            template,
            source_sha256=f"{manifest['source_sha256']}+pad{width}x{height}",
            settings=manifest["settings"],
            info={"name": f"{template_id.capitalize()} astronaut"},
        )
    library.close()
    return cache_dir


def serve(
    work_dir: Path, cache_dir: Path, default_template: str = "default"
) -> AbstractContextManager[RunningServer]:
    """The real server without ASR or LLM (it starts in seconds), reading ``cache_dir``."""
    env = {**NO_MODELS_ENV, "AVATAR_RTC_AVATAR__DEFAULT_TEMPLATE": default_template}
    return run_server(work_dir, extra_env=env, cache_dir=cache_dir)


# ---------------------------------------------------------------- measuring


def measure(page: Any, video: str, frame: str | None = None) -> dict[str, Any]:
    box = page.evaluate(VIDEO_BOX_JS, [video, frame])
    assert box is not None, f"{video} has no picture yet"
    return box


def settle(
    page: Any, video: str, frame: str | None, ready: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    return poll(lambda: measure(page, video, frame), ready)


def size(box: dict[str, float]) -> tuple[float, float]:
    return box["right"] - box["left"], box["bottom"] - box["top"]


def near(a: float, b: float, slack: float = SLACK_PX) -> bool:
    return abs(a - b) <= slack


def assert_whole_picture(box: dict[str, Any], width: int, height: int) -> None:
    """The video is ``width`` x ``height``, drawn undistorted, and all of it is visible."""
    assert (box["videoWidth"], box["videoHeight"]) == (width, height), box
    drawn_w, drawn_h = size(box["drawn"])
    assert near(drawn_w / drawn_h, width / height, 0.01), f"the picture is distorted: {box}"
    assert all(near(box["visible"][k], box["drawn"][k]) for k in box["drawn"]), (
        f"part of the picture is cut off (drawn vs visible): {box}"
    )


def fills_frame(box: dict[str, Any]) -> bool:
    """The picture covers the frame around it: the frame has the video's shape, no bars."""
    return all(near(box["drawn"][k], box["frame"][k]) for k in ("left", "top", "right", "bottom"))


RECT_JS = """
(selector) => {
  const r = document.querySelector(selector).getBoundingClientRect();
  return { left: r.left, top: r.top, right: r.right, bottom: r.bottom, vw: innerWidth, vh: innerHeight };
}
"""


def rect_of(page: Any, selector: str) -> dict[str, float]:
    """The element's box on the page, with the viewport's size as vw and vh."""
    return dict(page.evaluate(RECT_JS, selector))


def poll(read: Callable[[], Any], ready: Callable[[Any], bool], timeout_s: float = 5.0) -> Any:
    """``read()`` once ``ready`` holds for it (layout follows a change a moment later), or its last
    value when it never does: the caller's assertions then say what is wrong."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if ready(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def assert_in_view(page: Any, selector: str) -> None:
    r = rect_of(page, selector)
    inside = r["top"] >= 0 and r["left"] >= 0 and r["bottom"] <= r["vh"] + 0.5 and r["right"] <= r["vw"] + 0.5
    assert inside, f"{selector} is not in view: {r}"


# ---------------------------------------------------------------- the tests


def test_call_page_shows_portrait_and_landscape_whole(shaped_cache: Path, tmp_path: Path) -> None:
    portrait_id, pw, ph = PORTRAIT
    landscape_id, lw, lh = LANDSCAPE
    page_errors: list[str] = []
    video, frame = "#remote-video", ".video-frame"
    with (
        serve(tmp_path / "server", shaped_cache) as server,
        chromium_page(tmp_path / "profile", make_silence_wav(tmp_path), DESKTOP, page_errors) as page,
    ):
        page.goto(f"{server.base_url}/")
        page.click(f'.template-pick[data-id="{portrait_id}"]')

        # Before the call the frame already has the chosen template's shape (from the template list).
        before = poll(lambda: size(rect_of(page, frame)), lambda wh: near(wh[0] / wh[1], pw / ph, 0.01))
        assert near(before[0] / before[1], pw / ph, 0.01), f"the frame before the call is {before}"

        page.click("#call-btn")
        page.wait_for_function(
            f"""() => {{ const v = document.querySelector("{video}");
                return v.videoWidth === {pw} && v.videoHeight === {ph} && v.currentTime > 0.5; }}""",
            timeout=30_000,
        )
        # Desktop: the portrait video as tall as the window allows, the buttons still in view.
        box = settle(page, video, frame, fills_frame)
        assert_whole_picture(box, pw, ph)
        assert fills_frame(box), f"the frame does not have the video's shape (bars around it): {box}"
        assert size(box["drawn"])[1] >= 0.5 * DESKTOP["height"], f"the portrait video is small: {box}"
        assert_in_view(page, "#hangup-btn")
        page.screenshot(path=str(tmp_path / "call_portrait_desktop.png"))

        # Phone: the same video fills the width (up to a height that leaves the buttons in view).
        page.set_viewport_size(PHONE)
        box = settle(page, video, frame, fills_frame)
        assert_whole_picture(box, pw, ph)
        assert fills_frame(box), f"the frame does not have the video's shape (bars around it): {box}"
        stage_w = page.evaluate("() => document.querySelector('.stage').getBoundingClientRect().width")
        assert size(box["drawn"])[0] >= 0.95 * stage_w, f"the video does not fill the width {stage_w}: {box}"
        assert_in_view(page, "#hangup-btn")
        page.screenshot(path=str(tmp_path / "call_portrait_phone.png"))

        # A switch to the landscape template in the call: the frame takes the new shape.
        page.set_viewport_size(DESKTOP)
        page.click(f'.template-pick[data-id="{landscape_id}"]')
        page.wait_for_function(
            f"""() => {{ const v = document.querySelector("{video}");
                return v.videoWidth === {lw} && v.videoHeight === {lh}; }}""",
            timeout=15_000,
        )
        box = settle(page, video, frame, fills_frame)
        assert_whole_picture(box, lw, lh)
        assert fills_frame(box), f"the frame kept the old shape after the switch: {box}"
        assert_in_view(page, "#hangup-btn")
        page.screenshot(path=str(tmp_path / "call_landscape_desktop.png"))
        page.click("#hangup-btn")
    assert not page_errors, f"uncaught errors in the page: {page_errors}"


def test_kiosk_fills_the_height_with_a_portrait_avatar(shaped_cache: Path, tmp_path: Path) -> None:
    portrait_id, pw, ph = PORTRAIT
    page_errors: list[str] = []
    with (
        serve(tmp_path / "server", shaped_cache, default_template=portrait_id) as server,
        chromium_page(tmp_path / "profile", make_silence_wav(tmp_path), KIOSK, page_errors) as page,
    ):
        page.goto(f"{server.base_url}/static/kiosk.html?sleep=60")
        page.wait_for_function(
            "() => { const v = document.getElementById('avatar');"
            " return v.videoWidth > 0 && v.currentTime > 0.5; }",
            timeout=30_000,
        )
        box = measure(page, "#avatar")
        assert_whole_picture(box, pw, ph)
        assert near(size(box["drawn"])[1], KIOSK["height"]), (
            f"the portrait video does not fill the height: {box}"
        )
        centre = (box["drawn"]["left"] + box["drawn"]["right"]) / 2
        assert near(centre, KIOSK["width"] / 2), f"the portrait video is not centred: {box}"
        page.screenshot(path=str(tmp_path / "kiosk_portrait.png"))
    assert not page_errors, f"uncaught errors in the page: {page_errors}"


def test_embed_element_takes_the_video_shape_or_letterboxes(shaped_cache: Path, tmp_path: Path) -> None:
    """<avatar-call fit="video" style="width: 360px"> on a page of another origin: the box becomes
    360 x 360*896/512 once the portrait video plays; without ``fit`` the 360x480 box letterboxes it."""
    portrait_id, pw, ph = PORTRAIT
    page_errors: list[str] = []
    with (
        serve(tmp_path / "server", shaped_cache, default_template=portrait_id) as server,
        host_server(
            lambda _request: (
                f'<!doctype html><html><head><script src="{server.base_url}/static/embed.js" defer>'
                '</script></head><body style="margin: 0">'
                f'<avatar-call src="{server.base_url}" fit="video" style="width: 360px"></avatar-call>'
                "</body></html>"
            )
        ) as host,
        chromium_page(tmp_path / "profile", make_silence_wav(tmp_path), KIOSK, page_errors) as page,
    ):
        page.goto(f"{host}/")

        def kiosk() -> Any:
            for frame in page.frames:
                if frame.url.startswith(f"{server.base_url}/static/kiosk.html"):
                    return frame
            return None

        playing = "() => { const v = document.getElementById('avatar'); return v.currentTime > 0.5; }"
        deadline = time.monotonic() + 30
        while (frame := kiosk()) is None or not frame.evaluate(playing):
            assert time.monotonic() < deadline, "the embedded kiosk never played"
            page.wait_for_timeout(200)

        # fit="video": the box takes the video's shape, and the picture fills it.
        shape = poll(lambda: size(rect_of(page, "avatar-call")), lambda wh: near(wh[1], 360 * ph / pw))
        assert near(shape[0], 360) and near(shape[1], 360 * ph / pw), f"the box is {shape}"
        box = settle(frame, "#avatar", None, lambda b: near(size(b["drawn"])[1], shape[1]))
        assert_whole_picture(box, pw, ph)
        assert near(size(box["drawn"])[0], 360) and near(size(box["drawn"])[1], shape[1]), box

        # Without fit: the page's width and the element's default height (360x480), the portrait picture
        # whole inside, as tall as the box, bars at the sides.
        page.evaluate("() => document.querySelector('avatar-call').removeAttribute('fit')")
        letterbox = size(rect_of(page, "avatar-call"))
        assert near(letterbox[0], 360) and near(letterbox[1], 480), f"the box is {letterbox}"
        box = settle(frame, "#avatar", None, lambda b: near(size(b["drawn"])[1], 480))
        assert_whole_picture(box, pw, ph)
        assert near(size(box["drawn"])[1], 480) and near(size(box["drawn"])[0], 480 * pw / ph), box
        centre = (box["drawn"]["left"] + box["drawn"]["right"]) / 2
        assert near(centre, 180), f"the letterboxed picture is not centred: {box}"
        page.screenshot(path=str(tmp_path / "embed_letterboxed.png"))
    assert not page_errors, f"uncaught errors in the page: {page_errors}"
