// What the top bar and the stage say: the connection pill, the avatar's state badge, the renderer
// and quality pill, the error and microphone lines, the placeholder over the video, the barge-in flash.

import { setNote, ui } from "./dom.js";
import { avatarCall } from "./state.js";

const FLASH_MS = 1600;
let flashTimer = null;

export function showError(message) {
  setNote(ui.error, message);
}

export function showMicNote(message) {
  setNote(ui.micNote, message);
}

export function showAvatarState(state) {
  avatarCall.state = state;
  ui.badge.textContent = state;
  ui.badge.dataset.state = state;
}

export function setConnectionState(state) {
  avatarCall.connectionState = state;
  ui.connState.textContent = state === "new" ? "offline" : state;
  ui.connState.dataset.state = state;
}

export function setPlaceholder(html) {
  ui.placeholder.innerHTML = html;
  ui.placeholder.hidden = !html;
}

// Which renderer draws the face and at what quality level (MuseTalk degrades under load).
// The video's own level is separate: under CPU pressure the server sends a smaller picture first.
export function showQuality(renderer, level) {
  const pill = ui.quality;
  if (!pill || !renderer) return;
  avatarCall.renderer = renderer;
  avatarCall.quality = level || "full";
  pill.hidden = false;
  const parts = [renderer];
  if (avatarCall.quality !== "full") parts.push(avatarCall.quality);
  const video = avatarCall.videoQuality;
  if (video && video.level !== "video_full" && Array.isArray(video.size)) {
    parts.push(`${video.size[0]}×${video.size[1]}`);
  }
  pill.textContent = parts.join(" · ");
}

export function showVideoQuality(level, size) {
  avatarCall.videoQuality = { level, size };
  showQuality(avatarCall.renderer, avatarCall.quality);
}

export function flashBargeIn() {
  clearTimeout(flashTimer);
  ui.flash.hidden = false;
  // Restart the animation when barge-ins come close together.
  ui.flash.classList.remove("show");
  void ui.flash.offsetWidth;
  ui.flash.classList.add("show");
  flashTimer = setTimeout(() => {
    ui.flash.classList.remove("show");
    ui.flash.hidden = true;
  }, FLASH_MS);
}
