// Call page for avatar_rtc: one WebRTC peer connection to the server, a data channel named
// "events" for JSON control messages, the avatar's audio and video played through one <video>.
// Plain ES2020, no framework, no build step.
"use strict";

(() => {
  const OFFER_URL = "/offer";
  const CONFIG_URL = "/api/config";
  // The offer is sent only once ICE gathering is complete (the server does not take trickled
  // candidates). Host-only gathering finishes in milliseconds; an unreachable STUN/TURN server
  // can stall it, so past this point we send whatever candidates we have.
  const ICE_GATHER_TIMEOUT_MS = 5000;
  const CONFIG_TIMEOUT_MS = 2000;
  const MIC_CONSTRAINTS = {
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  };

  const $ = (id) => document.getElementById(id);
  const ui = {
    callBtn: $("call-btn"),
    hangupBtn: $("hangup-btn"),
    video: $("remote-video"),
    placeholder: $("video-placeholder"),
    connState: $("conn-state"),
    badge: $("state-badge"),
    micNote: $("mic-note"),
    error: $("error-line"),
    sayForm: $("say-form"),
    sayText: $("say-text"),
    sayBtn: $("say-btn"),
    stopBtn: $("stop-btn"),
    transcript: $("transcript"),
    metrics: $("metrics").tBodies[0],
  };

  // Test hook: browser tests read this instead of scraping the DOM. `events` keeps every message
  // the server sent, in order, across calls.
  const avatarCall = {
    state: "idle",
    connectionState: "new",
    sessionId: null,
    metrics: null,
    events: [],
    pc: null,
    channel: null,
  };
  window.avatarCall = avatarCall;

  let micStream = null;
  // Partial (final: false) transcript lines per role, updated in place until their final version.
  let pendingTranscript = new Map();

  // ---------------------------------------------------------------- UI helpers

  function showError(message) {
    ui.error.textContent = message;
    ui.error.hidden = !message;
  }

  function showMicNote(message) {
    ui.micNote.textContent = message;
    ui.micNote.hidden = !message;
  }

  function setAvatarState(state) {
    avatarCall.state = state;
    ui.badge.textContent = state;
    ui.badge.dataset.state = state;
  }

  function setConnectionState(state) {
    avatarCall.connectionState = state;
    ui.connState.textContent = state === "new" ? "offline" : state;
    ui.connState.dataset.state = state;
  }

  function setPlaceholder(html) {
    ui.placeholder.innerHTML = html;
    ui.placeholder.hidden = !html;
  }

  // Controls that need an open data channel are enabled only while it is open.
  function setChannelOpen(open) {
    ui.sayText.disabled = !open;
    ui.sayBtn.disabled = !open;
    ui.stopBtn.disabled = !open;
  }

  function setInCall(inCall) {
    ui.callBtn.disabled = inCall;
    ui.hangupBtn.disabled = !inCall;
  }

  function formatValue(value) {
    if (typeof value === "number") {
      return Number.isInteger(value) ? String(value) : value.toFixed(1);
    }
    if (value !== null && typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  function renderMetrics(message) {
    const rows = Object.entries(message).filter(([key]) => key !== "type");
    ui.metrics.replaceChildren(
      ...rows.map(([key, value]) => {
        const tr = document.createElement("tr");
        const th = document.createElement("th");
        th.scope = "row";
        th.textContent = key;
        const td = document.createElement("td");
        td.textContent = formatValue(value);
        tr.append(th, td);
        return tr;
      }),
    );
  }

  function renderTranscript(message) {
    const role = message.role === "user" ? "user" : "assistant";
    ui.transcript.querySelector(".empty")?.remove();
    let item = pendingTranscript.get(role);
    if (!item) {
      item = document.createElement("li");
      item.className = `line ${role}`;
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = role === "user" ? "You" : "Avatar";
      const text = document.createElement("span");
      text.className = "text";
      item.append(who, text);
      ui.transcript.append(item);
    }
    item.querySelector(".text").textContent = String(message.text ?? "");
    item.classList.toggle("partial", !message.final);
    if (message.final) pendingTranscript.delete(role);
    else pendingTranscript.set(role, item);
    item.scrollIntoView({ block: "nearest" });
  }

  // ---------------------------------------------------------------- server events

  function handleEvent(raw) {
    let message;
    try {
      message = JSON.parse(raw);
    } catch {
      console.warn("ignoring non-JSON event", raw);
      return;
    }
    avatarCall.events.push(message);
    switch (message.type) {
      case "hello":
        avatarCall.sessionId = message.session_id ?? avatarCall.sessionId;
        break;
      case "state":
        setAvatarState(String(message.state));
        break;
      case "metrics":
        avatarCall.metrics = message;
        renderMetrics(message);
        break;
      case "transcript":
        renderTranscript(message);
        break;
      case "error":
        showError(String(message.message ?? "server error"));
        break;
      default:
        // Newer servers may send more; they are kept in avatarCall.events.
        break;
    }
  }

  function send(message) {
    const channel = avatarCall.channel;
    if (!channel || channel.readyState !== "open") {
      showError("Not connected.");
      return false;
    }
    channel.send(JSON.stringify(message));
    return true;
  }

  // ---------------------------------------------------------------- call setup

  // ICE servers come from the server's config when it offers one; any failure (no endpoint,
  // bad JSON, timeout) falls back to host candidates only, which is enough on a LAN or loopback.
  async function loadIceServers() {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), CONFIG_TIMEOUT_MS);
    try {
      const response = await fetch(CONFIG_URL, { signal: controller.signal });
      if (!response.ok) return [];
      const config = await response.json();
      return Array.isArray(config?.ice_servers) ? config.ice_servers : [];
    } catch {
      return [];
    } finally {
      clearTimeout(timer);
    }
  }

  // The microphone is optional: without it (denied, no device, or an insecure http:// origin,
  // where mediaDevices is undefined) the call goes on receive-only.
  async function openMicrophone() {
    if (!navigator.mediaDevices?.getUserMedia) {
      showMicNote("Microphone unavailable on this page (needs HTTPS or localhost): listening only.");
      return null;
    }
    try {
      const stream = await navigator.mediaDevices.getUserMedia(MIC_CONSTRAINTS);
      showMicNote("");
      return stream;
    } catch (err) {
      const reason = err?.name === "NotAllowedError" ? "permission denied" : err?.message || err?.name;
      showMicNote(`Microphone not used (${reason}): listening only.`);
      return null;
    }
  }

  function waitForIceGathering(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        pc.removeEventListener("icegatheringstatechange", onChange);
        resolve();
      };
      const onChange = () => {
        if (pc.iceGatheringState === "complete") done();
      };
      const timer = setTimeout(done, ICE_GATHER_TIMEOUT_MS);
      pc.addEventListener("icegatheringstatechange", onChange);
    });
  }

  async function postOffer(description) {
    const response = await fetch(OFFER_URL, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: description.sdp, type: description.type }),
    });
    let body = null;
    try {
      body = await response.json();
    } catch {
      // An error page that is not JSON: reported below by status code.
    }
    if (!response.ok) {
      throw new Error(body?.error || `offer rejected (HTTP ${response.status})`);
    }
    if (!body?.sdp || body.type !== "answer") throw new Error("malformed answer from server");
    return body;
  }

  function playRemote() {
    ui.video.play().catch((err) => {
      // Autoplay with sound can be refused (mostly iOS) when the tracks arrive after the tap's
      // user activation has lapsed; a second tap on the video starts it.
      if (err?.name === "NotAllowedError") {
        setPlaceholder("<p>Tap to start audio and video</p>");
      }
    });
  }

  function attachRemoteTrack(pc, track) {
    // One stream for audio and video keeps lip sync within one element and avoids a second
    // autoplay decision for a separate <audio>.
    let stream = ui.video.srcObject;
    if (!(stream instanceof MediaStream)) {
      stream = new MediaStream();
      ui.video.srcObject = stream;
    }
    stream.addTrack(track);
    track.addEventListener("ended", () => stream.removeTrack(track));
    playRemote();
  }

  function openChannel(pc) {
    const channel = pc.createDataChannel("events");
    avatarCall.channel = channel;
    channel.addEventListener("open", () => setChannelOpen(true));
    channel.addEventListener("close", () => {
      setChannelOpen(false);
      if (avatarCall.pc === pc) setAvatarState("idle");
    });
    channel.addEventListener("message", (event) => {
      if (typeof event.data === "string") handleEvent(event.data);
    });
    return channel;
  }

  async function startCall() {
    setInCall(true);
    showError("");
    setPlaceholder("<p>Connecting…</p>");
    pendingTranscript = new Map();

    const [iceServers, mic] = await Promise.all([loadIceServers(), openMicrophone()]);
    micStream = mic;

    const pc = new RTCPeerConnection({ iceServers });
    avatarCall.pc = pc;
    avatarCall.sessionId = null;

    pc.addEventListener("connectionstatechange", () => {
      if (avatarCall.pc !== pc) return;
      setConnectionState(pc.connectionState);
      if (pc.connectionState === "failed") {
        showError("Connection failed (no network path to the server).");
        hangUp({ keepError: true });
      } else if (pc.connectionState === "disconnected") {
        // "disconnected" can recover by itself; "failed" follows if it does not.
        showError("Connection interrupted…");
      } else if (pc.connectionState === "connected") {
        showError("");
      }
    });
    pc.addEventListener("track", (event) => attachRemoteTrack(pc, event.track));

    // The channel must exist before the offer so the SDP carries the SCTP section.
    openChannel(pc);

    const micTrack = mic?.getAudioTracks()[0];
    if (micTrack) {
      pc.addTransceiver(micTrack, { direction: "sendrecv", streams: [mic] });
    } else {
      pc.addTransceiver("audio", { direction: "recvonly" });
    }
    pc.addTransceiver("video", { direction: "recvonly" });

    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc);
    if (avatarCall.pc !== pc) return; // hung up while gathering

    const answer = await postOffer(pc.localDescription);
    if (avatarCall.pc !== pc) return;
    avatarCall.sessionId = answer.session_id ?? null;
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
  }

  function hangUp({ keepError = false } = {}) {
    const pc = avatarCall.pc;
    avatarCall.pc = null;
    avatarCall.channel?.close();
    avatarCall.channel = null;
    pc?.close();
    micStream?.getTracks().forEach((track) => track.stop());
    micStream = null;

    const stream = ui.video.srcObject;
    if (stream instanceof MediaStream) stream.getTracks().forEach((track) => track.stop());
    ui.video.srcObject = null;

    pendingTranscript = new Map();
    setChannelOpen(false);
    setInCall(false);
    setAvatarState("idle");
    setConnectionState(pc ? "closed" : "new");
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

  // A <form> submit covers both the Speak button and Enter in the text box.
  ui.sayForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.sayText.value.trim();
    if (!text) return;
    if (send({ type: "say", text })) {
      showError("");
      ui.sayText.value = "";
    }
  });

  ui.stopBtn.addEventListener("click", () => send({ type: "interrupt" }));

  ui.video.addEventListener("playing", () => setPlaceholder(""));
  ui.placeholder.addEventListener("click", () => {
    if (ui.video.srcObject) playRemote();
  });

  // Closing the tab should free the server's session right away instead of waiting for ICE
  // consent to time out.
  window.addEventListener("pagehide", () => {
    if (avatarCall.pc) hangUp();
  });
})();
