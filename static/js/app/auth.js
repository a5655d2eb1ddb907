// The API token, when the server is set up with one: from the page's URL fragment (#token=...),
// which browsers never send to a server, so it stays out of access and proxy logs; else asked for
// once when the server answers 401. It goes to the server only as an Authorization header.

import { fetchWithToken } from "../call_client.js";
import { tokenFromPageUrl } from "../page_token.js";

const STORAGE_KEY = "avatarToken";
let apiToken = tokenFromPageUrl(STORAGE_KEY);
const tokenListeners = [];

export function currentToken() {
  return apiToken;
}

// Runs `listener` whenever the token changes after the page loaded (a new fragment).
export function onTokenChange(listener) {
  tokenListeners.push(listener);
}

// On a 401: ask the person at the page, once per request; true when they gave a token.
export async function askToken() {
  const entered = window.prompt("This avatar server needs an access token:");
  if (!entered || !entered.trim()) return false;
  apiToken = entered.trim();
  try {
    sessionStorage.setItem(STORAGE_KEY, apiToken);
  } catch {
    // Storage refused: the token lasts as long as the page.
  }
  return true;
}

// fetch() for the API: with the token, and the question on a 401.
export function apiFetch(url, options = {}) {
  return fetchWithToken(url, options, { token: currentToken, onUnauthorized: askToken });
}

// A token put into the fragment later (an edited address, an embedding page) is used from then on.
window.addEventListener("hashchange", () => {
  const token = new URLSearchParams(location.hash.replace(/^#/, "")).get("token");
  if (token && token !== apiToken) {
    apiToken = token;
    for (const listener of tokenListeners) listener(token);
  }
});
