// "Add avatar": uploads a video or photo to POST /api/templates and shows the server's preparation
// progress as it streams back (NDJSON: progress lines, then one result line).

import { apiFetch } from "./auth.js";
import { setNote, ui } from "./dom.js";
import { avatarCall } from "./state.js";
import { loadTemplates, TEMPLATES_URL, templateUploaded } from "./templates.js";

const TEMPLATE_ID_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
// Preparation stages as the server names them in its progress lines; others are shown as sent.
const STAGE_NAMES = {
  hash: "Checking file",
  landmarks: "Tracking the face",
  animate: "Animating the photo",
  masks: "Masking",
  renderer: "Preparing renderer",
  write: "Saving",
};

let uploading = false;

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
    templateUploaded();
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

export function setupUploadForm() {
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
}
