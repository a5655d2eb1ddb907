// The one WebRTC client of avatar_rtc's pages: the call page, the kiosk, and through the kiosk or the
// call page every <avatar-call> embed. It owns the signalling: the peer connection, the microphone
// and the receive-only transceivers, the "events" data channel, POST /offer with the API token, the
// answer, and the connection states; it tells its page what happens through events. What a page does
// with a lost call (the call page hangs up, the kiosk reconnects with backoff) stays in the page.
//
// Events (subscribe with `client.on(type, listener)`; the listener gets the detail):
//   "open" / "close"     the events channel opened / closed
//   "message"            a JSON message from the server, parsed (every one, in order)
//   "track"              {track, stream}: a remote track, already added to the call's one stream
//   "connectionstate"    the peer connection's state ("connecting", "connected", "failed", ...)
//   "lost"               {reason}: the call is gone (channel closed, connection failed or closed,
//                        "disconnected" for too long, or with a heartbeat: the server went silent);
//                        sent once per call, and the page decides whether to connect again
// Events of a call that has been closed or replaced are never sent, so a page needs no generation
// counter for them.
//
// Plain ES2020 module, no build step.

const OFFER_PATH = "/offer";
const CONFIG_PATH = "/api/config";

// The server this module came from: the same as the page's for the server's own pages, and the right
// one for a page of another origin that imports it.
const SERVER_URL = new URL("/", import.meta.url).href;

// A refused request: `status` 0 when the server could not be reached; `retryAfterS` from Retry-After.
export class HttpError extends Error {
  constructor(status, message, retryAfterS = 0) {
    super(message);
    this.name = "HttpError";
    this.status = status;
    this.retryAfterS = retryAfterS;
  }
}

// fetch() with `Authorization: Bearer <token>` when `token()` gives one: never in the URL, which
// would put it in access and proxy logs. On a 401, `onUnauthorized()` may get a new token (resolving
// true) and the request is made once more with it.
export async function fetchWithToken(url, options = {}, { token = () => "", onUnauthorized = null } = {}) {
  const headers = new Headers(options.headers || {});
  const value = token();
  if (value) headers.set("Authorization", `Bearer ${value}`);
  const response = await fetch(url, { ...options, headers });
  if (response.status === 401 && onUnauthorized && (await onUnauthorized())) {
    return fetchWithToken(url, options, { token, onUnauthorized: null });
  }
  return response;
}

