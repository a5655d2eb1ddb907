// Kiosk page for avatar_rtc (the entry module of kiosk.html): connects by itself, fills the screen,
// needs no keyboard, and keeps itself connected. The avatar brightens when the server hears someone
// (its VAD state) and dims after a quiet spell. After a network drop or a server restart it
// reconnects with backoff. The signalling is the shared call client's (js/call_client.js); this page
// decides when to connect again.
// URL parameters, in the fragment (kiosk.html#token=...&sleep=30) or the query; the fragment wins:
// token (API token), sleep (seconds of quiet before dimming, default 60), mic=0 (no microphone).
// Put the token in the fragment: browsers never send it to a server, so it stays out of access and
// proxy logs. A legacy ?token= still works but is taken out of the address bar at once.
// Plain ES2020 module, no build step.

import { CallClient, HttpError } from "./js/call_client.js";
import { tokenFromPageUrl } from "./js/page_token.js";

const query = new URLSearchParams(location.search);
const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));
const param = (name) => fragment.get(name) ?? query.get(name);
const TOKEN = tokenFromPageUrl("avatarKioskToken");
const SLEEP_MS = Math.max(5, Number(param("sleep")) || 60) * 1000;
const USE_MIC = param("mic") !== "0";
// A new fragment (an edited address, or an embedding page's new token) starts over with it.
window.addEventListener("hashchange", () => location.reload());
const BACKOFF_FIRST_MS = 1000;
const BACKOFF_MAX_MS = 30000;
// A wrong token will not fix itself quickly.
const AUTH_RETRY_MS = 60000;

const video = document.getElementById("avatar");
const status = document.getElementById("status");
const statusText = document.getElementById("text");
const tap = document.getElementById("tap");

// A kiosk must notice a server that is gone even when ICE does not: it pings, and silence past the
// limit counts as a lost call.
const client = new CallClient({ token: () => TOKEN, heartbeatMs: 4000, silenceLimitMs: 12000 });

// Test hook and a place to look from the devtools of a kiosk in the field.
const kiosk = {
  connectionState: "new",
  state: "idle",
  sessionId: null,
  connects: 0,
  attempts: 0,
  awake: true,
  lastError: "",
  events: [],
};
Object.defineProperty(kiosk, "pc", { get: () => client.pc, enumerable: true });
window.avatarKiosk = kiosk;

let mic = null;
let failures = 0;
let retryTimer = null;
let sleepTimer = null;
let generation = 0; // bumps on every teardown, so a connect() still on its way stops

// ---------------------------------------------------------------- status and wake

function showStatus(conn, text) {
  kiosk.connectionState = conn;
  status.dataset.conn = conn;
  statusText.textContent = text;
}

function setAwake(awake) {
  kiosk.awake = awake;
  document.body.dataset.awake = String(awake);
}

function wake() {
  setAwake(true);
  clearTimeout(sleepTimer);
  sleepTimer = setTimeout(() => {
    if (kiosk.state === "idle") setAwake(false);
  }, SLEEP_MS);
}

function onAvatarState(state) {
  kiosk.state = state;
  status.dataset.state = state;
  // listening: the server's VAD heard a voice; thinking/speaking follow from it.
  if (state !== "idle") {
    setAwake(true);
    clearTimeout(sleepTimer);
  } else {
    wake();
  }
}

// ---------------------------------------------------------------- media

async function openMicrophone() {
  if (!USE_MIC || !navigator.mediaDevices?.getUserMedia) return null;
  try {
    return await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
  } catch (err) {
    console.warn("kiosk: no microphone", err);
    return null;
  }
}

function play() {
  video.play().catch((err) => {
    if (err?.name !== "NotAllowedError") return;
    // Sound needs a gesture on this browser (a kiosk normally runs Chromium with
    // --autoplay-policy=no-user-gesture-required): show the picture muted, unmute on a touch.
    video.muted = true;
    video.play().catch(() => {});
    tap.hidden = false;
  });
}

