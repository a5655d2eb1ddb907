// <avatar-call> custom element, as a module: what embed.js loads. A page may also import it itself:
//
//   <script type="module" src="https://avatar.example.com/static/js/avatar_call.js"></script>
//
// (the server sends its scripts with Access-Control-Allow-Origin: *, which module scripts from
// another origin need). Attributes, size and shape: see embed.js.
//
// The call itself is not made here: the element frames the kiosk or the call page on the avatar
// server's own origin, and those use the shared call client (call_client.js). So the host page needs
// no CORS entry for the API and never touches the media or the token's requests.

// The avatar server: the one this module came from, unless the element's src says otherwise.
const scriptOrigin = new URL(import.meta.url).origin;
const PAGES = { kiosk: "/static/kiosk.html", call: "/" };

class AvatarCall extends HTMLElement {
  static get observedAttributes() {
    return ["src", "token", "mode", "sleep"];
  }

  constructor() {
    super();
    const root = this.attachShadow({ mode: "open" });
    const style = document.createElement("style");
    style.textContent =
      ":host{display:block;position:relative;width:480px;height:480px;background:#000}" +
      ':host([fit="video"]){height:auto;aspect-ratio:1}' +
      "iframe{position:absolute;inset:0;width:100%;height:100%;border:0}";
    // The video's shape once the kiosk in the iframe has told it (fit="video").
    this.shape = document.createElement("style");
    this.frame = document.createElement("iframe");
    this.frame.setAttribute("allow", "microphone; autoplay; fullscreen");
    this.frame.setAttribute("allowfullscreen", "");
    this.frame.title = "Avatar call";
    root.append(style, this.shape, this.frame);
    this.onMessage = (event) => this.videoSize(event);
  }

  connectedCallback() {
    window.addEventListener("message", this.onMessage);
    this.update();
  }

  disconnectedCallback() {
    window.removeEventListener("message", this.onMessage);
    // Leaving the page (or removing the element) hangs up: the iframe's pagehide closes the call.
    this.frame.removeAttribute("src");
  }

  // The kiosk page posts {type: "avatar-call:video-size", width, height} when its video's frame size
  // is known or changes. Only this element's own iframe, on the avatar server's origin, is heard.
  videoSize(event) {
    if (event.source !== this.frame.contentWindow) return;
    let origin;
    try {
      origin = new URL(this.frame.src).origin;
    } catch {
      return;
    }
    const data = event.data;
    if (event.origin !== origin || data?.type !== "avatar-call:video-size") return;
    const width = Number(data.width);
    const height = Number(data.height);
    if (!(Number.isInteger(width) && Number.isInteger(height) && width > 0 && height > 0)) return;
    this.shape.textContent = `:host([fit="video"]){aspect-ratio:${width}/${height}}`;
  }

  attributeChangedCallback() {
    if (this.isConnected) this.update();
  }

  url() {
    const origin = (this.getAttribute("src") || scriptOrigin).replace(/\/+$/, "");
    const mode = this.getAttribute("mode") === "call" ? "call" : "kiosk";
    const url = new URL(PAGES[mode], origin);
    const sleep = this.getAttribute("sleep");
    if (sleep && mode === "kiosk") url.searchParams.set("sleep", sleep);
    const token = this.getAttribute("token");
    if (token) url.hash = new URLSearchParams({ token }).toString();
    return url.href;
  }

  update() {
    const next = this.url();
    const current = this.frame.getAttribute("src");
    if (current === next) return;
    if (current && current.split("#")[0] === next.split("#")[0]) {
      // Only the fragment (the token) changed: setting src would just scroll the loaded page.
      // A fresh iframe loads the page anew; the old one's pagehide ends its call.
      const fresh = this.frame.cloneNode(false);
      fresh.src = next;
      this.frame.replaceWith(fresh);
      this.frame = fresh;
      return;
    }
    this.frame.src = next;
  }
}

// Loaded twice (embed.js and an import, or two copies of embed.js): the first definition stays.
if (!customElements.get("avatar-call")) customElements.define("avatar-call", AvatarCall);
