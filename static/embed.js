// <avatar-call> custom element: drop the avatar into any page.
//
//   <script src="https://avatar.example.com/static/embed.js" defer></script>
//   <avatar-call src="https://avatar.example.com" token="..." mode="kiosk"
//                style="width: 480px; height: 480px"></avatar-call>
//
// Attributes: src (the avatar server's origin; default: where this script came from), token (API
// token, if the server wants one; it goes into the iframe's URL fragment, which the browser never sends
// to a server, so it stays out of access logs), mode ("kiosk": starts by itself, no controls, the default;
// "call": the call page with its buttons and text box), sleep (kiosk: seconds of quiet before the
// avatar dims), fit (see below). The call runs in an iframe on the avatar server's own origin, so the
// host page needs no CORS entry and never touches the media; the iframe is allowed microphone, autoplay
// and fullscreen.
//
// Size and shape: the element is a block, 480x480 px unless the page's style says otherwise. The
// avatar's video keeps its own shape (square, portrait such as 720x1280, or landscape) and is never
// cropped: in a box of another shape it is shown whole, centred, with black bars (letterboxed). With
// fit="video" (kiosk mode) the box takes the video's shape instead: its height follows its width
// (style="width: 360px", no height) once the first frame says what the shape is, square until then.
// A height or max-height in the page's style still wins, and the video is letterboxed inside it.
"use strict";

(() => {
  if (customElements.get("avatar-call")) return;
  const scriptOrigin = document.currentScript ? new URL(document.currentScript.src).origin : location.origin;
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

  customElements.define("avatar-call", AvatarCall);
})();