// An embedding <avatar-call fit="video"> (js/avatar_call.js) sizes its box to the video's shape,
// which only this page can see: tell the parent the size of the frames, now and whenever it changes
// (a template of another shape). Any origin may hear it ("*"): the embedding page's origin is not
// known here, and a frame size is no secret.
function reportVideoSize() {
  if (window.parent === window || !(video.videoWidth > 0 && video.videoHeight > 0)) return;
  window.parent.postMessage(
    { type: "avatar-call:video-size", width: video.videoWidth, height: video.videoHeight },
    "*",
  );
}
video.addEventListener("loadedmetadata", reportVideoSize);
video.addEventListener("resize", reportVideoSize);

document.addEventListener("pointerdown", () => {
  if (video.muted) {
    video.muted = false;
    tap.hidden = true;
    play();
  }
  if (!document.fullscreenElement) document.documentElement.requestFullscreen?.().catch(() => {});
});

// ---------------------------------------------------------------- the call

client.on("track", ({ stream }) => {
  if (video.srcObject !== stream) video.srcObject = stream;
  play();
});
client.on("connectionstate", (state) => {
  if (state === "connected") {
    failures = 0;
    kiosk.connects += 1;
    kiosk.lastError = "";
    showStatus("connected", "connected");
    wake();
  } else if (state === "disconnected") {
    // The client calls it lost if it does not heal within its grace period.
    showStatus("retrying", "connection unstable");
  }
});
client.on("message", (message) => {
  if (message.type !== "pong") {
    kiosk.events.push(message);
    if (kiosk.events.length > 200) kiosk.events.shift();
  }
  if (message.type === "hello") kiosk.sessionId = message.session_id ?? kiosk.sessionId;
  else if (message.type === "state") onAvatarState(String(message.state));
  else if (message.type === "error") console.warn("avatar:", message.message);
});
client.on("lost", ({ reason }) => scheduleRetry(reason, 0));

async function connect() {
  const mine = ++generation;
  kiosk.attempts += 1;
  showStatus(failures ? "retrying" : "connecting", failures ? "reconnecting" : "connecting");
  const iceServers = await client.fetchIceServers();
  if (!mic) mic = await openMicrophone();
  if (mine !== generation) return;
  const answer = await client.connect({ iceServers, micStream: mic });
  if (answer && mine === generation) kiosk.sessionId = answer.session_id ?? kiosk.sessionId;
}

// ---------------------------------------------------------------- losing and retrying

function teardown() {
  generation += 1;
  client.close();
  kiosk.sessionId = null;
  const stream = video.srcObject;
  if (stream instanceof MediaStream) stream.getTracks().forEach((t) => t.stop());
  video.srcObject = null;
  onAvatarState("idle");
}

function scheduleRetry(reason, atLeastMs) {
  teardown();
  failures += 1;
  kiosk.lastError = reason;
  const backoff = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** Math.min(failures - 1, 10));
  const jittered = backoff * (0.8 + Math.random() * 0.4);
  const delay = Math.max(atLeastMs, jittered);
  showStatus("retrying", `${reason} · retrying in ${Math.round(delay / 1000)} s`);
  clearTimeout(retryTimer);
  retryTimer = setTimeout(start, delay);
}

function start() {
  clearTimeout(retryTimer);
  const attempt = connect();
  const mine = generation; // connect() took its generation before its first wait
  attempt.catch((err) => {
    // An attempt that a teardown already replaced fails quietly: its successor is under way.
    if (mine !== generation) return;
    const httpStatus = err instanceof HttpError ? err.status : 0;
    const reason = err?.message || String(err);
    console.warn("kiosk: connect failed", err);
    // A wrong token will not fix itself quickly; a full server says when to come back.
    const atLeast = httpStatus === 401 ? AUTH_RETRY_MS : (err.retryAfterS || 0) * 1000;
    scheduleRetry(reason, atLeast);
  });
}

// The network came back: no need to sit out the backoff.
window.addEventListener("online", () => {
  if (kiosk.connectionState !== "connected") {
    failures = 0;
    teardown();
    start();
  }
});
window.addEventListener("pagehide", teardown);

start();
