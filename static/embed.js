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
//
// This file stays a classic script, so that the one line above keeps working as it always has (with
// or without defer). It only loads the element's module, js/avatar_call.js, from the same server
// (module scripts from another origin are fetched with CORS; the server allows any origin to load its
// static scripts). A page may load that module itself instead.
"use strict";

(() => {
  // document.currentScript is this <script> while it runs (null only when something evaluates this
  // file without a script element; then the page's own server is the best guess).
  const url = document.currentScript
    ? new URL("js/avatar_call.js", document.currentScript.src)
    : new URL("/static/js/avatar_call.js", location.href);
  import(url.href).catch((err) => {
    console.error("avatar-call: could not load the element", err);
  });
})();
