// window.avatarCall: the call page's state as plain data, for browser tests (which read it instead
// of scraping the DOM) and for a look from the devtools. `events` keeps every message the server
// sent, in order, across calls; `transcript` keeps the conversation as shown, one entry per line:
// {role: "user"|"assistant", text, final, interrupted, source?} (an assistant entry is updated in
// place while it is partial). `templates` is the last list from GET /api/templates; `currentTemplate`
// the avatar shown in the call, or the one chosen for the next call; `uploads` one entry per upload
// from the form: {id, status, progress: [NDJSON progress lines], result, error}. `pc` and `channel`
// are the live call's (connection.js defines them as views of the call client).

export const avatarCall = {
  state: "idle",
  connectionState: "new",
  sessionId: null,
  hello: null,
  metrics: null,
  events: [],
  transcript: [],
  templates: [],
  // The server's default avatar until /api/templates says which it is.
  currentTemplate: "default",
  // The call's language (hello, then each template switch): transcript lines are marked with it.
  language: null,
  uploads: [],
  // blob: URLs made for thumbnails (with a token) and revoked again; the difference is how many live.
  thumbnailUrls: { created: 0, revoked: 0 },
};
window.avatarCall = avatarCall;
