// Call page for avatar_rtc (the entry module of index.html): one WebRTC call to the server, set up by
// the shared call client (js/call_client.js), with the avatar's audio and video in one <video> and
// the server's JSON events on the "events" data channel. This module starts and ends calls and routes
// the server's events to the parts of the page in js/app/, one concern each. Plain ES2020 modules,
// no framework, no build step.

import { onTokenChange } from "./js/app/auth.js";
import { client } from "./js/app/connection.js";
import { ui } from "./js/app/dom.js";
import { setLanguage } from "./js/app/language.js";
import { renderLatency, renderMetricsTable } from "./js/app/latency.js";
import { avatarCall } from "./js/app/state.js";
import {
  flashBargeIn,
  setConnectionState,
  setPlaceholder,
  showAvatarState,
  showError,
  showMicNote,
  showQuality,
  showVideoQuality,
} from "./js/app/status.js";
import {
  applyCapabilities,
  resetCapabilities,
  setMicInUse,
  setupTalkForm,
  updateControls,
} from "./js/app/talk.js";
import {
  chosenTemplateInfo,
  loadTemplates,
  onCallEnded,
  onChannelOpened,
  onTemplateSwitched,
  onTemplateSwitchFailed,
  setTemplateStatus,
  switching,
} from "./js/app/templates.js";
import {
  markCut,
  onTranscript,
  onTurnInterrupted,
  resetConversation,
  updateListeningLine,
} from "./js/app/transcript.js";
import { setupUploadForm } from "./js/app/upload.js";
import { clearVideo, fitVideoFrame, playRemote, showStream } from "./js/app/video.js";

const CONFIG_TIMEOUT_MS = 2000;
const MIC_CONSTRAINTS = {
  audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
};

let micStream = null;

function setAvatarState(state) {
  showAvatarState(state);
  updateListeningLine(state);
}

function setInCall(inCall) {
  ui.callBtn.disabled = inCall;
  ui.hangupBtn.disabled = !inCall;
}

// ---------------------------------------------------------------- server events

function handleEvent(message) {
  avatarCall.events.push(message);
  switch (message.type) {
    case "hello":
      avatarCall.sessionId = message.session_id ?? avatarCall.sessionId;
      avatarCall.hello = message;
      setLanguage(message.language);
      showQuality(message.renderer, message.quality);
      applyCapabilities(message);
      break;
    case "state":
      setAvatarState(String(message.state));
      break;
    case "transcript":
      onTranscript(message);
      break;
    case "barge_in":
      markCut();
      flashBargeIn();
      break;
    case "metrics":
      avatarCall.metrics = message;
      if (message.interrupted) onTurnInterrupted(message.turn);
      renderLatency(message);
      renderMetricsTable(message);
      break;
    case "template":
      onTemplateSwitched(message);
      break;
    case "quality":
      if (String(message.level).startsWith("video_")) {
        showVideoQuality(message.level, message.output_size);
      } else {
        showQuality(message.renderer === "fallback" ? "warp" : avatarCall.hello?.renderer, message.level);
      }
      break;
    case "error":
      if (switching() && /template/i.test(String(message.message))) {
        onTemplateSwitchFailed(String(message.message));
      } else {
        showError(String(message.message ?? "server error"));
      }
      break;
    default:
      // Newer servers may send more; they are kept in avatarCall.events.
      break;
  }
}

// The client sends events of the live call only: a hung-up call says nothing more.
client.on("message", handleEvent);
client.on("track", ({ stream }) => showStream(stream));
client.on("open", () => {
  updateControls();
  onChannelOpened();
});
client.on("close", () => {
  updateControls();
  setAvatarState("idle");
});
client.on("connectionstate", (state) => {
  setConnectionState(state);
  if (state === "failed") {
    showError("Connection failed (no network path to the server).");
    hangUp({ keepError: true });
  } else if (state === "disconnected") {
    // "disconnected" can recover by itself; "failed" follows if it does not.
    showError("Connection interrupted…");
  } else if (state === "connected") {
    showError("");
  }
});

// ---------------------------------------------------------------- call setup

// The microphone is optional: without it (denied, no device, or an insecure http:// origin,
// where mediaDevices is undefined) the call goes on receive-only.
async function openMicrophone() {
  if (!navigator.mediaDevices?.getUserMedia) {
    showMicNote("Microphone unavailable on this page (needs HTTPS or localhost): type to talk.");
    return null;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia(MIC_CONSTRAINTS);
    showMicNote("");
    return stream;
  } catch (err) {
    const reason = err?.name === "NotAllowedError" ? "permission denied" : err?.message || err?.name;
    showMicNote(`Microphone not used (${reason}): type to talk to the avatar.`);
    return null;
  }
}

async function startCall() {
  setInCall(true);
  showError("");
  setTemplateStatus("");
  setPlaceholder("<p>Connecting…</p>");
  resetConversation();
  resetCapabilities();
  avatarCall.hello = null;

  // ICE servers come from the server's config when it offers one; any failure (no endpoint, bad
  // JSON, timeout) falls back to host candidates only, which is enough on a LAN or loopback.
  const [iceServers, mic] = await Promise.all([
    client.fetchIceServers({ timeoutMs: CONFIG_TIMEOUT_MS }).catch(() => []),
    openMicrophone(),
  ]);
  micStream = mic;
  setMicInUse(Boolean(mic));
  avatarCall.sessionId = null;

  const answer = await client.connect({ iceServers, micStream: mic });
  if (answer) avatarCall.sessionId = answer.session_id ?? avatarCall.sessionId;
}

function hangUp({ keepError = false } = {}) {
  const hadCall = client.pc !== null;
  client.close();
  micStream?.getTracks().forEach((track) => track.stop());
  micStream = null;
  setMicInUse(false);
  clearVideo();

  resetConversation();
  updateControls();
  setInCall(false);
  setAvatarState("idle");
  setConnectionState(hadCall ? "closed" : "new");
  onCallEnded(hadCall);
  setPlaceholder("<p>Press <strong>Call</strong> to start</p>");
  if (!keepError) showError("");
}

// ---------------------------------------------------------------- wiring

ui.callBtn.addEventListener("click", () => {
  startCall().catch((err) => {
    console.error(err);
    hangUp();
    showError(`Could not connect: ${err?.message || err}`);
  });
});
ui.hangupBtn.addEventListener("click", () => hangUp());

setupTalkForm();
setupUploadForm();
onTokenChange(() => loadTemplates());
loadTemplates();

ui.video.addEventListener("playing", () => setPlaceholder(""));
ui.video.addEventListener("loadedmetadata", () => fitVideoFrame(chosenTemplateInfo()));
ui.video.addEventListener("resize", () => fitVideoFrame(chosenTemplateInfo()));
ui.placeholder.addEventListener("click", () => {
  if (ui.video.srcObject) playRemote();
});

// Closing the tab should free the server's session right away instead of waiting for ICE
// consent to time out.
window.addEventListener("pagehide", () => {
  if (client.pc) hangUp();
});
