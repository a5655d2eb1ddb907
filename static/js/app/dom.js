// The call page's elements, looked up once (module scripts run after the document is parsed), and
// the one way a note or error line is shown or hidden.

const $ = (id) => document.getElementById(id);

export const ui = {
  callBtn: $("call-btn"),
  hangupBtn: $("hangup-btn"),
  video: $("remote-video"),
  stage: document.querySelector(".stage"),
  placeholder: $("video-placeholder"),
  flash: $("barge-flash"),
  connState: $("conn-state"),
  badge: $("state-badge"),
  quality: $("quality"),
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

export function setNote(element, message) {
  element.textContent = message;
  element.hidden = !message;
}
