"""End to end: the avatar picker on the call page, with the real server and headless Chromium.

One test adds a second avatar through the page's own upload form (a photo made here: the default
astronaut mirrored and tinted blue), switches to it in a live call by clicking its thumbnail, and checks
what the browser received: the server's ``template`` event with its switch time, and the picture in the
<video> turning blue. It then covers the rest of the picker: deleting the avatar a call shows is refused
("in use"), a choice made before a call is applied as soon as the call opens, and delete works after.

Another uploads a real-sized video (several MB, far past the 256 KiB limit of JSON requests) through
the same form, to a server that wants a token which the page got from its URL fragment, and uses the
new avatar in a call; its thumbnails come through blob: URLs, since an <img> cannot send the token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_support import (
    BROWSER_TEST_MARKS,
    NO_MODELS_ENV,
    RunningServer,
    chromium_page,
    make_silence_wav,
    run_server,
)

pytestmark = BROWSER_TEST_MARKS

TEMPLATE_ID = "blue"
TEMPLATE_NAME = "Blue astronaut"
VIDEO_SIZE = 512
# The tinted photo's blue-minus-red is far above the default astronaut's; the switch must move the
# received picture's by at least this much.
MIN_BLUE_RISE = 30.0

# How blue the <video>'s current picture is: mean blue minus mean red over a 64x64 sample.
VIDEO_BLUE_JS = """
() => {
  const video = document.getElementById("remote-video");
  if (!video.videoWidth) return null;
  const canvas = document.createElement("canvas");
  canvas.width = 64;
  canvas.height = 64;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(video, 0, 0, 64, 64);
  const data = ctx.getImageData(0, 0, 64, 64).data;
  let red = 0;
  let blue = 0;
  for (let i = 0; i < data.length; i += 4) {
    red += data[i];
    blue += data[i + 2];
  }
  return (blue - red) / (data.length / 4);
}
"""


def video_playing_js(width: int = VIDEO_SIZE) -> str:
    """The page's video plays, ``width`` px wide (a template's own width: the default is 512 square)."""
    return f"""() => {{
  const v = document.getElementById("remote-video");
  return v.videoWidth === {width} && !v.paused && v.currentTime > 1.0;
}}"""


VIDEO_PLAYING_JS = video_playing_js()


# The big upload: a short, noisy, nearly lossless video of the default face, several MB on disk.
BIG_TEMPLATE_ID = "big-video"
BIG_TEMPLATE_NAME = "Big video"
BIG_VIDEO_MIN_BYTES = 3 * 1024 * 1024
# Distinctive, so that finding it in the server's log means it was sent there.
PAGE_TOKEN = "templates-token-91f3c6d0"


def make_big_face_video(path: Path, seconds: float = 3.0, fps: int = 25) -> Path:
    """The default astronaut drifting slightly on a 640x480 canvas, with fresh noise in every frame,
    encoded as H.264 at CRF 18: a few seconds (quick to prepare) that still weigh several MB."""
    import av
    import cv2
    import numpy as np

    from avatar_rtc.avatar.photo import default_photo

    photo = default_photo()
    rng = np.random.default_rng(7)
    width, height = 640, 480
    frames = round(seconds * fps)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "18"}
        for i in range(frames):
            phase = 2 * np.pi * i / frames
            scale = 0.8 + 0.03 * np.sin(phase)
            tx = (width - 512 * scale) / 2 + 10 * np.sin(phase)
            ty = (height - 512 * scale) / 2 + 5 * np.cos(phase)
            matrix = np.array([[scale, 0.0, tx], [0.0, scale, ty]])
            image = cv2.warpAffine(photo, matrix, (width, height), borderValue=(90, 110, 120))
            noisy = np.clip(image + rng.normal(0.0, 8.0, image.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(noisy, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def make_blue_photo(path: Path) -> Path:
    """The default astronaut, mirrored and tinted blue, saved as a JPEG."""
    import cv2
    import numpy as np

    from avatar_rtc.avatar.photo import default_photo

    photo = cv2.flip(default_photo(), 1)
    photo[..., 0] = np.clip(photo[..., 0].astype(np.int16) + 90, 0, 255).astype(np.uint8)
    if not cv2.imwrite(str(path), photo, [cv2.IMWRITE_JPEG_QUALITY, 92]):
        raise RuntimeError(f"could not write {path}")
    return path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with run_server(tmp_path / "server") as running:
        yield running


def _blue(page: Any, samples: int = 5) -> float:
    """The median of a few samples of the video's blueness, 40 ms apart."""
    values = []
    for _ in range(samples):
        value = page.evaluate(VIDEO_BLUE_JS)
        assert value is not None, "the video has no picture"
        values.append(float(value))
        page.wait_for_timeout(40)
    return sorted(values)[len(values) // 2]


def _wait_blue(page: Any, above: float, timeout_s: float = 5.0) -> float:
    deadline = time.monotonic() + timeout_s
    value = _blue(page, 1)
    while value <= above and time.monotonic() < deadline:
        page.wait_for_timeout(50)
        value = _blue(page, 1)
    return value


def _template_events(page: Any) -> list[dict[str, Any]]:
    return page.evaluate("window.avatarCall.events.filter((e) => e.type === 'template')")


def _listed(page: Any) -> dict[str, dict[str, Any]]:
    return {t["id"]: t for t in page.evaluate("window.avatarCall.templates")}


def test_upload_pick_and_switch_avatar(server: RunningServer, tmp_path: Path) -> None:

    started = time.monotonic()
    photo = make_blue_photo(tmp_path / "blue-astronaut.jpg")
    wav = make_silence_wav(tmp_path)
    page_errors: list[str] = []
    shots = {"desktop": tmp_path / "templates_desktop.png", "phone": tmp_path / "templates_phone.png"}

    viewport = {"width": 1280, "height": 900}
    with chromium_page(tmp_path / "chromium-profile", wav, viewport, page_errors) as page:
        page.goto(f"{server.base_url}/")

        # The list comes from GET /api/templates; before any call the default is highlighted.
        page.wait_for_selector('.template-pick[data-id="default"]')
        assert page.get_attribute('.template-pick[data-id="default"]', "aria-pressed") == "true"
        assert page.query_selector('.template-delete[data-id="default"]') is None

        # Add the blue avatar through the form: a bad id is refused on the page first.
        page.click("#add-avatar summary")
        page.set_input_files("#upload-file", str(photo))
        assert page.input_value("#upload-id") == "blue-astronaut", "the id is not filled from the file"
        page.fill("#upload-id", "-bad id")
        page.click("#upload-btn")
        assert "Id:" in (page.text_content("#upload-error") or "")
        # A file that is no picture is refused by the server (4xx): its reason is shown.
        not_media = tmp_path / "notes.txt"
        not_media.write_text("not a photo\n")
        page.set_input_files("#upload-file", str(not_media))
        page.fill("#upload-id", "notes")
        page.click("#upload-btn")
        page.wait_for_function(
            "() => /HTTP 4\\d\\d/.test(document.getElementById('upload-error').textContent)"
        )
        assert "not a video or photo" in (page.text_content("#upload-error") or "")
        assert "notes" not in _listed(page)
        page.set_input_files("#upload-file", str(photo))
        page.fill("#upload-id", TEMPLATE_ID)
        page.fill("#upload-name", TEMPLATE_NAME)
        page.click("#upload-btn")
        page.wait_for_function(
            "(id) => window.avatarCall.templates.some((t) => t.id === id && t.state !== 'preparing')",
            arg=TEMPLATE_ID,
            timeout=60_000,
        )
        assert page.is_hidden("#upload-error"), page.text_content("#upload-error")
        assert (page.text_content("#upload-stage") or "").startswith(f"Added {TEMPLATE_NAME}")
        uploads = page.evaluate("window.avatarCall.uploads")
        assert [u["status"] for u in uploads] == [415, 200], uploads
        upload = uploads[-1]
        lines = upload["progress"]
        assert lines and all({"stage", "done", "total"} <= set(line) for line in lines), upload
        assert upload["result"]["state"] == "ready", upload
        listed = _listed(page)[TEMPLATE_ID]
        assert listed["name"] == TEMPLATE_NAME and listed["state"] in ("ready", "warm"), listed
        assert page.get_attribute(f'.template-pick[data-id="{TEMPLATE_ID}"] img', "src")
        uploaded_s = time.monotonic() - started

        # Call on the default avatar; the picture is the yardstick for the switch.
        page.click("#call-btn")
        page.wait_for_function(VIDEO_PLAYING_JS, timeout=20_000)
        page.wait_for_function("() => window.avatarCall.hello !== null")
        before = _blue(page)

        page.click(f'.template-pick[data-id="{TEMPLATE_ID}"]')
        page.wait_for_function(
            "() => window.avatarCall.events.some((e) => e.type === 'template')", timeout=5_000
        )
        event = _template_events(page)[-1]
        assert event["id"] == TEMPLATE_ID, event
        assert isinstance(event["switch_ms"], int | float) and 0 <= event["switch_ms"] < 1000, event
        assert page.evaluate("window.avatarCall.currentTemplate") == TEMPLATE_ID
        status = page.text_content("#template-status") or ""
        assert status.startswith("switched in ") and status.endswith(" ms"), status
        assert abs(float(status.split()[2]) - event["switch_ms"]) <= 0.5, (status, event)
        assert page.get_attribute(f'.template-pick[data-id="{TEMPLATE_ID}"]', "aria-pressed") == "true"
        assert page.get_attribute('.template-pick[data-id="default"]', "aria-pressed") == "false"
        after = _wait_blue(page, before + MIN_BLUE_RISE)
        assert after > before + MIN_BLUE_RISE, f"the picture did not turn blue: {before=:.1f} {after=:.1f}"
        page.screenshot(path=str(shots["desktop"]), full_page=True)

        # The avatar this call shows cannot be deleted: two taps, then the 409 is shown as "in use".
        page.click(f'.template-delete[data-id="{TEMPLATE_ID}"]')
        page.click(f'.template-delete[data-id="{TEMPLATE_ID}"]')
        page.wait_for_selector("#template-error:not([hidden])")
        assert "in use" in (page.text_content("#template-error") or "")
        assert TEMPLATE_ID in _listed(page)

        # Chosen before a call, the avatar is asked for as soon as the data channel opens.
        page.click("#hangup-btn")
        assert page.evaluate("window.avatarCall.currentTemplate") == TEMPLATE_ID
        page.click("#call-btn")
        page.wait_for_function(
            "() => window.avatarCall.events.filter((e) => e.type === 'template').length >= 2",
            timeout=20_000,
        )
        second = _template_events(page)[-1]
        assert second["id"] == TEMPLATE_ID and second["switch_ms"] < 1000, second
        page.wait_for_function(VIDEO_PLAYING_JS, timeout=20_000)
        remembered = _wait_blue(page, before + MIN_BLUE_RISE)
        assert remembered > before + MIN_BLUE_RISE, f"remembered avatar not shown: {remembered=:.1f}"
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(300)
        page.screenshot(path=str(shots["phone"]), full_page=True)
        page.set_viewport_size({"width": 1280, "height": 900})
        page.click("#hangup-btn")

        # Out of the call it can go; the choice falls back to the default.
        page.click(f'.template-delete[data-id="{TEMPLATE_ID}"]')
        page.click(f'.template-delete[data-id="{TEMPLATE_ID}"]')
        page.wait_for_function(
            "(id) => !window.avatarCall.templates.some((t) => t.id === id)", arg=TEMPLATE_ID
        )
        assert page.evaluate("window.avatarCall.currentTemplate") == "default"
        assert page.is_hidden("#template-error"), page.text_content("#template-error")

        errors = page.evaluate("window.avatarCall.events.filter((e) => e.type === 'error')")
        assert not errors, f"server sent errors: {errors}"

    assert not page_errors, f"uncaught errors in the page: {page_errors}"
    total_s = time.monotonic() - started
    print(
        f"\nupload listed after {uploaded_s:.1f} s; switch {event['switch_ms']} ms, blue {before:.1f} -> "
        f"{after:.1f}; remembered switch {second['switch_ms']} ms; total {total_s:.1f} s; "
        f"screenshots {shots['desktop']} {shots['phone']}"
    )
    assert total_s < 90, f"the test took {total_s:.0f} s"


# Every thumbnail in the picker: its src and whether the picture decoded.
THUMBNAILS_JS = """
() => [...document.querySelectorAll(".template-pick")].map((pick) => {
  const img = pick.querySelector("img");
  return { id: pick.dataset.id, src: img.getAttribute("src") || "", width: img.naturalWidth };
})
"""


def test_upload_a_real_sized_video_with_a_token_from_the_fragment(tmp_path: Path) -> None:
    started = time.monotonic()
    video = make_big_face_video(tmp_path / "big-video.mp4")
    size = video.stat().st_size
    assert size > BIG_VIDEO_MIN_BYTES, f"the test video is only {size} bytes"
    wav = make_silence_wav(tmp_path)
    page_errors: list[str] = []
    env = {**NO_MODELS_ENV, "AVATAR_RTC_SECURITY__API_TOKEN": PAGE_TOKEN}
    viewport = {"width": 1280, "height": 900}
    with (
        run_server(tmp_path / "server", extra_env=env) as server,
        chromium_page(tmp_path / "chromium-profile", wav, viewport, page_errors) as page,
    ):
        base = server.base_url

        # The page asks for a token only when it has none that works.
        def no_prompt(dialog: Any) -> None:
            page_errors.append(f"unexpected prompt: {dialog.message}")
            dialog.dismiss()

        page.on("dialog", no_prompt)

        # A legacy ?token= still works, and leaves the address bar at once (other parameters stay).
        page.goto(f"{base}/?token={PAGE_TOKEN}&lang=en")
        page.wait_for_selector('.template-pick[data-id="default"]')
        assert page.evaluate("() => location.href") == f"{base}/?lang=en"

        # The token from the fragment: the list (which needs it) loads without a prompt. (The page
        # kept the legacy token for this tab; forget it, so only the fragment can supply one.)
        page.evaluate("() => sessionStorage.clear()")
        page.goto("about:blank")
        page.goto(f"{base}/#token={PAGE_TOKEN}")
        page.wait_for_selector('.template-pick[data-id="default"]')
        page.wait_for_function("() => document.querySelector('.template-pick img').naturalWidth > 0")
        [default_thumb] = page.evaluate(THUMBNAILS_JS)
        assert default_thumb["src"].startswith("blob:"), default_thumb

        page.click("#add-avatar summary")
        page.set_input_files("#upload-file", str(video))
        page.fill("#upload-id", BIG_TEMPLATE_ID)
        page.fill("#upload-name", BIG_TEMPLATE_NAME)
        page.click("#upload-btn")
        page.wait_for_function(
            "(id) => window.avatarCall.uploads.some((u) => u.id === id && (u.error || u.result))",
            arg=BIG_TEMPLATE_ID,
            timeout=120_000,
        )
        upload = page.evaluate("window.avatarCall.uploads")[-1]
        assert upload["error"] is None and upload["status"] == 200, (
            upload,
            page.text_content("#upload-error"),
        )
        assert upload["result"]["state"] == "ready", upload
        assert upload["progress"], upload
        assert page.is_hidden("#upload-error"), page.text_content("#upload-error")
        assert (page.text_content("#upload-stage") or "").startswith(f"Added {BIG_TEMPLATE_NAME}")
        listed = _listed(page)[BIG_TEMPLATE_ID]
        assert listed["name"] == BIG_TEMPLATE_NAME and listed["state"] in ("ready", "warm"), listed
        uploaded_s = time.monotonic() - started

        # Both thumbnails show, through blob: URLs; the ones drawn before the upload were revoked.
        page.wait_for_function(
            "() => [...document.querySelectorAll('.template-pick img')].every((i) => i.naturalWidth > 0)"
        )
        thumbs = {t["id"]: t for t in page.evaluate(THUMBNAILS_JS)}
        assert set(thumbs) == {"default", BIG_TEMPLATE_ID}, thumbs
        assert all(t["src"].startswith("blob:") for t in thumbs.values()), thumbs
        assert thumbs["default"]["src"] != default_thumb["src"], "the old thumbnail was kept"
        counts = page.evaluate("window.avatarCall.thumbnailUrls")
        assert counts["created"] - counts["revoked"] == 2 and counts["revoked"] >= 1, counts
        assert (
            page.evaluate(
                "(src) => fetch(src).then(() => 'still there', () => 'revoked')", default_thumb["src"]
            )
            == "revoked"
        )

        # Picked before the call, the new avatar is shown as soon as the call opens.
        page.click(f'.template-pick[data-id="{BIG_TEMPLATE_ID}"]')
        assert page.evaluate("window.avatarCall.currentTemplate") == BIG_TEMPLATE_ID
        page.click("#call-btn")
        page.wait_for_function(
            "() => window.avatarCall.events.some((e) => e.type === 'template')", timeout=30_000
        )
        event = _template_events(page)[-1]
        assert event["id"] == BIG_TEMPLATE_ID and 0 <= event["switch_ms"] < 1000, event
        # The uploaded video's own framing (640x480), not a face crop.
        page.wait_for_function(video_playing_js(640), timeout=20_000)
        page.click("#hangup-btn")
        errors = page.evaluate("window.avatarCall.events.filter((e) => e.type === 'error')")
        assert not errors, f"server sent errors: {errors}"

        log = server.log_path.read_text(errors="replace")
        assert '"POST /api/templates HTTP/1.1" 200' in log, server.log_tail()
        assert "token=REDACTED" in log, server.log_tail()
        assert PAGE_TOKEN not in log, "the token reached the server's log"

    assert not page_errors, f"uncaught errors in the page: {page_errors}"
    total_s = time.monotonic() - started
    print(f"\n{size / 1e6:.1f} MB video listed after {uploaded_s:.1f} s; total {total_s:.1f} s")
    assert total_s < 150, f"the test took {total_s:.0f} s"
