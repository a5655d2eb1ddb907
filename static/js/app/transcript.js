// The conversation as it is shown: the caller's lines and the avatar's, an answer growing while its
// transcript is partial, what an interrupted answer was going to say, and the "Listening…" line
// while the caller talks. Each entry is also kept in avatarCall.transcript for tests.

import { ui } from "./dom.js";
import { htmlLang } from "./language.js";
import { avatarCall } from "./state.js";

// The assistant line still growing (partial transcripts), and what it was going to say in full.
let pendingAnswer = null;
// Set when the caller cut off the answer in progress, applied when its final transcript comes.
let answerCut = false;
// "Listening…" placeholder line while the caller talks, turned into their line once transcribed.
let listeningLine = null;
// The caller's line while its transcript is partial (made at a pause; they may still go on).
let pendingUser = null;
// The last line said with Say: the server speaks it without a transcript event.
let lastSaid = null;
// The DOM line of each transcript entry (kept out of the entries so the test hook stays plain data).
const lineOf = new Map();

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

// Follows the avatar's state: "listening" shows the caller's line in waiting, "thinking" says it is
// being transcribed, anything else takes the waiting line away (its transcript replaces it).
export function updateListeningLine(state) {
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

export function onTranscript(message) {
  const text = String(message.text ?? "");
  if (message.role === "user") {
    const final = message.final !== false;
    if (pendingUser) {
      Object.assign(pendingUser, { text, final, language: message.language });
      drawEntry(pendingUser, lineOf.get(pendingUser));
      scrollToEnd();
    } else {
      const item = listeningLine || newLine("user");
      listeningLine = null;
      pendingUser = addEntry({ role: "user", text, final, interrupted: false, language: message.language }, item);
    }
    if (final) pendingUser = null;
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
export function addSaidLine(text) {
  const entry = { role: "assistant", source: "say", text, final: true, interrupted: false };
  lastSaid = addEntry({ ...entry, language: avatarCall.language }, newLine("assistant"));
}

// The caller cut the answer in progress off (Stop, or talking over it).
export function markCut() {
  if (pendingAnswer) answerCut = true;
}

// A turn's metrics said it was interrupted: a Say marks its own line, an answer is marked when its
// final transcript comes.
export function onTurnInterrupted(turn) {
  if (turn === "say" && lastSaid) {
    lastSaid.interrupted = true;
    drawEntry(lastSaid, lineOf.get(lastSaid));
  } else {
    markCut();
  }
}

// Lines still open belong to the call that ended: leave them as they are, stop updating them.
export function resetConversation() {
  pendingAnswer = null;
  answerCut = false;
  lastSaid = null;
  listeningLine?.remove();
  listeningLine = null;
}
