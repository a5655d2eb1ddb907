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
// avatar dims). The call runs in an iframe on the avatar server's own origin, so the host page
// needs no CORS entry and never touches the media; the iframe is allowed microphone, autoplay and
// fullscreen.
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
        "iframe{position:absolute;inset:0;width:100%;height:100%;border:0}";
      this.frame = document.createElement("iframe");
      this.frame.setAttribute("allow", "microphone; autoplay; fullscreen");
      this.frame.setAttribute("allowfullscreen", "");
      this.frame.title = "Avatar call";
      root.append(style, this.frame);
    }

    connectedCallback() {
      this.update();
    }

    disconnectedCallback() {
      // Leaving the page (or removing the element) hangs up: the iframe's pagehide closes the call.
      this.frame.removeAttribute("src");
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
