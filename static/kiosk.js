// Kiosk page for avatar_rtc: connects by itself, fills the screen, needs no keyboard, and keeps
// itself connected. The avatar brightens when the server hears someone (its VAD state) and dims
// after a quiet spell. After a network drop or a server restart it reconnects with backoff.
// URL parameters, in the fragment (kiosk.html#token=...&sleep=30) or the query; the fragment wins:
// token (API token), sleep (seconds of quiet before dimming, default 60), mic=0 (no microphone).
// Put the token in the fragment: browsers never send it to a server, so it stays out of access and
// proxy logs. A legacy ?token= still works but is taken out of the address bar at once.
// Plain ES2020, no build step.
"use strict";

(() => {
  const query = new URLSearchParams(location.search);
  const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));
  const param = (name) => fragment.get(name) ?? query.get(name);
  // Storage can be refused (an embedding page's site with storage blocked): then no memory.
  const storage = (() => {
    try {
      return window.sessionStorage;
    } catch {
      return null;
    }
  })();
  const TOKEN = param("token") || storage?.getItem("avatarKioskToken") || "";
  const SLEEP_MS = Math.max(5, Number(param("sleep")) || 60) * 1000;
  const USE_MIC = param("mic") !== "0";
  // A token in the query would stay in the address bar, the history and the Referer of later
  // requests: take it out now, keep the other parameters, and keep the token for a reload of this tab.
  if (query.has("token")) {
    const legacy = query.get("token");
    query.delete("token");
    const search = query.toString();
    history.replaceState(history.state, "", `${location.pathname}${search ? `?${search}` : ""}${location.hash}`);
    if (legacy) storage?.setItem("avatarKioskToken", legacy);
  }
  // A new fragment (an edited address, or an embedding page's new token) starts over with it.
  window.addEventListener("hashchange", () => location.reload());
  const ICE_GATHER_TIMEOUT_MS = 5000;
  const HEARTBEAT_MS = 4000;
  // No message from the server for this long means the call is gone, whatever ICE says.
  const SILENCE_LIMIT_MS = 12000;
  // "disconnected" often heals by itself (a Wi-Fi hiccup); past this it is treated as lost.
  const DISCONNECTED_GRACE_MS = 5000;
  const BACKOFF_FIRST_MS = 1000;
  const BACKOFF_MAX_MS = 30000;
  const AUTH_RETRY_MS = 60000;

  const video = document.getElementById("avatar");
  const status = document.getElementById("status");
  const statusText = document.getElementById("text");
  const tap = document.getElementById("tap");

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
    pc: null,
  };
  window.avatarKiosk = kiosk;

  let mic = null;
  let failures = 0;
  let retryTimer = null;
  let heartbeatTimer = null;
  let disconnectTimer = null;
  let sleepTimer = null;
  let lastHeard = 0;
  let generation = 0; // bumps on every teardown, so callbacks of an old call do nothing

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

  // An embedding <avatar-call fit="video"> (embed.js) sizes its box to the video's shape, which only
  // this page can see: tell the parent the size of the frames, now and whenever it changes (a template
  // of another shape). Any origin may hear it ("*"): the embedding page's origin is not known here,
  // and a frame size is no secret.
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

  // ---------------------------------------------------------------- signaling

  function authHeaders(extra = {}) {
    return TOKEN ? { ...extra, Authorization: `Bearer ${TOKEN}` } : extra;
  }

  class HttpError extends Error {
    constructor(status, message, retryAfterS) {
      super(message);
      this.status = status;
      this.retryAfterS = retryAfterS;
    }
  }

  async function iceServers() {
    try {
      const response = await fetch("/api/config", { headers: authHeaders(), cache: "no-store" });
      if (response.status === 401) throw new HttpError(401, "token rejected", 0);
      if (!response.ok) return [];
      const config = await response.json();
      return Array.isArray(config?.ice_servers) ? config.ice_servers : [];
    } catch (err) {
      if (err instanceof HttpError) throw err;
      throw new HttpError(0, "server unreachable", 0);
    }
  }

  function gathered(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ICE_GATHER_TIMEOUT_MS);
      pc.addEventListener("icegatheringstatechange", () => {
        if (pc.iceGatheringState === "complete") {
          clearTimeout(timer);
          resolve();
        }
      });
    });
  }

  async function postOffer(description) {
    const response = await fetch("/offer", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify({ sdp: description.sdp, type: description.type }),
    });
    let body = null;
    try {
      body = await response.json();
    } catch {
      // reported by status below
    }
    if (!response.ok) {
      const retryAfterS = Number(response.headers.get("Retry-After")) || 0;
      throw new HttpError(response.status, body?.error || `HTTP ${response.status}`, retryAfterS);
    }
    return body;
  }

  // ---------------------------------------------------------------- one call

  async function connect() {
    const mine = ++generation;
    kiosk.attempts += 1;
    showStatus(failures ? "retrying" : "connecting", failures ? "reconnecting" : "connecting");
    const servers = await iceServers();
    if (!mic) mic = await openMicrophone();
    if (mine !== generation) return;

    const pc = new RTCPeerConnection({ iceServers: servers });
    kiosk.pc = pc;
    const channel = pc.createDataChannel("events");
    channel.addEventListener("open", () => {
      if (mine !== generation) return;
      lastHeard = Date.now();
      heartbeatTimer = setInterval(() => heartbeat(channel, mine), HEARTBEAT_MS);
    });
    channel.addEventListener("message", (event) => {
      if (mine !== generation || typeof event.data !== "string") return;
      lastHeard = Date.now();
      onMessage(event.data);
    });
    channel.addEventListener("close", () => lost(mine, "events channel closed"));

    pc.addEventListener("track", (event) => {
      let stream = video.srcObject;
      if (!(stream instanceof MediaStream)) {
        stream = new MediaStream();
        video.srcObject = stream;
      }
      stream.addTrack(event.track);
      play();
    });
    pc.addEventListener("connectionstatechange", () => {
      if (mine !== generation) return;
      const state = pc.connectionState;
      if (state === "connected") {
        clearTimeout(disconnectTimer);
        failures = 0;
        kiosk.connects += 1;
        kiosk.lastError = "";
        showStatus("connected", "connected");
        wake();
      } else if (state === "disconnected") {
        showStatus("retrying", "connection unstable");
        clearTimeout(disconnectTimer);
        disconnectTimer = setTimeout(() => lost(mine, "disconnected"), DISCONNECTED_GRACE_MS);
      } else if (state === "failed" || state === "closed") {
        lost(mine, `connection ${state}`);
      }
    });

    const micTrack = mic?.getAudioTracks().find((t) => t.readyState === "live");
    if (micTrack) {
      pc.addTransceiver(micTrack, { direction: "sendrecv", streams: [mic] });
    } else {
      pc.addTransceiver("audio", { direction: "recvonly" });
    }
    pc.addTransceiver("video", { direction: "recvonly" });
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    if (mine !== generation) return;
    const answer = await postOffer(pc.localDescription);
    if (mine !== generation) return;
    kiosk.sessionId = answer.session_id ?? null;
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
  }

  function heartbeat(channel, mine) {
    if (mine !== generation) return;
    if (Date.now() - lastHeard > SILENCE_LIMIT_MS) {
      lost(mine, "server stopped answering");
      return;
    }
    if (channel.readyState === "open") channel.send(JSON.stringify({ type: "ping", t: Date.now() }));
  }

  function onMessage(raw) {
    let message;
    try {
      message = JSON.parse(raw);
    } catch {
      return;
    }
    if (message.type !== "pong") {
      kiosk.events.push(message);
      if (kiosk.events.length > 200) kiosk.events.shift();
    }
    if (message.type === "hello") kiosk.sessionId = message.session_id ?? kiosk.sessionId;
    else if (message.type === "state") onAvatarState(String(message.state));
    else if (message.type === "error") console.warn("avatar:", message.message);
  }

  // ---------------------------------------------------------------- losing and retrying

  function teardown() {
    generation += 1;
    clearInterval(heartbeatTimer);
    clearTimeout(disconnectTimer);
    const pc = kiosk.pc;
    kiosk.pc = null;
    kiosk.sessionId = null;
    try {
      pc?.close();
    } catch {
      // already closed
    }
    const stream = video.srcObject;
    if (stream instanceof MediaStream) stream.getTracks().forEach((t) => t.stop());
    video.srcObject = null;
    onAvatarState("idle");
  }

  function lost(mine, reason) {
    if (mine !== generation) return;
    scheduleRetry(reason, 0);
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
    connect().catch((err) => {
      const status = err instanceof HttpError ? err.status : 0;
      const reason = err?.message || String(err);
      console.warn("kiosk: connect failed", err);
      // A wrong token will not fix itself quickly; a full server says when to come back.
      const atLeast = status === 401 ? AUTH_RETRY_MS : (err.retryAfterS || 0) * 1000;
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
})();
