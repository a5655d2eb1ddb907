// The avatar gallery: the server's templates with their thumbnails, choosing one (before a call, for
// the call; in a call, a switch over the events channel), and deleting one with a second tap.

import { fetchWithToken } from "../call_client.js";
import { apiFetch, currentToken } from "./auth.js";
import { channelOpen, inCall, send } from "./connection.js";
import { setNote, ui } from "./dom.js";
import { setLanguage } from "./language.js";
import { avatarCall } from "./state.js";
import { fitVideoFrame } from "./video.js";

export const TEMPLATES_URL = "/api/templates";
// States in which a template can be shown in a call.
const USABLE_STATES = new Set(["ready", "warm", "in_use"]);
const DELETE_ARMED_MS = 3000;

// The server's default avatar (every call starts on it; it cannot be deleted from here);
// /api/templates says which it is.
let defaultTemplate = "default";
// The template the server shows in this call (null outside a call), and one asked for but not yet
// confirmed by a "template" event.
let serverTemplate = null;
let switchingTo = null;
let switchRequestedAt = 0;
// Bumped when a template is (re)uploaded so its thumbnail is fetched again.
let thumbVersion = 0;
// Delete asks for a second tap instead of a modal confirm().
let armedDelete = null;
let armedTimer = null;

// ---------------------------------------------------------------- thumbnails

// <img> cannot send an Authorization header. With a token, each thumbnail is fetched here and
// shown through a blob: URL; the list keeps one per thumbnail URL shown, and one that is no longer
// shown (redrawn away, or replaced by a new version) is revoked. Without a token, plain URLs.
const thumbnails = new Map(); // thumbnail URL -> {objectUrl, loaded, dropped}

function showThumbnail(img, url) {
  if (!currentToken()) {
    img.src = url;
    return;
  }
  let entry = thumbnails.get(url);
  if (!entry) {
    const fresh = { objectUrl: null, dropped: false, loaded: null };
    fresh.loaded = fetchWithToken(url, {}, { token: currentToken })
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

// ---------------------------------------------------------------- the list

function templateName(id) {
  const info = avatarCall.templates.find((t) => t.id === id);
  return info?.name || id;
}

export function setTemplateStatus(text) {
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

// The list entry of the template shown, or about to be (a switch on its way, the choice for the next
// call): its size shapes the video frame before the first frame comes.
export function chosenTemplateInfo() {
  return avatarCall.templates.find((t) => t.id === (switchingTo ?? avatarCall.currentTemplate));
}

export function renderTemplates() {
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
  fitVideoFrame(chosenTemplateInfo());
}

export async function loadTemplates() {
  try {
    const response = await apiFetch(TEMPLATES_URL, { cache: "no-store" });
    const body = await response.json().catch(() => null);
    if (!response.ok || !Array.isArray(body?.templates)) {
      throw new Error(body?.error || `HTTP ${response.status}`);
    }
    avatarCall.templates = body.templates;
    if (typeof body.default === "string" && body.default !== defaultTemplate) {
      if (avatarCall.currentTemplate === defaultTemplate && !inCall()) avatarCall.currentTemplate = body.default;
      defaultTemplate = body.default;
    }
    // A chosen avatar that went away (deleted elsewhere) falls back to the default outside a call.
    if (!inCall() && !body.templates.some((t) => t.id === avatarCall.currentTemplate)) {
      avatarCall.currentTemplate = defaultTemplate;
    }
    if (ui.templateError.dataset.kind === "load") showTemplateError("");
  } catch (err) {
    showTemplateError(`Could not load avatars: ${err?.message || err}`, "load");
  }
  renderTemplates();
}

// An uploaded template's thumbnail may be new under an old id: fetch them all anew.
export function templateUploaded() {
  thumbVersion += 1;
}

// ---------------------------------------------------------------- choosing and switching

function requestTemplate(id) {
  if (!send({ type: "select_template", id })) return;
  switchingTo = id;
  switchRequestedAt = performance.now();
  setTemplateStatus(`switching to ${templateName(id)}…`);
  renderTemplates();
}

function chooseTemplate(id) {
  showTemplateError("");
  if (channelOpen()) {
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
  setTemplateStatus(inCall() ? "" : id === defaultTemplate ? "" : "used when the call starts");
  renderTemplates();
}

// The events channel opened: the server starts every call on its default avatar, so ask for the one
// chosen before the call.
export function onChannelOpened() {
  serverTemplate = defaultTemplate;
  if (avatarCall.currentTemplate !== serverTemplate) requestTemplate(avatarCall.currentTemplate);
}

// Whether a switch is on its way (an error about a template is then the switch's).
export function switching() {
  return switchingTo !== null;
}

export function onTemplateSwitched(message) {
  const id = String(message.id);
  serverTemplate = id;
  avatarCall.currentTemplate = id;
  switchingTo = null;
  setLanguage(message.language);
  const ms = typeof message.switch_ms === "number" ? message.switch_ms : performance.now() - switchRequestedAt;
  setTemplateStatus(`switched in ${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`);
  renderTemplates();
}

export function onTemplateSwitchFailed(reason) {
  const id = switchingTo;
  switchingTo = null;
  avatarCall.currentTemplate = serverTemplate ?? avatarCall.currentTemplate;
  setTemplateStatus("");
  showTemplateError(`Could not switch to ${templateName(id)}: ${reason}`);
  renderTemplates();
}

// The call ended: a switch still on its way is dropped with it; the choice stays for the next call.
// `hadCall`: a call was up, so the list (its templates' states) is read again.
export function onCallEnded(hadCall) {
  if (switchingTo !== null) avatarCall.currentTemplate = switchingTo;
  switchingTo = null;
  serverTemplate = null;
  setTemplateStatus("");
  renderTemplates();
  if (hadCall) loadTemplates();
}

// ---------------------------------------------------------------- deleting

function onDeleteClick(id) {
  clearTimeout(armedTimer);
  if (armedDelete !== id) {
    armedDelete = id;
    armedTimer = setTimeout(() => {
      armedDelete = null;
      renderTemplates();
    }, DELETE_ARMED_MS);
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
    } else if (avatarCall.currentTemplate === id && !inCall()) {
      avatarCall.currentTemplate = defaultTemplate;
      setTemplateStatus("");
    }
  } catch (err) {
    showTemplateError(`Could not delete ${templateName(id)}: ${err?.message || err}`);
  }
  await loadTemplates();
}
