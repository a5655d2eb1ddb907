// Call page for avatar_rtc: one WebRTC peer connection to the server, a data channel named
// "events" for JSON control messages, the avatar's audio and video played through one <video>.
// Plain ES2020, no framework, no build step.
"use strict";

(() => {
  const OFFER_URL = "/offer";
  const CONFIG_URL = "/api/config";
  // The API token, when the server is set up with one: from the page's URL fragment (#token=...),
  // which browsers never send to a server, so it stays out of access and proxy logs; else asked for
  // once when the server answers 401. It goes to the server only as an Authorization header.
  let apiToken = tokenFromPageUrl() || sessionStorage.getItem("avatarToken") || "";

  // A legacy ?token= in the page's URL still works, but it is taken out of the address bar (and so
  // out of bookmarks, history and the Referer of later requests) at once, and kept for this tab.
  function tokenFromPageUrl() {
    const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));
    const query = new URLSearchParams(location.search);
    const legacy = query.get("token");
    if (query.has("token")) {
      query.delete("token");
      const search = query.toString();
      history.replaceState(history.state, "", `${location.pathname}${search ? `?${search}` : ""}${location.hash}`);
      if (legacy) sessionStorage.setItem("avatarToken", legacy);
    }
    return fragment.get("token") || legacy || "";
  }

  // A token put into the fragment later (an edited address, an embedding page) is used from then on.
  window.addEventListener("hashchange", () => {
    const token = new URLSearchParams(location.hash.replace(/^#/, "")).get("token");
    if (token && token !== apiToken) {
      apiToken = token;
      loadTemplates();
    }
  });

  async function apiFetch(url, options = {}, retried = false) {
    const headers = new Headers(options.headers || {});
    if (apiToken) headers.set("Authorization", `Bearer ${apiToken}`);
    const response = await fetch(url, { ...options, headers });
    if (response.status === 401 && !retried) {
      const entered = window.prompt("This avatar server needs an access token:");
      if (entered && entered.trim()) {
        apiToken = entered.trim();
        sessionStorage.setItem("avatarToken", apiToken);
        return apiFetch(url, options, true);
      }
    }
    return response;
  }

  // <img> cannot send an Authorization header. With a token, each thumbnail is fetched here and
  // shown through a blob: URL; the list keeps one per thumbnail URL shown, and one that is no longer
  // shown (redrawn away, or replaced by a new version) is revoked. Without a token, plain URLs.
  const thumbnails = new Map(); // thumbnail URL -> {objectUrl, loaded, dropped}

  function showThumbnail(img, url) {
    if (!apiToken) {
      img.src = url;
      return;
    }
    let entry = thumbnails.get(url);
    if (!entry) {
      const fresh = { objectUrl: null, dropped: false, loaded: null };
      fresh.loaded = fetch(url, { headers: { Authorization: `Bearer ${apiToken}` } })
        .then((response) => {
          if (!response.ok) throw new Error(`HTTP ${response.status}`);
          return response.blob();
        })
        .then((blob) => {
          if (fresh.dropped) return null;
          fresh.objectUrl = URL.createObjectURL(blob);
          avatarCall.thumbnailUrls.created += 1;
          return fresh.objectUrl;
        })
        .catch(() => {
          // Tried again at the next redraw.
          if (thumbnails.get(url) === fresh) thumbnails.delete(url);
          return null;
        });
      thumbnails.set(url, fresh);
      entry = fresh;
    }
    if (entry.objectUrl) {
      img.src = entry.objectUrl;
    } else {
      entry.loaded.then((objectUrl) => {
        if (objectUrl && !entry.dropped) img.src = objectUrl;
      });
    }
  }

  // Revokes the blob: URLs of thumbnails not in `shown` (URLs the list just drew).
  function dropThumbnails(shown) {
    for (const [url, entry] of thumbnails) {
      if (shown.has(url)) continue;
      entry.dropped = true;
      thumbnails.delete(url);
      if (entry.objectUrl) {
        URL.revokeObjectURL(entry.objectUrl);
        avatarCall.thumbnailUrls.revoked += 1;
      }
    }
  }

  const TEMPLATES_URL = "/api/templates";
  // Every call starts on the server's default template; it cannot be deleted from here.
  // The server's default avatar (every call starts on it); /api/templates says which it is.
  let defaultTemplate = "default";
  const TEMPLATE_ID_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
  // States in which a template can be shown in a call.
  const USABLE_STATES = new Set(["ready", "warm", "in_use"]);
  // Preparation stages as the server names them in its progress lines; others are shown as sent.
  const STAGE_NAMES = {
    hash: "Checking file",
    landmarks: "Tracking the face",
    animate: "Animating the photo",
    masks: "Masking",
    renderer: "Preparing renderer",
    write: "Saving",
  };
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
    stage: document.querySelector(".stage"),
    placeholder: $("video-placeholder"),
    flash: $("barge-flash"),
    connState: $("conn-state"),
    badge: $("state-badge"),
    micNote: $("mic-note"),
    asrNote: $("asr-note"),
    llmNote: $("llm-note"),
    enterHint: $("enter-hint"),
    error: $("error-line"),
    form: $("talk-form"),
    text: $("talk-text"),
    askBtn: $("ask-btn"),
    sayBtn: $("say-btn"),
    stopBtn: $("stop-btn"),
    transcript: $("transcript"),
    latency: $("latency"),
    latencyCaption: $("latency-caption"),
    metrics: $("metrics").tBodies[0],
    templateList: $("template-list"),
    templateStatus: $("template-status"),
    templateError: $("template-error"),
    uploadForm: $("upload-form"),
    uploadId: $("upload-id"),
    uploadName: $("upload-name"),
    uploadFile: $("upload-file"),
    uploadBtn: $("upload-btn"),
    uploadProgress: $("upload-progress"),
    uploadStage: $("upload-stage"),
    uploadError: $("upload-error"),
  };

  // Test hook: browser tests read this instead of scraping the DOM. `events` keeps every message
  // the server sent, in order, across calls; `transcript` keeps the conversation as shown, one entry
  // per line: {role: "user"|"assistant", text, final, interrupted, source?} (an assistant entry is
  // updated in place while it is partial). `templates` is the last list from GET /api/templates;
  // `currentTemplate` the avatar shown in the call, or the one chosen for the next call; `uploads`
  // one entry per upload from the form: {id, status, progress: [NDJSON progress lines], result, error}.
  const avatarCall = {
    state: "idle",
    connectionState: "new",
    sessionId: null,
    hello: null,
    metrics: null,
    events: [],
    transcript: [],
    pc: null,
    channel: null,
    templates: [],
    currentTemplate: defaultTemplate,
    // The call's language (hello, then each template switch): transcript lines are marked with it.
    language: null,
    uploads: [],
    // blob: URLs made for thumbnails (with a token) and revoked again; the difference is how many live.
    thumbnailUrls: { created: 0, revoked: 0 },
  };
  window.avatarCall = avatarCall;

  // Cumulative stage times of a turn, in the order they happen; all are ms since the turn's origin.
  const STAGES = [
    ["vad_end_ms", "VAD end", "Your speech end detected"],
    ["asr_ms", "Transcribed", "Speech recognition done"],
    ["llm_first_token_ms", "First LLM token", "The language model's first token"],
    ["tts_first_audio_ms", "First TTS audio", "Speech synthesis produced its first audio"],
    ["first_audio_frame_ms", "First audio out", "The avatar's first audio frame was sent"],
  ];
  const TURN_NAMES = { voice: "voice", chat: "ask", say: "say" };
  const FLASH_MS = 1600;

  let micStream = null;
  let channelOpen = false;
  // What the server said it can do (hello); nothing is assumed before it arrives.
  let llmAvailable = false;
  let llmReason = "";
  let asrAvailable = false;
  // The assistant line still growing (partial transcripts), and what it was going to say in full.
  let pendingAnswer = null;
  // Set when the caller cut off the answer in progress, applied when its final transcript comes.
  let answerCut = false;
  // "Listening…" placeholder line while the caller talks, turned into their line once transcribed.
  let listeningLine = null;
  let flashTimer = null;
  // The DOM line of each transcript entry (kept out of the entries so the test hook stays plain data).
  const lineOf = new Map();

  // ---------------------------------------------------------------- UI helpers

  function setNote(element, message) {
    element.textContent = message;
    element.hidden = !message;
  }

  function showError(message) {
    setNote(ui.error, message);
  }

  function showMicNote(message) {
    setNote(ui.micNote, message);
  }

  function setAvatarState(state) {
    avatarCall.state = state;
    ui.badge.textContent = state;
    ui.badge.dataset.state = state;
    updateListeningLine(state);
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

  // The video frame takes the video's own shape (style.css reads --video-aspect), so a portrait or
  // landscape avatar shows whole, without bars and without pushing the buttons out of view. The frames
  // decide during a call (a switch to a template of another shape fires "resize"); before the first
  // one, the chosen template's size from the list, so the frame does not jump when the call starts.
  function fitVideoFrame() {
    let width = ui.video.videoWidth;
    let height = ui.video.videoHeight;
    if (!(width > 0 && height > 0)) {
      const info = avatarCall.templates.find((t) => t.id === (switchingTo ?? avatarCall.currentTemplate));
      width = info?.width;
      height = info?.height;
    }
    // Nothing known yet (no list, or an old server that sends no size): keep the last shape.
    if (!(width > 0 && height > 0)) return;
    ui.stage.style.setProperty("--video-aspect", String(width / height));
  }

  // Enter (and the phone keyboard's send key) asks when the server has a language model, else says.
  function defaultAction() {
    return llmAvailable ? "chat" : "say";
  }

  // Controls that need an open data channel are enabled only while it is open; Ask also needs the
  // server's language model.
  function updateControls() {
    ui.text.disabled = !channelOpen;
    ui.sayBtn.disabled = !channelOpen;
    ui.stopBtn.disabled = !channelOpen;
    ui.askBtn.disabled = !channelOpen || !llmAvailable;
    ui.askBtn.title = llmAvailable || !llmReason
      ? "Answer with the avatar's language model"
      : `Unavailable: ${llmReason}`;
    ui.text.placeholder = llmAvailable || !channelOpen
      ? "Ask something, or type text to say…"
      : "Type something for the avatar to say…";
    const voice = micStream && asrAvailable ? " Or just talk." : "";
    ui.enterHint.textContent = llmAvailable
      ? `Enter asks; Say speaks your text exactly.${voice}`
      : `Enter says your text exactly.${voice}`;
  }

  function setChannelOpen(open) {
    channelOpen = open;
    updateControls();
  }

  function setInCall(inCall) {
    ui.callBtn.disabled = inCall;
    ui.hangupBtn.disabled = !inCall;
  }

  // Which renderer draws the face and at what quality level (MuseTalk degrades under load).
  // The video's own level is separate: under CPU pressure the server sends a smaller picture first.
  function showQuality(renderer, level) {
    const pill = document.getElementById("quality");
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

  function showVideoQuality(level, size) {
    avatarCall.videoQuality = { level, size };
    showQuality(avatarCall.renderer, avatarCall.quality);
  }

  // The HTML lang for a conversation language. The server writes Mandarin in simplified characters
  // (it converts Whisper's traditional ones), and "zh-Hans" makes the browser pick simplified-Chinese
  // glyphs and Chinese line breaking; a bare "zh" leaves the font choice to the browser's locale.
  function htmlLang(language) {
    return language === "zh" ? "zh-Hans" : language;
  }

  function setLanguage(language) {
    if (typeof language !== "string" || !language) return;
    avatarCall.language = language;
    ui.text.lang = htmlLang(language);
  }

  function applyHello(message) {
    avatarCall.hello = message;
    setLanguage(message.language);
    showQuality(message.renderer, message.quality);
    llmAvailable = message.llm === true;
    asrAvailable = message.asr === true;
    llmReason = llmAvailable
      ? ""
      : String(message.llm_unavailable || "the server has no language model");
    setNote(
      ui.asrNote,
      message.asr === false
        ? `Voice input unavailable: ${message.asr_unavailable || "no speech recognition"}. Typing still works.`
        : "",
    );
    setNote(ui.llmNote, llmAvailable ? "" : `Ask unavailable: ${llmReason}. Say still works.`);
    updateControls();
  }

  function flashBargeIn() {
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

  // ---------------------------------------------------------------- transcript

  function newLine(role, extraClass = "") {
    ui.transcript.querySelector(".empty")?.remove();
    const item = document.createElement("li");
    item.className = `line ${role} ${extraClass}`.trim();
    const head = document.createElement("span");
    head.className = "who";
    const text = document.createElement("span");
    text.className = "text";
    item.append(head, text);
    ui.transcript.append(item);
    return item;
  }

  function scrollToEnd() {
    ui.transcript.scrollTop = ui.transcript.scrollHeight;
  }

  function drawEntry(entry, item) {
    const who = item.querySelector(".who");
    const text = item.querySelector(".text");
    who.textContent = entry.role === "user" ? "You" : entry.source === "say" ? "Avatar · said" : "Avatar";
    if (entry.interrupted) {
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = "interrupted";
      who.append(" ", tag);
    }
    item.classList.remove("listening");
    item.classList.toggle("partial", !entry.final);
    item.classList.toggle("interrupted", Boolean(entry.interrupted));
    item.classList.toggle("blank", !entry.text);
    // On the text, not the whole line: the "You"/"Avatar" label stays in the page's language.
    if (entry.language) text.lang = htmlLang(entry.language);
    else text.removeAttribute("lang");
    text.replaceChildren();
    if (entry.text) text.append(entry.text);
    // What the answer was going to say but the caller never heard.
    const planned = entry.planned || "";
    if (entry.interrupted && planned.length > entry.text.length && planned.startsWith(entry.text)) {
      const rest = document.createElement("span");
      rest.className = "unheard";
      rest.title = "Not spoken: the answer was cut off";
      rest.textContent = planned.slice(entry.text.length);
      text.append(rest);
    } else if (!entry.text) {
      text.append(
        entry.role === "user"
          ? "(nothing recognised)"
          : entry.interrupted
            ? "(cut off before speaking)"
            : "(no answer)",
      );
    }
  }

  function addEntry(entry, item) {
    avatarCall.transcript.push(entry);
    lineOf.set(entry, item);
    drawEntry(entry, item);
    scrollToEnd();
    return entry;
  }

  function updateListeningLine(state) {
    if (state === "listening") {
      if (!listeningLine) {
        listeningLine = newLine("user", "listening partial");
        listeningLine.querySelector(".who").textContent = "You";
        scrollToEnd();
      }
      listeningLine.querySelector(".text").textContent = "Listening…";
    } else if (listeningLine && state === "thinking") {
      listeningLine.querySelector(".text").textContent = "Transcribing…";
    } else if (listeningLine) {
      listeningLine.remove();
      listeningLine = null;
    }
  }

  function onTranscript(message) {
    const text = String(message.text ?? "");
    if (message.role === "user") {
      const item = listeningLine || newLine("user");
      listeningLine = null;
      const final = message.final !== false;
      addEntry({ role: "user", text, final, interrupted: false, language: message.language }, item);
      return;
    }
    let entry = pendingAnswer;
    if (!entry) {
      entry = addEntry(
        { role: "assistant", text, final: false, interrupted: false, language: message.language },
        newLine("assistant"),
      );
      pendingAnswer = entry;
    }
    entry.text = text;
    if (message.final) {
      entry.final = true;
      // The server says whether the answer was cut; older servers only let the texts be compared.
      const cut =
        typeof message.interrupted === "boolean"
          ? message.interrupted
          : Boolean(entry.planned) && text.length < entry.planned.length;
      entry.interrupted = answerCut || entry.interrupted || cut;
      pendingAnswer = null;
      answerCut = false;
    } else {
      entry.planned = text;
    }
    drawEntry(entry, lineOf.get(entry));
    scrollToEnd();
  }

  // A local line for text sent with Say: the server speaks it without a transcript event.
  let lastSaid = null;
  function addSaidLine(text) {
    const entry = { role: "assistant", source: "say", text, final: true, interrupted: false };
    lastSaid = addEntry({ ...entry, language: avatarCall.language }, newLine("assistant"));
  }

  function markCut() {
    if (pendingAnswer) answerCut = true;
  }

  // ---------------------------------------------------------------- latency panel

  function formatMs(ms) {
    return ms >= 10000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`;
  }

  function formatValue(value) {
    if (typeof value === "number") {
      return Number.isInteger(value) ? String(value) : value.toFixed(1);
    }
    if (value !== null && typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  function renderMetricsTable(message) {
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

  // A waterfall of the latest turn: each stage's bar runs from the previous stage to its own time.
  function renderLatency(message) {
    const sinceSpeech = message.since === "speech_end";
    const turn = TURN_NAMES[message.turn] || String(message.turn ?? "turn");
    ui.latencyCaption.textContent = `· ${turn} turn · since ${sinceSpeech ? "end of your speech" : "request"}`;
    // A voice turn shows every stage ("—" where one did not happen); typed turns only their own.
    const stages = STAGES.map(([key, label, help]) => ({
      key,
      label,
      help,
      ms: typeof message[key] === "number" ? message[key] : null,
    })).filter((stage) => message.turn === "voice" ? stage.key in message : stage.ms !== null);
    const span = Math.max(1, ...stages.map((s) => s.ms ?? 0));
    const list = document.createElement("ol");
    list.className = "waterfall";
    let previous = 0;
    for (const stage of stages) {
      const li = document.createElement("li");
      li.className = "stage-row";
      li.dataset.stage = stage.key;
      const label = document.createElement("span");
      label.className = "stage-label";
      label.textContent = stage.label;
      label.title = stage.help;
      const track = document.createElement("span");
      track.className = "stage-track";
      const value = document.createElement("span");
      value.className = "stage-ms";
      if (stage.ms === null) {
        li.classList.add("skipped");
        value.textContent = "—";
        value.title = "This stage did not happen in this turn";
      } else {
        const start = Math.min(previous, stage.ms);
        const bar = document.createElement("span");
        bar.className = "stage-bar";
        bar.style.left = `${(start / span) * 100}%`;
        bar.style.width = `${Math.max(0.8, ((stage.ms - start) / span) * 100)}%`;
        bar.title = `+${formatMs(stage.ms - start)}`;
        track.append(bar);
        value.textContent = formatMs(stage.ms);
        previous = Math.max(previous, stage.ms);
      }
      li.append(label, track, value);
      list.append(li);
    }
    const facts = [];
    if (typeof message.speech_ms === "number") facts.push(`spoke ${(message.speech_ms / 1000).toFixed(1)} s`);
    if (typeof message.frames === "number") {
      facts.push(`${message.frames} frames, ${message.frames_late ?? 0} late`);
    }
    if (message.interrupted) facts.push("interrupted");
    const foot = document.createElement("p");
    foot.className = "latency-foot";
    foot.textContent = facts.join(" · ");
    ui.latency.replaceChildren(list, ...(facts.length ? [foot] : []));
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
        applyHello(message);
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
        if (message.interrupted) {
          if (message.turn === "say" && lastSaid) {
            lastSaid.interrupted = true;
            drawEntry(lastSaid, lineOf.get(lastSaid));
          } else {
            markCut();
          }
        }
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
        if (switchingTo !== null && /template/i.test(String(message.message))) {
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

  function send(message) {
    const channel = avatarCall.channel;
    if (!channel || channel.readyState !== "open") {
      showError("Not connected.");
      return false;
    }
    channel.send(JSON.stringify(message));
    return true;
  }

  // ---------------------------------------------------------------- avatar templates

  // The template the server shows in this call (null outside a call), and one asked for but not yet
  // confirmed by a "template" event.
  let serverTemplate = null;
  let switchingTo = null;
  let switchRequestedAt = 0;
  let uploading = false;
  // Bumped when a template is (re)uploaded so its thumbnail is fetched again.
  let thumbVersion = 0;
  // Delete asks for a second tap instead of a modal confirm().
  let armedDelete = null;
  let armedTimer = null;

  function templateName(id) {
    const info = avatarCall.templates.find((t) => t.id === id);
    return info?.name || id;
  }

  function setTemplateStatus(text) {
    ui.templateStatus.textContent = text;
  }

  // `kind` tells a failed list load (cleared by the next good load) from a failed action.
  function showTemplateError(message, kind = "action") {
    setNote(ui.templateError, message);
    ui.templateError.dataset.kind = kind;
  }

  function describeState(info) {
    switch (info.state) {
      case "preparing":
        return "preparing…";
      case "outdated":
        return "outdated: upload again";
      case "corrupt":
        return "damaged: upload again";
      default:
        return "";
    }
  }

  function renderTemplates() {
    const list = avatarCall.templates;
    const current = switchingTo ?? avatarCall.currentTemplate;
    if (!list.length) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = "No avatars yet.";
      ui.templateList.replaceChildren(li);
      dropThumbnails(new Set());
      return;
    }
    const shown = new Set();
    ui.templateList.replaceChildren(
      ...list.map((info) => {
        const li = document.createElement("li");
        li.className = "template";
        li.dataset.id = info.id;
        const usable = USABLE_STATES.has(info.state);
        const pick = document.createElement("button");
        pick.type = "button";
        pick.className = "template-pick";
        pick.dataset.id = info.id;
        pick.disabled = !usable;
        pick.setAttribute("aria-pressed", String(info.id === current));
        pick.classList.toggle("current", info.id === current);
        pick.classList.toggle("switching", info.id === switchingTo);
        const note = describeState(info);
        pick.title = note ? `${info.name} (${note})${info.error ? `: ${info.error}` : ""}` : info.name;
        const img = document.createElement("img");
        img.alt = "";
        img.loading = "lazy";
        img.width = 64;
        img.height = 64;
        if (usable) {
          const url = `${info.thumbnail}?v=${thumbVersion}`;
          shown.add(url);
          showThumbnail(img, url);
        }
        const name = document.createElement("span");
        name.className = "template-name";
        name.textContent = info.name || info.id;
        pick.append(img, name);
        if (note) {
          const badge = document.createElement("span");
          badge.className = "template-note";
          badge.textContent = note;
          pick.append(badge);
        }
        pick.addEventListener("click", () => chooseTemplate(info.id));
        li.append(pick);
        if (info.id !== defaultTemplate) {
          const del = document.createElement("button");
          del.type = "button";
          del.className = "template-delete";
          del.dataset.id = info.id;
          const armed = armedDelete === info.id;
          del.classList.toggle("armed", armed);
          del.textContent = armed ? "Delete?" : "×";
          del.title = armed ? `Tap again to delete ${info.name}` : `Delete ${info.name}`;
          del.setAttribute("aria-label", del.title);
          del.addEventListener("click", () => onDeleteClick(info.id));
          li.append(del);
        }
        return li;
      }),
    );
    dropThumbnails(shown);
    fitVideoFrame();
  }

  async function loadTemplates() {
    try {
      const response = await apiFetch(TEMPLATES_URL, { cache: "no-store" });
      const body = await response.json().catch(() => null);
      if (!response.ok || !Array.isArray(body?.templates)) {
        throw new Error(body?.error || `HTTP ${response.status}`);
      }
      avatarCall.templates = body.templates;
      if (typeof body.default === "string" && body.default !== defaultTemplate) {
        if (avatarCall.currentTemplate === defaultTemplate && !avatarCall.pc) avatarCall.currentTemplate = body.default;
        defaultTemplate = body.default;
      }
      // A chosen avatar that went away (deleted elsewhere) falls back to the default outside a call.
      if (!avatarCall.pc && !body.templates.some((t) => t.id === avatarCall.currentTemplate)) {
        avatarCall.currentTemplate = defaultTemplate;
      }
      if (ui.templateError.dataset.kind === "load") showTemplateError("");
    } catch (err) {
      showTemplateError(`Could not load avatars: ${err?.message || err}`, "load");
    }
    renderTemplates();
  }

  function requestTemplate(id) {
    if (!send({ type: "select_template", id })) return;
    switchingTo = id;
    switchRequestedAt = performance.now();
    setTemplateStatus(`switching to ${templateName(id)}…`);
    renderTemplates();
  }

  function chooseTemplate(id) {
    showTemplateError("");
    if (channelOpen) {
      if (id === (switchingTo ?? serverTemplate)) return;
      // The server answers a switch to what it already shows with nothing; skip the message.
      if (id === serverTemplate) {
        switchingTo = null;
        avatarCall.currentTemplate = id;
        setTemplateStatus("");
        renderTemplates();
        return;
      }
      requestTemplate(id);
      return;
    }
    avatarCall.currentTemplate = id;
    setTemplateStatus(avatarCall.pc ? "" : id === defaultTemplate ? "" : "used when the call starts");
    renderTemplates();
  }

  function onTemplateSwitched(message) {
    const id = String(message.id);
    serverTemplate = id;
    avatarCall.currentTemplate = id;
    switchingTo = null;
    setLanguage(message.language);
    const ms = typeof message.switch_ms === "number" ? message.switch_ms : performance.now() - switchRequestedAt;
    setTemplateStatus(`switched in ${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`);
    renderTemplates();
  }

  function onTemplateSwitchFailed(reason) {
    const id = switchingTo;
    switchingTo = null;
    avatarCall.currentTemplate = serverTemplate ?? avatarCall.currentTemplate;
    setTemplateStatus("");
    showTemplateError(`Could not switch to ${templateName(id)}: ${reason}`);
    renderTemplates();
  }

  function onDeleteClick(id) {
    clearTimeout(armedTimer);
    if (armedDelete !== id) {
      armedDelete = id;
      armedTimer = setTimeout(() => {
        armedDelete = null;
        renderTemplates();
      }, 3000);
      renderTemplates();
      return;
    }
    armedDelete = null;
    deleteTemplate(id);
  }

  async function deleteTemplate(id) {
    showTemplateError("");
    try {
      const response = await apiFetch(`${TEMPLATES_URL}/${encodeURIComponent(id)}`, { method: "DELETE" });
      const body = await response.json().catch(() => null);
      if (response.status === 409) {
        showTemplateError(`${templateName(id)} is in use in a call; hang up (or switch away) first.`);
      } else if (!response.ok && response.status !== 404) {
        showTemplateError(`Could not delete ${templateName(id)}: ${body?.error || `HTTP ${response.status}`}`);
      } else if (avatarCall.currentTemplate === id && !avatarCall.pc) {
        avatarCall.currentTemplate = defaultTemplate;
        setTemplateStatus("");
      }
    } catch (err) {
      showTemplateError(`Could not delete ${templateName(id)}: ${err?.message || err}`);
    }
    await loadTemplates();
  }

  // ---- upload

  function setUploading(active) {
    uploading = active;
    for (const el of [ui.uploadId, ui.uploadName, ui.uploadFile, ui.uploadBtn]) el.disabled = active;
    ui.uploadBtn.textContent = active ? "Uploading…" : "Upload";
  }

  function setProgress(stage, done, total) {
    ui.uploadProgress.hidden = false;
    if (typeof total === "number" && total > 0) {
      ui.uploadProgress.max = total;
      ui.uploadProgress.value = Math.min(done, total);
    } else {
      ui.uploadProgress.removeAttribute("value"); // indeterminate
    }
    const label = STAGE_NAMES[stage] || stage;
    ui.uploadStage.textContent = typeof total === "number" && total > 1 ? `${label} ${done}/${total}` : label;
  }

  // Reads an NDJSON body line by line as it streams in; `onLine` gets each parsed object.
  async function readNdjson(response, onLine) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffered += decoder.decode(value ?? new Uint8Array(), { stream: !done });
      let newline;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline).trim();
        buffered = buffered.slice(newline + 1);
        if (line) onLine(JSON.parse(line));
      }
      if (done) break;
    }
    if (buffered.trim()) onLine(JSON.parse(buffered));
  }

  async function uploadTemplate() {
    const id = ui.uploadId.value.trim();
    const name = ui.uploadName.value.trim();
    const file = ui.uploadFile.files?.[0];
    setNote(ui.uploadError, "");
    if (!TEMPLATE_ID_RE.test(id)) {
      setNote(ui.uploadError, "Id: 1-64 letters, digits, _ or -, starting with a letter or digit.");
      ui.uploadId.focus();
      return;
    }
    if (!file) {
      setNote(ui.uploadError, "Choose a video or photo.");
      return;
    }
    const form = new FormData();
    form.append("id", id);
    if (name) form.append("name", name);
    form.append("file", file);

    setUploading(true);
    ui.uploadProgress.hidden = false;
    ui.uploadProgress.removeAttribute("value");
    ui.uploadStage.textContent = "Uploading…";
    let last = null;
    const record = { id, status: null, progress: [], result: null, error: null };
    avatarCall.uploads.push(record);
    try {
      const response = await apiFetch(TEMPLATES_URL, { method: "POST", body: form });
      record.status = response.status;
      if (!response.ok) {
        const body = await response.json().catch(() => null);
        const reason = body?.error || response.statusText || "upload refused";
        throw new Error(response.status === 429 ? `Busy: ${reason}` : `${reason} (HTTP ${response.status})`);
      }
      ui.uploadStage.textContent = "Preparing…";
      await readNdjson(response, (line) => {
        if ("state" in line) {
          last = line;
          record.result = line;
        } else if ("stage" in line) {
          record.progress.push(line);
          setProgress(String(line.stage), Number(line.done) || 0, line.total);
        }
      });
      if (!last) throw new Error("the server ended the upload without a result");
      if (last.state !== "ready") throw new Error(last.error || `preparation ${last.state}`);
      ui.uploadProgress.max = 1;
      ui.uploadProgress.value = 1;
      const label = last.template?.name || id;
      ui.uploadStage.textContent = `Added ${label}${last.cache_hit ? " (unchanged)" : ""} in ${
        typeof last.seconds === "number" ? `${last.seconds.toFixed(1)} s` : "a moment"
      }.`;
      ui.uploadForm.reset();
      thumbVersion += 1;
    } catch (err) {
      record.error = String(err?.message || err);
      ui.uploadProgress.hidden = true;
      ui.uploadStage.textContent = "";
      setNote(ui.uploadError, `Upload failed: ${record.error}`);
    } finally {
      setUploading(false);
      await loadTemplates();
    }
  }

  // The id defaults to the file's name, made into a valid id.
  ui.uploadFile.addEventListener("change", () => {
    const file = ui.uploadFile.files?.[0];
    if (!file || ui.uploadId.value.trim()) return;
    const slug = file.name
      .replace(/\.[^.]*$/, "")
      .replace(/[^A-Za-z0-9_-]+/g, "-")
      .replace(/^[^A-Za-z0-9]+/, "")
      .slice(0, 64);
    if (slug) ui.uploadId.value = slug;
  });

  ui.uploadForm.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!uploading) uploadTemplate();
  });

  // ---------------------------------------------------------------- call setup

  // ICE servers come from the server's config when it offers one; any failure (no endpoint,
  // bad JSON, timeout) falls back to host candidates only, which is enough on a LAN or loopback.
  async function loadIceServers() {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), CONFIG_TIMEOUT_MS);
    try {
      const response = await apiFetch(CONFIG_URL, { signal: controller.signal });
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
    const response = await apiFetch(OFFER_URL, {
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
    channel.addEventListener("open", () => {
      setChannelOpen(true);
      // The server starts every call on its default avatar: ask for the one chosen before the call.
      serverTemplate = defaultTemplate;
      if (avatarCall.currentTemplate !== serverTemplate) requestTemplate(avatarCall.currentTemplate);
    });
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
    setTemplateStatus("");
    setPlaceholder("<p>Connecting…</p>");
    resetConversation();
    llmAvailable = false;
    llmReason = "";
    asrAvailable = false;
    avatarCall.hello = null;
    setNote(ui.asrNote, "");
    setNote(ui.llmNote, "");

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

  // Lines still open belong to the call that ended: leave them as they are, stop updating them.
  function resetConversation() {
    pendingAnswer = null;
    answerCut = false;
    lastSaid = null;
    listeningLine?.remove();
    listeningLine = null;
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

    resetConversation();
    setChannelOpen(false);
    setInCall(false);
    setAvatarState("idle");
    setConnectionState(pc ? "closed" : "new");
    // A switch still on its way is dropped with the call; the choice stays for the next one.
    if (switchingTo !== null) avatarCall.currentTemplate = switchingTo;
    switchingTo = null;
    serverTemplate = null;
    setTemplateStatus("");
    renderTemplates();
    if (pc) loadTemplates();
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
  loadTemplates();

  function submitText(action) {
    const text = ui.text.value.trim();
    if (!text) return;
    if (action === "chat" && !llmAvailable) return;
    if (send({ type: action, text })) {
      showError("");
      ui.text.value = "";
      // A chat comes back as the caller's transcript line; said text has none, so add it here.
      if (action === "say") addSaidLine(text);
    }
  }

  // Enter picks the default action itself: implicit form submission would use the first submit
  // button (Ask) and do nothing at all while that one is disabled.
  ui.text.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || event.isComposing || event.shiftKey) return;
    event.preventDefault();
    submitText(defaultAction());
  });

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    submitText(event.submitter?.value || defaultAction());
  });

  ui.stopBtn.addEventListener("click", () => {
    markCut();
    send({ type: "interrupt" });
  });

  ui.video.addEventListener("playing", () => setPlaceholder(""));
  ui.video.addEventListener("loadedmetadata", fitVideoFrame);
  ui.video.addEventListener("resize", fitVideoFrame);
  ui.placeholder.addEventListener("click", () => {
    if (ui.video.srcObject) playRemote();
  });

  // Closing the tab should free the server's session right away instead of waiting for ICE
  // consent to time out.
  window.addEventListener("pagehide", () => {
    if (avatarCall.pc) hangUp();
  });
})();
