// The avatar's <video>: the call's audio and video in one element, its autoplay, and the frame's shape.

import { ui } from "./dom.js";
import { setPlaceholder } from "./status.js";

export function playRemote() {
  ui.video.play().catch((err) => {
    // Autoplay with sound can be refused (mostly iOS) when the tracks arrive after the tap's
    // user activation has lapsed; a second tap on the video starts it.
    if (err?.name === "NotAllowedError") {
      setPlaceholder("<p>Tap to start audio and video</p>");
    }
  });
}

// `stream` is the call's one stream (the call client adds every remote track to it).
export function showStream(stream) {
  if (ui.video.srcObject !== stream) ui.video.srcObject = stream;
  playRemote();
}

export function clearVideo() {
  const stream = ui.video.srcObject;
  if (stream instanceof MediaStream) stream.getTracks().forEach((track) => track.stop());
  ui.video.srcObject = null;
}

// The video frame takes the video's own shape (style.css reads --video-aspect), so a portrait or
// landscape avatar shows whole, without bars and without pushing the buttons out of view. The frames
// decide during a call (a switch to a template of another shape fires "resize"); before the first
// one, `chosen` (the chosen template's list entry, with its size), so the frame does not jump when
// the call starts.
export function fitVideoFrame(chosen) {
  let width = ui.video.videoWidth;
  let height = ui.video.videoHeight;
  if (!(width > 0 && height > 0)) {
    width = chosen?.width;
    height = chosen?.height;
  }
  // Nothing known yet (no list, or an old server that sends no size): keep the last shape.
  if (!(width > 0 && height > 0)) return;
  ui.stage.style.setProperty("--video-aspect", String(width / height));
}
