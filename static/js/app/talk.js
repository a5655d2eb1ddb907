// The text box and its buttons (Ask, Say, Stop), and what the server said it can do: Ask needs its
// language model, talking needs its speech recognition and a microphone. Nothing is assumed before
// the server's hello.

import { channelOpen, send } from "./connection.js";
import { setNote, ui } from "./dom.js";
import { showError } from "./status.js";
import { addSaidLine, markCut } from "./transcript.js";

let llmAvailable = false;
let llmReason = "";
let asrAvailable = false;
let micInUse = false;

// Enter (and the phone keyboard's send key) asks when the server has a language model, else says.
function defaultAction() {
  return llmAvailable ? "chat" : "say";
}

// Controls that need an open data channel are enabled only while it is open; Ask also needs the
// server's language model.
export function updateControls() {
  const open = channelOpen();
  ui.text.disabled = !open;
  ui.sayBtn.disabled = !open;
  ui.stopBtn.disabled = !open;
  ui.askBtn.disabled = !open || !llmAvailable;
  ui.askBtn.title = llmAvailable || !llmReason
    ? "Answer with the avatar's language model"
    : `Unavailable: ${llmReason}`;
  ui.text.placeholder = llmAvailable || !open
    ? "Ask something, or type text to say…"
    : "Type something for the avatar to say…";
  const voice = micInUse && asrAvailable ? " Or just talk." : "";
  ui.enterHint.textContent = llmAvailable
    ? `Enter asks; Say speaks your text exactly.${voice}`
    : `Enter says your text exactly.${voice}`;
}

// A new call: nothing is known of the server until its hello.
export function resetCapabilities() {
  llmAvailable = false;
  llmReason = "";
  asrAvailable = false;
  setNote(ui.asrNote, "");
  setNote(ui.llmNote, "");
}

export function setMicInUse(inUse) {
  micInUse = inUse;
}

// The hello's llm/asr fields (and why one is unavailable).
export function applyCapabilities(hello) {
  llmAvailable = hello.llm === true;
  asrAvailable = hello.asr === true;
  llmReason = llmAvailable ? "" : String(hello.llm_unavailable || "the server has no language model");
  setNote(
    ui.asrNote,
    hello.asr === false
      ? `Voice input unavailable: ${hello.asr_unavailable || "no speech recognition"}. Typing still works.`
      : "",
  );
  setNote(ui.llmNote, llmAvailable ? "" : `Ask unavailable: ${llmReason}. Say still works.`);
  updateControls();
}

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

export function setupTalkForm() {
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
}