export class CallClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} [options.server] the avatar server's base URL (default: where this module came from)
   * @param {() => string} [options.token] the API token now ("" for none); asked anew on every request
   * @param {() => Promise<boolean>} [options.onUnauthorized] on a 401: get a new token, true to retry
   * @param {number} [options.iceGatherTimeoutMs] send the offer with what ICE gathered by then
   * @param {number} [options.heartbeatMs] ping the server this often (0: no heartbeat)
   * @param {number} [options.silenceLimitMs] with a heartbeat: nothing heard this long means lost
   * @param {number} [options.disconnectedGraceMs] "disconnected" this long means lost
   */
  constructor({
    server = SERVER_URL,
    token = () => "",
    onUnauthorized = null,
    // The server takes no trickled candidates, so the offer waits for gathering to complete.
    // Host-only gathering takes milliseconds; an unreachable STUN/TURN server can stall it.
    iceGatherTimeoutMs = 5000,
    heartbeatMs = 0,
    silenceLimitMs = 12000,
    // "disconnected" often heals by itself (a Wi-Fi hiccup); "failed" follows when it does not.
    disconnectedGraceMs = 5000,
  } = {}) {
    super();
    this.server = server;
    this.auth = { token, onUnauthorized };
    this.iceGatherTimeoutMs = iceGatherTimeoutMs;
    this.heartbeatMs = heartbeatMs;
    this.silenceLimitMs = silenceLimitMs;
    this.disconnectedGraceMs = disconnectedGraceMs;
    this.pc = null;
    this.channel = null;
    this.stream = null;
    this.timers = { heartbeat: null, disconnected: null };
    this.lastHeard = 0;
    this.lostSent = false;
  }

  // Subscribes `listener(detail)` to `type`; returns the function that unsubscribes it.
  on(type, listener) {
    const wrapped = (event) => listener(event.detail);
    this.addEventListener(type, wrapped);
    return () => this.removeEventListener(type, wrapped);
  }

  get channelOpen() {
    return this.channel?.readyState === "open";
  }

  request(path, options = {}) {
    return fetchWithToken(new URL(path, this.server), options, this.auth);
  }

  // The ICE servers the server's config offers. Throws HttpError(401) for a rejected token and
  // HttpError(0) when the server cannot be reached (or answers slower than `timeoutMs`, if given);
  // a server with no usable config gives [], which is enough on a LAN or loopback.
  async fetchIceServers({ timeoutMs = 0 } = {}) {
    const controller = new AbortController();
    const timer = timeoutMs ? setTimeout(() => controller.abort(), timeoutMs) : null;
    let response;
    try {
      response = await this.request(CONFIG_PATH, { cache: "no-store", signal: controller.signal });
    } catch {
      throw new HttpError(0, "server unreachable");
    } finally {
      clearTimeout(timer);
    }
    if (response.status === 401) throw new HttpError(401, "token rejected");
    if (!response.ok) return [];
    const config = await response.json().catch(() => null);
    return Array.isArray(config?.ice_servers) ? config.ice_servers : [];
  }

  // Starts a call: a new peer connection (closing any earlier one), the events channel, the
  // microphone's first live track (or receive-only audio), receive-only video, and the offer.
  // Resolves to the server's answer ({sdp, type, session_id, ...}) once it is applied, or to null
  // when close() or another connect() came first.
  async connect({ iceServers = [], micStream = null } = {}) {
    this.close();
    const pc = new RTCPeerConnection({ iceServers });
    this.pc = pc;
    this.lostSent = false;
    this.stream = new MediaStream();
    const current = () => this.pc === pc;

    pc.addEventListener("connectionstatechange", () => {
      if (current()) this.onConnectionState(pc.connectionState);
    });
    pc.addEventListener("track", (event) => {
      if (!current()) return;
      // One stream for audio and video: lip sync within one media element, one autoplay decision.
      const stream = this.stream;
      stream.addTrack(event.track);
      event.track.addEventListener("ended", () => stream.removeTrack(event.track));
      this.emit("track", { track: event.track, stream });
    });

    // The channel must exist before the offer so the SDP carries the SCTP section.
    this.openChannel(pc);

    const micTrack = micStream?.getAudioTracks().find((track) => track.readyState === "live");
    if (micTrack) {
      pc.addTransceiver(micTrack, { direction: "sendrecv", streams: [micStream] });
    } else {
      pc.addTransceiver("audio", { direction: "recvonly" });
    }
    pc.addTransceiver("video", { direction: "recvonly" });

    try {
      await pc.setLocalDescription(await pc.createOffer());
      await this.iceGathered(pc);
      if (!current()) return null;
      const answer = await this.postOffer(pc.localDescription);
      if (!current()) return null;
      await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
      return answer;
    } catch (err) {
      // A call closed on the way fails quietly: nobody waits for it any more.
      if (!current()) return null;
      throw err;
    }
  }

  // Sends one JSON message on the events channel; false when the channel is not open.
  send(message) {
    if (!this.channelOpen) return false;
    this.channel.send(JSON.stringify(message));
    return true;
  }

  // Ends the call (if any). Its events stop here: nothing more is sent for it.
  close() {
    const { pc, channel } = this;
    this.pc = null;
    this.channel = null;
    this.stream = null;
    this.stopTimers();
    // Closing twice is harmless; the peer connection closes even if the channel could not.
    try {
      channel?.close();
    } catch {
      // already closed
    }
    pc?.close();
  }

  // ---------------------------------------------------------------- internals

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  stopTimers() {
    clearInterval(this.timers.heartbeat);
    clearTimeout(this.timers.disconnected);
    this.timers.heartbeat = null;
    this.timers.disconnected = null;
  }

  lost(pc, reason) {
    if (this.pc !== pc || this.lostSent) return;
    this.lostSent = true;
    this.stopTimers();
    this.emit("lost", { reason });
  }

  onConnectionState(state) {
    const pc = this.pc;
    clearTimeout(this.timers.disconnected);
    if (state === "disconnected") {
      this.timers.disconnected = setTimeout(() => this.lost(pc, "disconnected"), this.disconnectedGraceMs);
    }
    this.emit("connectionstate", state);
    if (state === "failed" || state === "closed") this.lost(pc, `connection ${state}`);
  }

  openChannel(pc) {
    const channel = pc.createDataChannel("events");
    this.channel = channel;
    const current = () => this.pc === pc;
    channel.addEventListener("open", () => {
      if (!current()) return;
      this.lastHeard = Date.now();
      if (this.heartbeatMs > 0) {
        this.timers.heartbeat = setInterval(() => this.heartbeat(pc), this.heartbeatMs);
      }
      this.emit("open");
    });
    channel.addEventListener("close", () => {
      if (!current()) return;
      this.emit("close");
      this.lost(pc, "events channel closed");
    });
    channel.addEventListener("message", (event) => {
      if (!current() || typeof event.data !== "string") return;
      this.lastHeard = Date.now();
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        console.warn("ignoring non-JSON event", event.data);
        return;
      }
      this.emit("message", message);
    });
  }

  // ICE can say "connected" long after the server process is gone; its answers to pings cannot.
  heartbeat(pc) {
    if (this.pc !== pc) return;
    if (Date.now() - this.lastHeard > this.silenceLimitMs) {
      this.lost(pc, "server stopped answering");
      return;
    }
    this.send({ type: "ping", t: Date.now() });
  }

  iceGathered(pc) {
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
      const timer = setTimeout(done, this.iceGatherTimeoutMs);
      pc.addEventListener("icegatheringstatechange", onChange);
    });
  }

  async postOffer(description) {
    const response = await this.request(OFFER_PATH, {
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
      const retryAfterS = Number(response.headers.get("Retry-After")) || 0;
      throw new HttpError(response.status, body?.error || `offer rejected (HTTP ${response.status})`, retryAfterS);
    }
    if (!body?.sdp || body.type !== "answer") throw new Error("malformed answer from server");
    return body;
  }
}
