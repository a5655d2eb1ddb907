// The latency card: a waterfall of the latest turn's stages, and every field of its metrics event.

import { ui } from "./dom.js";

// Cumulative stage times of a turn, in the order they happen; all are ms since the turn's origin.
const STAGES = [
  ["vad_end_ms", "VAD end", "Your speech end detected"],
  ["asr_ms", "Transcribed", "Speech recognition done"],
  ["llm_first_token_ms", "First LLM token", "The language model's first token"],
  ["tts_first_audio_ms", "First TTS audio", "Speech synthesis produced its first audio"],
  ["first_audio_frame_ms", "First audio out", "The avatar's first audio frame was sent"],
];
const TURN_NAMES = { voice: "voice", chat: "ask", say: "say" };

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

export function renderMetricsTable(message) {
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
export function renderLatency(message) {
  const sinceSpeech = message.since === "speech_end";
  const turn = TURN_NAMES[message.turn] || String(message.turn ?? "turn");
  ui.latencyCaption.textContent = `· ${turn} turn · since ${sinceSpeech ? "end of your speech" : "request"}`;
  // A voice turn shows every stage ("—" where one did not happen); typed turns only their own.
  const stages = STAGES.map(([key, label, help]) => ({
    key,
    label,
    help,
    ms: typeof message[key] === "number" ? message[key] : null,
  })).filter((stage) => (message.turn === "voice" ? stage.key in message : stage.ms !== null));
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
